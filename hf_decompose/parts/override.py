"""Override: entries stored as their absolute fine-tuned values, not as a difference to the base.

Indexed (``indices`` ``(k, ndim)`` and ``values`` ``(k,)``): entries whose float32 difference does not
reproduce the fine-tune exactly. Whole (``values`` of the tensor's shape, no indices): a 16-bit fine-tune's
own tensor, where a delta would cost more bytes than it. Written last when merging; at run time, the
correction to the base plus the other parts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import Part, expect, in_range, register_part
from .dense import DensePart
from .sparse import SparsePart


@register_part
class OverridePart(Part):
    kind = "override"
    order = 40
    fields = ("indices", "values")
    optional = frozenset({"indices"})
    additive = False

    def __init__(self, values: torch.Tensor, indices: torch.Tensor | None, shape: tuple[int, ...]):
        super().__init__(shape)
        self.register_buffer("indices", None if indices is None else indices.long())
        self.register_buffer("values", values)

    @property
    def replaces_all(self) -> bool:
        return self.indices is None

    def state(self) -> dict[str, torch.Tensor]:
        return {"values": self.values} if self.indices is None else {"indices": self.indices, "values": self.values}

    @classmethod
    def from_state(cls, shape, tensors):
        return cls(tensors["values"], tensors["indices"], shape)

    def check(self) -> None:
        if self.indices is None:
            expect(self.values, self.shape, values=True)
            return
        k = self.values.numel()
        expect(self.indices, (k, len(self.shape)), values=False)
        expect(self.values, (k,), values=True)
        for index, bound in zip(self.indices.t(), self.shape):
            in_range(index, bound)

    def num_params(self) -> int:
        return self.values.numel() if self.replaces_all else 0  # an indexed entry is counted where it is kept

    def num_substructures(self) -> int:
        return 0

    def add_to(self, out: torch.Tensor) -> None:
        """Not additive: `write` puts the values in place."""

    def write(self, view: torch.Tensor) -> None:
        """Set the overridden entries of `view` (the merged tensor, canonical layout)."""
        if self.indices is None:
            view.copy_(self.values.to(view.device))
        else:
            view[tuple(self.indices.t().to(view.device))] = self.values.to(view.device, view.dtype)

    def mark(self, mask: torch.Tensor) -> None:
        if self.indices is None:
            mask[...] = True
        else:
            mask[tuple(self.indices.t())] = True

    def runtime(self, base: torch.Tensor, rest: Callable[[], torch.Tensor], lookup: bool = False) -> Part:
        """The correction on top of the base and the other parts: dense for a whole tensor, else sparse entries."""
        base = base.detach().float().cpu()
        if self.indices is None:
            return DensePart(self.values.float() - base - rest())
        at = tuple(self.indices.t())
        return SparsePart(at[0], at[1], self.values - base[at] - rest()[at], self.shape)
