"""H2O's score reference: every prompt query's attention counted."""

import torch

from kvsurgery.reference import h2o as ref


def test_accumulated_scores_count_every_query():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    s = ref.accumulated_scores(q, k, None, 0.35, chunk=4)
    torch.testing.assert_close(s.sum(-1), torch.full((2, 2), 9.0))
    assert torch.allclose(s[..., 0], s[..., 0].clamp_min(1.0))  # the first token is seen by every query
