"""Exact deltas rebuild the fine-tuned floats bit for bit, adversarial values included."""

import pytest
import torch

from hf_decompose import deltas, kernels
from hf_decompose.deltas import exact_delta, nonzero


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
def test_16_bit_delta_as_stored_equals_the_delta_from_float32(dtype):
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
    wide = exact_delta(base.float(), ft.float(), dtype, dtype)
    stored = exact_delta(base, ft, dtype, dtype)
    for a, b in zip(wide, stored):
        assert a.dtype == b.dtype and torch.equal(a, b)
    delta, idx, values = stored
    rebuilt = (base.float() + delta.float()).to(dtype)
    rebuilt[tuple(idx.t())] = values
    assert torch.equal(rebuilt.view(torch.int16), ft.view(torch.int16))


def _adversarial(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    base = (torch.randn(n, generator=gen) * torch.logspace(-6, 2, n)).to(dtype)
    ft = (base.float() + torch.randn(n, generator=gen) * torch.logspace(-9, 1, n)).to(dtype)
    ft[::97] = -base[::97]
    ft[5::89] = 0.0
    base[7::83] = 0.0
    ft[9::79] = -0.0
    ft[11::7] = base[11::7]
    return base.view(shape), ft.view(shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(3001,), (37, 53), (4, 9, 31)])
def test_blockwise_delta_equals_the_whole_tensor_delta(monkeypatch, dtype, shape):
    """On CPU the delta is built and checked a block at a time: blocks that are all exact, blocks with
    mismatches, a short last block; the same delta, override positions and values as the whole-tensor path
    (taken for non-contiguous inputs), and the fine-tune rebuilt bit for bit."""
    monkeypatch.setattr(deltas, "BLOCK", 256)
    base, ft = _adversarial(shape, dtype, seed=len(shape))
    blockwise = exact_delta(base, ft, dtype, dtype)
    whole = exact_delta(base.mT.contiguous().mT, ft.mT.contiguous().mT, dtype, dtype) if len(shape) > 1 else None
    if whole is not None:
        assert not base.mT.contiguous().mT.is_contiguous()
        for a, b in zip(blockwise, whole):
            assert a.dtype == b.dtype and torch.equal(a, b)
    delta, idx, values = blockwise
    assert idx.shape[1] == len(shape) and 0 < idx.shape[0] < base.numel() // 20
    rebuilt = (base.float() + delta.float()).to(dtype)
    rebuilt[tuple(idx.t())] = values
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(rebuilt.view(bits), ft.view(bits))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_nonzero_from_bits_equals_comparison(monkeypatch, dtype):
    monkeypatch.setattr(deltas, "BLOCK", 100)
    values = torch.randn(37, 41).to(dtype)
    values[::3] = 0.0
    values[1::5] = -0.0
    got = nonzero(values)
    assert got.dtype == torch.bool and torch.equal(got, values != 0)


def test_a_column_whose_only_change_may_be_nudged_away_is_not_surely_dense():
    """`_costlier` counts every mismatched entry as lost: a column moved only at an unfixable mismatch leaves the
    support possibly short of a column, so the delta is not surely dense (the full path decides); with that column
    moved elsewhere too, it is, and the unfixable entry makes it costlier than the fine-tune."""
    base = torch.full((8, 8), 1.0, dtype=torch.bfloat16)
    ft = torch.full((8, 8), 1.0078125, dtype=torch.bfloat16)  # every delta exact in bf16
    base[:, 0] = ft[:, 0] = 0.5  # column 0 unchanged...
    base[0, 0], ft[0, 0] = 0.000370025634765625, 0.00010251998901367188  # ...but for an entry no nudge fixes
    delta, flat, counts = deltas._difference(base, ft, torch.bfloat16, torch.bfloat16)
    assert flat.tolist() == [0]
    assert not deltas._costlier(base, ft, flat, torch.bfloat16, torch.bfloat16, 0.5, deltas.support_counts(delta))
    assert not deltas._costlier(base, ft, flat, torch.bfloat16, torch.bfloat16, 0.5, counts)  # counted on the way (the compiled kernel)
    base[5, 0], ft[5, 0] = 1.0, 1.0078125
    delta, flat, counts = deltas._difference(base, ft, torch.bfloat16, torch.bfloat16)
    assert deltas._costlier(base, ft, flat, torch.bfloat16, torch.bfloat16, 0.5, deltas.support_counts(delta))
    assert deltas._costlier(base, ft, flat, torch.bfloat16, torch.bfloat16, 0.5, counts)
    assert exact_delta(base, ft, torch.bfloat16, torch.bfloat16)[1].tolist() == [[0, 0]]  # the full path: one override


