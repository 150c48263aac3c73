"""SnapKV's score reference: window attention averaged like probabilities."""

import torch

from kvsurgery.reference import snapkv as ref


def test_window_scores_sum_like_probabilities():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 10, 8, generator=g), torch.randn(1, 2, 10, 8, generator=g)
    s = ref.window_scores(q, k, None, 0.35, 3, 1, "avg")
    assert s.shape == (1, 2, 10)
    torch.testing.assert_close(s.sum(-1), torch.ones(1, 2))  # mean over rows of softmax rows, no pooling
