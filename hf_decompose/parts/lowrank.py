"""Low rank: supported singular directions, ``u @ v`` with the singular values folded into u."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from .base import Part, cast, expect, register_part, row_blocks


@register_part
class LowRankPart(Part):
    """``u`` ``(out, r)`` and ``v`` ``(r, in)``, run as two skinny matmuls (never their product)."""

    kind = "lowrank"
    order = 50
    fields = ("u", "v")

    def __init__(self, u: torch.Tensor, v: torch.Tensor):
        super().__init__((u.shape[0], v.shape[1]))
        self.register_buffer("u", u)
        self.register_buffer("v", v)

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])

    def state(self) -> dict[str, torch.Tensor]:
        return {"u": self.u, "v": self.v}

    @classmethod
    def from_state(cls, shape, tensors):
        u, v = tensors["u"], tensors["v"]
        if len(shape) != 2 or u.dim() != 2 or v.dim() != 2:
            raise ValueError(f"low-rank factors {tuple(u.shape)} and {tuple(v.shape)} do not fit {tuple(shape)}")
        part = cls(u, v)
        part.shape = tuple(shape)
        return part

    def check(self) -> None:
        expect(self.u, (self.shape[0], self.rank), values=True)
        expect(self.v, (self.rank, self.shape[1]), values=True)

    def num_substructures(self) -> int:
        return self.rank  # each supported direction is its own substructure

    def runtime(self, base, rest, lookup=False):
        """Factors stored in another float type than the base's run converted once (the same products as a cast
        per call, which cost two kernels per matrix and step). Outside a lookup, ``u`` is laid out as its
        transpose's rows: the second product then reads a row-major right operand, which took 4.8 us against
        10.8 us at batch 1 (8 x 1536, 2 threads); the values are the same (a kernel may sum in another order)."""
        part = super().runtime(base, rest, lookup)
        if base.is_floating_point() and part.u.dtype != base.dtype:
            part.u, part.v = part.u.to(base.dtype), part.v.to(base.dtype)
        if not lookup:
            part.u = part.u.t().contiguous().t()
        return part

    def kernel_factors(self) -> kernels.Factors | None:
        """The factors as the compiled kernel reads them (float32 on CPU, inputs a multiple of 8), else None."""
        u, v = self.u, self.v
        if u.dtype != torch.float32 or v.dtype != torch.float32 or u.device.type != "cpu" or v.device.type != "cpu" or v.shape[-1] % 8:
            return None
        return kernels.Factors(u.t(), v if v.is_contiguous() else v.contiguous())

    def add_to(self, out: torch.Tensor) -> None:
        v = self.v.float()  # factors may be stored in bfloat16: multiply in float32
        for rows in row_blocks(out):
            out[rows] += self.u[rows].float() @ v

    def forward(self, x: torch.Tensor, lookup: bool = False) -> torch.Tensor:
        if lookup:
            return F.embedding(x, self.u) @ self.v
        return F.linear(F.linear(x, cast(self.v, x.dtype)), cast(self.u, x.dtype))