@pytest.mark.skipif(not kernels.available(), reason="the survey is the compiled kernel's")
def test_a_surveyed_matrix_that_did_not_move_gets_the_full_paths_zero_delta(monkeypatch):
    """A bfloat16 matrix the fine-tune left as it was: the survey's zero delta, without a second pass, is the full
    path's bit for bit, with no overrides. With negative zeros in it (-0 - -0 is +0, which merges to +0) the survey
    finds mismatches and the full path decides, as before."""
    passes, kernel = [], kernels.exact_delta_bf16
    monkeypatch.setattr(kernels, "exact_delta_bf16", lambda *a, **k: passes.append(k.get("with_delta", True)) or kernel(*a, **k))
    base = torch.randn(64, 96).bfloat16()
    base[0, :2] = 0.0
    for negative_zeros in (False, True):
        if negative_zeros:
            base[1, :2] = -0.0
        ft = base.clone()
        passes.clear()
        got = exact_delta(base, ft, torch.bfloat16, torch.bfloat16, unless_dense=0.5)
        assert passes == ([False, True] if negative_zeros else [False])  # the survey, then the full pass where needed
        want = exact_delta(base, ft, torch.bfloat16, torch.bfloat16)
        assert got is not None and torch.equal(got[0].view(torch.int16), want[0].view(torch.int16))
        assert torch.equal(got[1], want[1]) and torch.equal(got[2].view(torch.int16), want[2].view(torch.int16))
        assert got[1].shape[0] == (2 if negative_zeros else 0)


def _walked_one_step_at_a_time(b, f, d, model_dtype):
    """The nudge as a loop over steps (the entries still walking, gathered anew each step): `deltas._nudged`'s oracle."""
    bits = deltas._BITS[model_dtype]
    up, down = torch.tensor(torch.inf, dtype=d.dtype), torch.tensor(-torch.inf, dtype=d.dtype)
    d, todo, below = d.clone(), torch.arange(d.numel()), None
    for _ in range(deltas.NUDGES):
        merged, target = deltas._merge(b[todo], d[todo], model_dtype), f[todo]
        now_below = merged < target
        keep = (merged.view(bits) != target.view(bits)) & (True if below is None else now_below == below)
        todo, below = todo[keep], now_below[keep]
        if not todo.numel():
            break
        d[todo] = torch.nextafter(d[todo], torch.where(below, up, down))
    return d, deltas._merge(b, d, model_dtype).view(bits) != f.view(bits)


@pytest.mark.parametrize("dtype,model_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.bfloat16),
                                               (torch.float32, torch.float32)])
def test_every_step_of_the_nudge_tried_at_once_gives_the_walk_one_step_at_a_time(dtype, model_dtype):
    """The same nudged deltas and the same entries left unfixed, on the mismatched entries of adversarial pairs: sign
    crossings, signed zeros, subnormals, deltas spanning more binades than their dtype holds."""
    gen = torch.Generator().manual_seed(0)
    n = 50000

    def scale(lo: float, hi: float) -> torch.Tensor:
        return 10 ** (lo + (hi - lo) * torch.rand(n, generator=gen))

    base = torch.randn(n, generator=gen) * scale(-6, 3)
    near = base * (1 + torch.randn(n, generator=gen) * scale(-8, -1))  # a small change, or another value altogether
    ft = torch.where(torch.rand(n, generator=gen) < 0.5, near, torch.randn(n, generator=gen) * scale(-6, 3))
    base[:2000], ft[:2000] = base[:2000] * 1e-38, ft[:2000] * 1e-38  # subnormal in bfloat16 and float32 (float16: zero; its own from the small scales)
    base, ft = base.to(model_dtype), ft.to(model_dtype)
    ft[2000:2500], ft[2500:3000], base[3000:3500], ft[3500:3600] = -base[2000:2500], 0.0, 0.0, -0.0
    d = (ft.float() - base.float()).to(dtype)
    away = torch.randint(0, 2 * deltas.NUDGES, (n,), generator=gen)  # deltas moved off by up to twice the steps a nudge takes
    side = torch.where(torch.rand(n, generator=gen) < 0.5, torch.tensor(torch.inf, dtype=dtype), torch.tensor(-torch.inf, dtype=dtype))
    for step in range(2 * deltas.NUDGES):
        d = torch.where(away > step, torch.nextafter(d, side), d)
    mismatched = deltas._merge(base, d, model_dtype).view(deltas._BITS[model_dtype]) != ft.view(deltas._BITS[model_dtype])
    b, f, d = base[mismatched], ft[mismatched], d[mismatched]
    nudged, bad = deltas._nudged(b, f, d, model_dtype)
    walked, walked_bad = _walked_one_step_at_a_time(b, f, d, model_dtype)
    assert b.numel() > 1000 and 0 < int(bad.sum()) < b.numel()  # some fixed, some not
    assert torch.equal(nudged.view(torch.uint8), walked.view(torch.uint8)) and torch.equal(bad, walked_bad)
