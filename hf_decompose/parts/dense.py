"""Dense: the whole delta of a tensor, every entry stored."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Part, cast, expect, register_part, row_blocks


@register_part
class DensePart(Part):
    kind = "dense"
    order = 10
    fields = ("",)

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape)
        self.register_buffer("weight", weight)

    def state(self) -> dict[str, torch.Tensor]:
        return {"": self.weight}

    @classmethod
    def from_state(cls, shape, tensors):
        return cls(tensors[""])

    def check(self) -> None:
        expect(self.weight, self.shape, values=True)

    def add_to(self, out: torch.Tensor) -> None:
        for rows in row_blocks(out):
            out[rows] += self.weight[rows].float()

    def mark(self, mask: torch.Tensor) -> None:
        mask |= self.weight != 0

    def forward(self, x: torch.Tensor, lookup: bool = False) -> torch.Tensor:
        return F.embedding(x, self.weight) if lookup else F.linear(x, cast(self.weight, x.dtype))
