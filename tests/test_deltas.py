"""Exact deltas rebuild the fine-tuned floats bit for bit, adversarial values included."""

import pytest
import torch

from hf_decompose.deltas import exact_delta, narrow_delta


def _bits_equal(a, b):
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _rebuild(base, delta, idx, values):
    out = base + delta
    out[tuple(idx.t())] = values
    return out


def test_exact_delta_on_adversarial_floats():
    torch.manual_seed(0)
    base = torch.randn(20000) * torch.logspace(-30, 3, 20000)
    ft = base + torch.randn(20000) * torch.logspace(-20, 2, 20000)
    ft[:100] = -base[:100]  # sign crossings
    ft[100:200] = 0.0
    base[200:300] = 0.0
    ft[300:310] = -0.0  # signed zeros
    ft[310:320] = base[310:320]  # unchanged entries
    delta, idx, values = exact_delta(base, ft)
    assert _bits_equal(_rebuild(base, delta, idx, values), ft)
    assert (delta[310:320] == 0).all()
    assert idx.shape[0] < 200  # overrides are the rare exception


def test_plain_add_is_exact_without_overrides_for_small_deltas():
    torch.manual_seed(1)
    base = torch.randn(1000, 100) * 0.05
    ft = base + torch.randn(1000, 100) * 1e-5
    delta, idx, _ = exact_delta(base, ft)
    assert idx.shape[0] == 0
    assert _bits_equal(base + delta, ft)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_delta_as_stored_equals_narrow_delta_in_float32(dtype):
    """The lossless path reads 16-bit tensors of the model's dtype as stored: the same deltas, overrides
    and rebuilt bits as from float32 copies, adversarial values included."""
    torch.manual_seed(2)
    n = 20000
    base = (torch.randn(n) * torch.logspace(-6, 2, n)).to(dtype)
    ft = (base.float() + torch.randn(n) * torch.logspace(-9, 1, n)).to(dtype)
    ft[:100] = -base[:100]  # sign crossings
    ft[100:200] = 0.0
    base[200:300] = 0.0
    ft[300:310] = -0.0
    ft[310:320] = base[310:320]
    ft[320:330] = base[320:330] * 300  # a delta spanning more binades than the fine-tune's value
    wide = narrow_delta(base.float(), ft.float(), dtype, dtype)
    stored = narrow_delta(base, ft, dtype, dtype)
    for a, b in zip(wide, stored):
        assert a.dtype == b.dtype and torch.equal(a, b)
    delta, idx, values = stored
    rebuilt = (base.float() + delta.float()).to(dtype)
    rebuilt[tuple(idx.t())] = values
    assert torch.equal(rebuilt.view(torch.int16), ft.view(torch.int16))


def test_where_gives_the_positions_torch_gives():
    from hf_decompose.deltas import _where

    gen = torch.Generator().manual_seed(0)
    for shape, p in (((7,), 0.3), ((5, 9), 0.1), ((3, 4, 6), 0.2), ((64, 96), 0.002), ((8, 8), 0.0)):
        mask = torch.rand(shape, generator=gen) < p
        got, expected = _where(mask), mask.nonzero(as_tuple=True)
        assert len(got) == len(expected) and all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got, expected)), shape
