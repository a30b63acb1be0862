"""Exact deltas: values d with fl(base + d) == fine-tune, bit for bit."""

from __future__ import annotations

import torch


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def exact_delta(base: torch.Tensor, finetuned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (delta, override_indices, override_values) for float32 tensors of one shape.

    ``base + delta`` (float32) reproduces `finetuned` bit for bit except at the override indices,
    where the fine-tuned value is stored as is. Entries identical in both have delta exactly 0.
    The float32 difference (the exact difference, correctly rounded) is almost always exact; a few
    nudges by one ulp fix most of the rest (sign crossings, signed zeros), and what remains becomes
    an override.
    """
    base, finetuned = base.float(), finetuned.float()
    delta = finetuned - base
    bad = _bits(base + delta) != _bits(finetuned)
    if not bad.any():  # the usual case: no index or value pass needed
        return delta, torch.zeros(0, delta.dim(), dtype=torch.long), finetuned.new_empty(0)
    for _ in range(4):
        if not bad.any():
            break
        b, f, d = base[bad], finetuned[bad], delta[bad]
        direction = torch.where(b + d < f, torch.full_like(d, torch.inf), torch.full_like(d, -torch.inf))
        delta[bad] = torch.nextafter(d, direction)
        bad = _bits(base + delta) != _bits(finetuned)
    idx = bad.nonzero()
    return delta, idx, finetuned[bad]
