"""Exact deltas: values d with fl(base + d) == fine-tune, bit for bit."""

from __future__ import annotations

import numpy as np
import torch

from . import kernels
from .checkpoints import EXPONENT_BITS

BLOCK = 1 << 16  # entries compared at a time on CPU: the temporaries stay in cache, no full-size mask is made
NUDGES = 4  # steps of its dtype a mismatched delta moves at most toward merging to the fine-tune (`_nudged`)
_BITS = {dtype: bits for dtype, (bits, _) in EXPONENT_BITS.items()}  # a float dtype's bits as integers


def _differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Where two tensors of one integer dtype differ; on CPU compared by numpy (several times faster
    than torch's comparison on one thread)."""
    if a.device.type != "cpu":
        return a != b
    return torch.from_numpy(a.numpy() != b.numpy())


def nonzero(delta: torch.Tensor) -> torch.Tensor:
    """``delta != 0`` (either zero: False); on CPU from the bits without the sign, a block at a time (3x faster)."""
    if delta.device.type != "cpu" or delta.dtype not in _BITS or not delta.is_contiguous():
        return delta != 0
    bits = delta.view(_BITS[delta.dtype]).numpy().reshape(-1)
    out, scratch = np.empty(bits.size, bool), np.empty(min(bits.size, BLOCK), bits.dtype)
    for start in range(0, bits.size, BLOCK):
        _nonzero_bits(bits[start : start + BLOCK], scratch[: min(BLOCK, bits.size - start)], out[start : start + BLOCK])
    return torch.from_numpy(out).view(delta.shape)


def support_counts(delta: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """For a 2-D CPU delta, its nonzero entries per row and per column, a block of rows at a time from the bits: no
    full-size mask. None where it does not apply (another device, dtype or layout)."""
    if delta.device.type != "cpu" or delta.dtype not in _BITS or delta.dim() != 2 or not delta.is_contiguous():
        return None
    bits = delta.view(_BITS[delta.dtype]).numpy()
    n_rows, n_cols = bits.shape
    step = max(1, BLOCK // max(n_cols, 1))
    rows, cols = np.empty(n_rows, np.int64), np.zeros(n_cols, np.int64)
    scratch, mask = np.empty((min(step, n_rows), n_cols), bits.dtype), np.empty((min(step, n_rows), n_cols), bool)
    for start in range(0, n_rows, step):
        k = min(step, n_rows - start)
        _nonzero_bits(bits[start : start + k], scratch[:k], mask[:k])
        rows[start : start + k] = np.count_nonzero(mask[:k], axis=1)
        cols += np.count_nonzero(mask[:k], axis=0)
    return rows, cols


def dense_support(rows: np.ndarray, cols: np.ndarray, dense_block_density: float) -> bool:
    """Whether nonzero counts per row and column (`support_counts`) make one dense block of the whole matrix: every
    column used, each row on more than half of them (so any two rows share one: a single component), at
    `dense_block_density` or more. Such a support is stored dense."""
    n_rows, n_cols = rows.size, cols.size
    return bool((cols > 0).all() and (2 * rows > n_cols).all() and rows.sum() >= dense_block_density * n_rows * n_cols and n_rows * n_cols > 1)


def _nonzero_bits(bits: np.ndarray, scratch: np.ndarray, out: np.ndarray) -> None:
    """`out` = whether each value (as its `bits`) is nonzero, either sign of zero counting as zero."""
    magnitude = np.array(-1, bits.dtype) ^ np.array(np.iinfo(bits.dtype).min, bits.dtype)  # every bit but the sign
    np.bitwise_and(bits, magnitude, out=scratch)
    np.not_equal(scratch, 0, out=out)


def exact_delta(base: torch.Tensor, finetuned: torch.Tensor, dtype: torch.dtype = torch.float32, model_dtype: torch.dtype = torch.float32,
                unless_dense: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Return (delta, override_indices, override_values): the delta in `dtype` (the fine-tune's own dtype, so that
    a lossless artifact is no larger than the fine-tune) and where it cannot serve, the fine-tune's values.

    `base` and `finetuned` are float32 holding the values as stored, or both in `dtype` when it is `model_dtype`
    (16-bit arithmetic computes in float32 and rounds once: the same values). Merging as `TensorDelta.merge`
    does, in float32 then cast to the model's dtype, ``(base + delta).to(model_dtype)`` equals
    ``finetuned.to(model_dtype)`` bit for bit, except at the override indices, where the fine-tune's value
    (exact in `dtype`) is stored as is. Entries identical in both have delta exactly 0. The rounded difference
    is almost always such a delta; a few nudges by one step of `dtype` fix most of the rest (sign crossings,
    signed zeros, a delta that spans more binades than `dtype` holds), and what remains becomes an override.
    The nudges work on the gathered mismatched entries only.

    With `unless_dense` (a dense-block density), None where the result would surely cost more bytes than the
    fine-tune's own values in `dtype` (`_costlier`): decided before nudging every mismatched entry.
    """
    surveyed = unless_dense is not None and base.dim() == 2 and _kernel_pair(base, finetuned, dtype, model_dtype)
    if surveyed:  # decided from a pass that writes no delta: a costlier one is never written
        _, flat, rows, cols = kernels.exact_delta_bf16(base, finetuned, with_delta=False)
        if flat.numel() and _costlier(base, finetuned, flat, dtype, model_dtype, unless_dense, (rows.numpy(), cols.numpy())):
            return None
        if not flat.numel() and not rows.any():  # nothing moved (a frozen matrix): its delta is +0 throughout, no second pass
            return _without_overrides(torch.zeros_like(base), dtype)
    delta, flat, counts = _difference(base, finetuned, dtype, model_dtype)
    if not flat.numel():
        return _without_overrides(delta, dtype)
    if unless_dense is not None and not surveyed and _costlier(base, finetuned, flat, dtype, model_dtype, unless_dense, counts or support_counts(delta)):
        return None
    b, f, d = (t.reshape(-1).index_select(0, flat) for t in (base, finetuned, delta))
    d, bad = _nudged(b, f.to(model_dtype), d, model_dtype)
    delta.view(-1).index_copy_(0, flat, d)
    flat = flat[bad]
    return delta, _unravel(flat, tuple(delta.shape)), finetuned.reshape(-1).index_select(0, flat).to(dtype)


def _without_overrides(delta: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return delta, torch.zeros(0, delta.dim(), dtype=torch.long, device=delta.device), delta.new_empty(0, dtype=dtype)


def _costlier(base: torch.Tensor, finetuned: torch.Tensor, flat: torch.Tensor, dtype: torch.dtype, model_dtype: torch.dtype,
              dense_block_density: float, counts: tuple[np.ndarray, np.ndarray] | None, sample: int = 64) -> bool:
    """Whether a matrix's exact delta in `dtype` (before nudges; `flat`: its mismatched entries; `counts`: its
    `support_counts`) surely ends up as a dense delta plus at least one override, more bytes than the fine-tune's own
    values: its support is one dense block whatever the nudges do (each mismatched entry counted as lost), and one of
    the first `sample` mismatched entries no nudge fixes. A full fine-tune in bfloat16 leaves about one entry in sixty
    mismatched. Needs no delta: the sampled entries' differences are taken again."""
    if counts is None:
        return False
    n_rows, n_cols = base.shape
    at = flat.cpu().numpy()
    if not dense_support(counts[0] - np.bincount(at // n_cols, minlength=n_rows), counts[1] - np.bincount(at % n_cols, minlength=n_cols),
                         dense_block_density):
        return False
    head = flat[:sample]
    b, f = (t.reshape(-1).index_select(0, head) for t in (base, finetuned))
    return bool(_nudged(b, f.to(model_dtype), (f.float() - b.float()).to(dtype), model_dtype)[1].any())


def _nudged(b: torch.Tensor, f: torch.Tensor, d: torch.Tensor, model_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Gathered mismatched entries (base, fine-tune in `model_dtype`, delta): the deltas nudged toward merging to
    the fine-tune, and where they still do not. Each delta walks up to `NUDGES` steps of its dtype toward its target
    and stops where it merges to it, or where it stepped across it (merging is monotone in the delta: no value beyond
    hits it). Every step of every entry is tried at once: a few operations, not a few a step (a mixture's 1,536
    matrices each ask this of a sample of 64 entries, `_costlier`)."""
    bits = _BITS[model_dtype]
    below = _merge(b, d, model_dtype) < f
    toward = torch.where(below, torch.tensor(torch.inf, dtype=d.dtype, device=d.device), torch.tensor(-torch.inf, dtype=d.dtype, device=d.device))
    steps = [d]
    for _ in range(NUDGES):
        steps.append(torch.nextafter(steps[-1], toward))
    steps = torch.stack(steps)  # (NUDGES + 1, n)
    merged = _merge(b, steps, model_dtype)
    hit = ~_differ(merged.view(bits), f.view(bits).expand_as(merged))
    stop = hit | ((merged < f) != below)  # merged to the target, or stepped across it
    at = torch.where(stop.any(0), stop.int().argmax(0), NUDGES)[None]  # the first step where the walk stops
    return steps.gather(0, at)[0], ~hit.gather(0, at)[0]


def _unravel(flat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(n, ndim) indices of flat positions in `shape`; on CPU by numpy (3x faster than torch's)."""
    if not shape:
        return flat.new_zeros(flat.numel(), 0)
    if flat.device.type != "cpu":
        return torch.stack(torch.unravel_index(flat, shape), 1)
    return torch.from_numpy(np.stack(np.unravel_index(flat.numpy(), shape), 1))


def _difference(base: torch.Tensor, finetuned: torch.Tensor, dtype: torch.dtype, model_dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[np.ndarray, np.ndarray] | None]:
    """(finetuned - base rounded once to `dtype`, the flat positions where it does not merge back to the fine-tune,
    the difference's `support_counts` where they came with it, else None). A bfloat16 pair on CPU goes through the
    compiled kernel (`kernels.exact_delta_bf16`: one pass, support counted on the way); other CPU pairs a block of
    `BLOCK` entries at a time, each block checked while in cache: one pass over the inputs instead of full-size sums
    and masks (the usual block merges back exactly and costs one bitwise test)."""
    if base.device.type != "cpu" or not (base.is_contiguous() and finetuned.is_contiguous()):
        delta = (finetuned - base).to(dtype).contiguous()
        return delta, _flat(_mismatch(base, delta, finetuned.to(model_dtype))), None
    if _kernel_pair(base, finetuned, dtype, model_dtype):
        delta, flat, rows, cols = kernels.exact_delta_bf16(base, finetuned)
        return delta, flat, (rows.numpy(), cols.numpy()) if delta.dim() == 2 else None
    delta = torch.empty(base.shape, dtype=dtype)
    b, f, d = base.view(-1), finetuned.view(-1), delta.view(-1)
    bits, hits = _BITS[model_dtype], []
    for start in range(0, b.numel(), BLOCK):
        bb, fb, db = b[start : start + BLOCK], f[start : start + BLOCK], d[start : start + BLOCK]
        torch.sub(fb, bb, out=db)
        merged, target = _merge(bb, db, model_dtype).view(bits), fb.to(model_dtype).view(bits)
        if not torch.equal(merged, target):
            hits.append(_flat(_differ(merged, target)) + start)
    return delta, torch.cat(hits) if hits else torch.zeros(0, dtype=torch.long), None


def _kernel_pair(base: torch.Tensor, finetuned: torch.Tensor, dtype: torch.dtype, model_dtype: torch.dtype) -> bool:
    """Whether `kernels.exact_delta_bf16` takes this pair: contiguous bfloat16 CPU tensors, the delta and model bfloat16."""
    return (base.dtype == finetuned.dtype == dtype == model_dtype == torch.bfloat16 and base.device.type == "cpu" and base.numel() > 0
            and base.is_contiguous() and finetuned.is_contiguous() and kernels.available())


def _flat(mask: torch.Tensor) -> torch.Tensor:
    """The flat positions where `mask` is set; on CPU by numpy (18x faster than numpy's 2-D `nonzero`)."""
    if mask.device.type != "cpu":
        return mask.reshape(-1).nonzero()[:, 0]
    return torch.from_numpy(np.flatnonzero(mask.numpy()))


def _merge(base: torch.Tensor, delta: torch.Tensor, model_dtype: torch.dtype) -> torch.Tensor:
    """(base + delta) in float32, cast to `model_dtype`: what merging gives."""
    return base + delta if base.dtype == delta.dtype == model_dtype else (base.float() + delta.float()).to(model_dtype)


def _mismatch(base: torch.Tensor, delta: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Where `_merge(base, delta)` in `target`'s dtype differs from `target` bit for bit."""
    bits = _BITS[target.dtype]
    return _differ(_merge(base, delta, target.dtype).view(bits), target.view(bits))
