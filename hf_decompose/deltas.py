"""Exact deltas: values d with fl(base + d) == fine-tune, bit for bit."""

from __future__ import annotations

import torch


def _mismatch(base: torch.Tensor, delta: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
    """Where fl(base + delta) and `finetuned` differ bit for bit (compared by numpy: several times
    faster than torch's comparison of int32 views on one thread)."""
    return torch.from_numpy((base + delta).view(torch.int32).numpy() != finetuned.view(torch.int32).numpy())


def exact_delta(base: torch.Tensor, finetuned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (delta, override_indices, override_values) for float32 tensors of one shape.

    ``base + delta`` (float32) reproduces `finetuned` bit for bit except at the override indices,
    where the fine-tuned value is stored as is. Entries identical in both have delta exactly 0.
    The float32 difference (the exact difference, correctly rounded) is almost always exact; a few
    nudges by one ulp fix most of the rest (sign crossings, signed zeros), and what remains becomes
    an override. The nudges work on the gathered inexact entries only.
    """
    base, finetuned = base.float(), finetuned.float()
    delta = finetuned - base
    where = _mismatch(base, delta, finetuned).numpy().nonzero()
    if not where[0].size:  # the usual case
        return delta, torch.zeros(0, delta.dim(), dtype=torch.long), finetuned.new_empty(0)
    where = tuple(torch.from_numpy(i) for i in where)
    b, f, d = base[where], finetuned[where], delta[where]
    for _ in range(4):
        bad = _mismatch(b, d, f)
        if not bad.any():
            break
        direction = torch.where(b + d < f, torch.full_like(d, torch.inf), torch.full_like(d, -torch.inf))
        d = torch.where(bad, torch.nextafter(d, direction), d)
    delta[where] = d
    bad = _mismatch(b, d, f)
    return delta, torch.stack(where, 1)[bad], f[bad]
