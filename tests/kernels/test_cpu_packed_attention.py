"""The C++ kernel of the packed region's decode attention on CPU (`kvsurgery.kernels.cpu_packed_attention`) against
attention over the reference's dequantized tokens (`reference.quant.read_packed`), in float64: layouts of every
supported bit width and group size, heads with no packed slot, and segments that end inside a vector."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsurgery.errors import KVSurgeryError
from kvsurgery.kernels import cpu_packed_attention
from kvsurgery.reference.quant import read_packed
from kvsurgery.reference.quant_codes import QuantSpec
from kvsurgery.reference.quant_layout import QuantLayout


@st.composite
def packed_regions(draw):
    """(q [B, Hq, D], the packed tensors by name, layout): random codes and statistics, segments of random lengths."""
    d = draw(st.sampled_from([16, 32, 64, 128]))
    bits = draw(st.sampled_from([(2, 2), (4, 4), (2, 4), (1, 2)]))
    k_group = draw(st.sampled_from([8, 16, 32]))
    v_group = draw(st.sampled_from([g for g in (8, 16, 32) if d % g == 0]))
    lay = QuantLayout(QuantSpec(bits[0], "channel", k_group), QuantSpec(bits[1], "token", v_group), residual=k_group)
    b, n_kv, g = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.sampled_from([1, 3, 4]))
    cap = k_group * draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(0, cap), min_size=b * n_kv, max_size=b * n_kv))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    slots = n_kv * cap

    def codes(spec):
        return torch.randint(0, 256, (b, slots, d * spec.bits // 8), dtype=torch.uint8, generator=gen)

    t = {
        "qk_codes": codes(lay.k),
        "qk_scale": torch.rand(b, slots // k_group, d, generator=gen),
        "qk_low": torch.randn(b, slots // k_group, d, generator=gen),
        "qv_codes": codes(lay.v),
        "qv_scale": torch.rand(b, slots, d // v_group, generator=gen),
        "qv_low": torch.randn(b, slots, d // v_group, generator=gen),
        "q_start": (torch.arange(n_kv, dtype=torch.int32) * cap).expand(b, n_kv).contiguous(),
        "q_len": torch.tensor(lengths, dtype=torch.int32).reshape(b, n_kv),
    }
    return torch.randn(b, n_kv * g, d, generator=gen), t, lay


def expected(q, t, lay, scale):
    """(output, log-sum-exp) over each head's dequantized packed slots, in float64."""
    b, hq, d = q.shape
    n_kv = t["q_start"].shape[1]
    width = int(t["q_len"].max())
    k_hat = read_packed(t["qk_codes"], t["qk_scale"], t["qk_low"], lay.k, t["q_start"], width, torch.float64)
    v_hat = read_packed(t["qv_codes"], t["qv_scale"], t["qv_low"], lay.v, t["q_start"], width, torch.float64)
    qg = q.double().reshape(b, n_kv, hq // n_kv, d)
    logits = torch.einsum("bhgd,bhld->bhgl", qg, k_hat) * scale
    ok = torch.arange(width) < t["q_len"].long()[..., None]
    logits = logits.masked_fill(~ok[:, :, None], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.einsum("bhgl,bhld->bhgd", torch.softmax(logits, dim=-1).nan_to_num(0.0), v_hat)
    return out.reshape(b, hq, d), lse.reshape(b, hq)


@settings(max_examples=40, deadline=None)
@given(packed_regions(), st.sampled_from([1, 2]))
def test_kernel_matches_attention_over_the_dequantized_tokens(region, threads):
    q, t, lay = region
    scale = q.shape[-1] ** -0.5
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, lse = cpu_packed_attention.attend_packed(q, *t.values(), scale, lay.text())
    finally:
        torch.set_num_threads(before)
    want_out, want_lse = expected(q, t, lay, scale)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-4)
    assert bool((lse[(t["q_len"] == 0).repeat_interleave(q.shape[1] // t["q_len"].shape[1], 1)] == float("-inf")).all())


def test_unsupported_layouts_are_named():
    """Values per channel or keys per token are not the kernel's (the reference op keeps serving them)."""
    kivi = QuantLayout(QuantSpec(2, "channel", 32), QuantSpec(2, "token", 32), residual=32)
    per_channel_values = QuantLayout(QuantSpec(2, "channel", 32), QuantSpec(2, "channel", 32), residual=32)
    assert cpu_packed_attention.supported(kivi, 64, torch.float32)
    assert cpu_packed_attention.supported(kivi, 64, torch.bfloat16)
    assert not cpu_packed_attention.supported(kivi, 64, torch.float64)
    assert not cpu_packed_attention.supported(per_channel_values, 64, torch.float32)


@settings(max_examples=5, deadline=None)
@given(packed_regions())
def test_half_precision_inputs_are_computed_in_float32(region):
    """A bfloat16 model's queries and statistics: the answer over the same values in float32."""
    q, t, lay = region
    halves = {n: x.bfloat16() if x.is_floating_point() else x for n, x in t.items()}
    scale = q.shape[-1] ** -0.5
    out, lse = cpu_packed_attention.attend_packed(q.bfloat16(), *halves.values(), scale, lay.text())
    exact = {n: x.float() if x.is_floating_point() else x for n, x in halves.items()}
    want_out, want_lse = expected(q.bfloat16().float(), exact, lay, scale)
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-4)


def test_a_failed_build_names_the_command(monkeypatch, tmp_path):
    """A compiler that fails gives a KVSurgeryError with the command, not a ctypes error."""
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("KVSURGERY_CACHE", str(tmp_path))
    cpu_packed_attention._kernel.cache_clear()
    try:
        with pytest.raises(KVSurgeryError, match=r"building the CPU KIVI attention kernel failed .*false"):
            cpu_packed_attention._kernel(3, 64, 2, 2, 32, 32)
    finally:
        cpu_packed_attention._kernel.cache_clear()


def test_a_compiler_without_openmp_builds_a_one_thread_kernel(monkeypatch, tmp_path):
    """A compiler that refuses -fopenmp (Apple's clang) still builds the kernel, with a warning, and it computes the
    same answer (its OpenMP pragmas are ignored)."""
    compiler = tmp_path / "no-openmp-c++"
    compiler.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec g++ "$@"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("KVSURGERY_CACHE", str(tmp_path / "cache"))
    lay = QuantLayout(QuantSpec(2, "channel", 8), QuantSpec(2, "token", 8), residual=8)
    gen = torch.Generator().manual_seed(0)
    t = {
        "qk_codes": torch.randint(0, 256, (1, 16, 4), dtype=torch.uint8, generator=gen),
        "qk_scale": torch.rand(1, 2, 16, generator=gen),
        "qk_low": torch.randn(1, 2, 16, generator=gen),
        "qv_codes": torch.randint(0, 256, (1, 16, 4), dtype=torch.uint8, generator=gen),
        "qv_scale": torch.rand(1, 16, 2, generator=gen),
        "qv_low": torch.randn(1, 16, 2, generator=gen),
        "q_start": torch.tensor([[0, 8]], dtype=torch.int32),
        "q_len": torch.tensor([[8, 5]], dtype=torch.int32),
    }
    q = torch.randn(1, 4, 16, generator=gen)
    cpu_packed_attention._kernel.cache_clear()
    try:
        with pytest.warns(UserWarning, match="without OpenMP"):
            out, lse = cpu_packed_attention.attend_packed(q, *t.values(), 0.25, lay.text())
    finally:
        cpu_packed_attention._kernel.cache_clear()
    want_out, want_lse = expected(q, t, lay, 0.25)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-4)
