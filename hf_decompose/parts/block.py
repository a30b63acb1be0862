"""Block: a dense block of the delta on a set of rows x a set of columns (a connected component of its support)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Part, cast, expect, in_range, register_part


@register_part
class BlockPart(Part):
    """``values`` on sorted ``rows`` x ``cols`` of a matrix of `shape`."""

    kind = "block"
    order = 20
    fields = ("rows", "cols", "values")
    numbered = True

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]):
        super().__init__(shape)
        rows, cols = rows.long(), cols.long()
        if rows.numel() > 1 and values.dim() == 2 and values.shape[0] == rows.numel() and not bool((rows[1:] > rows[:-1]).all()):
            rows, perm = rows.sort()
            values = values[perm]
        self.register_buffer("rows", rows)
        self.register_buffer("cols", cols)
        self.register_buffer("values", values)

    def state(self) -> dict[str, torch.Tensor]:
        return {"rows": self.rows, "cols": self.cols, "values": self.values}

    @classmethod
    def from_state(cls, shape, tensors):
        if len(shape) != 2:
            raise ValueError(f"a block of a tensor of shape {tuple(shape)}")
        return cls(tensors["rows"], tensors["cols"], tensors["values"], shape)

    def check(self) -> None:
        expect(self.rows, (self.rows.numel(),), values=False)
        expect(self.cols, (self.cols.numel(),), values=False)
        expect(self.values, (self.rows.numel(), self.cols.numel()), values=True)
        in_range(self.rows, self.shape[0])
        in_range(self.cols, self.shape[1])

    def add_to(self, out: torch.Tensor) -> None:
        out[self.rows[:, None], self.cols[None, :]] += self.values.float()

    def mark(self, mask: torch.Tensor) -> None:
        mask[self.rows[:, None], self.cols[None, :]] = True

    def forward(self, x: torch.Tensor, lookup: bool = False) -> torch.Tensor:
        if lookup:
            pos = torch.searchsorted(self.rows, x).clamp_(max=self.rows.numel() - 1)
            found = F.embedding(pos, self.values) * (self.rows[pos] == x).unsqueeze(-1)
            return found.new_zeros(*x.shape, self.shape[1]).index_copy_(-1, self.cols, found)
        y = F.linear(x.index_select(-1, self.cols), cast(self.values, x.dtype))
        return y.new_zeros(*x.shape[:-1], self.shape[0]).index_copy_(-1, self.rows, y)
