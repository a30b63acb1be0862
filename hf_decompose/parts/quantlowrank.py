"""Low-bit low rank: singular directions whose factors are stored in a few bits (Delta-CoMe's mixed
precision: more bits for the leading directions, fewer for the next ones, none for the tail).

``u`` ``(out, r)`` and ``v`` ``(r, in)`` as integer codes (`hf_decompose.quantize`, the full grid from 2
bits up) with one bfloat16 scale per direction, ``u`` stored as the rows of its transpose. A delta
holds one part per bit width (``qlowrank.<i>.*``). At run time `DeltaOps` dequantizes every width's
factors once and runs them as one `lowrank` module (two skinny matmuls, float32 factors).
"""

from __future__ import annotations

import math

import torch

from ..quantize import bits_of, codes_of, dequantize, pack_codes, quantize
from .base import Part, expect, register_part


def _grid(bits: int) -> str:
    return "full" if bits > 1 else "signed"  # one bit is the same on both grids


@register_part
class QuantLowRankPart(Part):
    kind = "qlowrank"
    order = 55
    fields = ("u_codes", "u_scales", "v_codes", "v_scales")
    numbered = True

    def __init__(self, u_codes: torch.Tensor, u_scales: torch.Tensor, v_codes: torch.Tensor, v_scales: torch.Tensor, bits: int):
        super().__init__((u_codes.shape[1], v_codes.shape[1]))
        self.bits = bits
        for name, t in (("u_codes", u_codes), ("u_scales", u_scales), ("v_codes", v_codes), ("v_scales", v_scales)):
            self.register_buffer(name, t)

    @classmethod
    def quantize(cls, u: torch.Tensor, v: torch.Tensor, bits: int, gram: torch.Tensor | None = None, target: torch.Tensor | None = None) -> QuantLowRankPart:
        """Factors ``u`` ``(out, r)``, ``v`` ``(r, in)`` in `bits` bits, a scale per direction. With the inputs'
        `gram` and the delta `target` the factors approximate, ``u`` is refit to the rounded ``v`` (least squares
        on the calibration inputs) before it is rounded. (Rounding ``v`` with error feedback too lowered the
        output error by 8-20% more at 40x the time, too slow for the many levels annealing builds.)"""
        r = v.shape[0]
        packed, scales = quantize(v, bits, 0, grid=_grid(bits))
        v_codes = codes_of(packed, tuple(v.shape), _grid(bits))
        if gram is not None and target is not None:
            vq = dequantize(v_codes, scales).double()
            gv = gram.double().to(vq.device) @ vq.t()  # (in, r): never an (in, in) product
            normal = vq @ gv
            normal += 1e-6 * normal.diagonal().mean().clamp_min(1e-30) * torch.eye(r, dtype=normal.dtype)
            u = torch.linalg.solve(normal, (target.double() @ gv).t()).t().float()
        u_packed, u_scales = quantize(u.t().contiguous(), bits, 0, grid=_grid(bits))
        return cls(codes_of(u_packed, (r, u.shape[0]), _grid(bits)), u_scales, v_codes, scales, bits)

    @property
    def rank(self) -> int:
        return int(self.v_codes.shape[0])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u, v)`` in float32."""
        return dequantize(self.u_codes, self.u_scales).t(), dequantize(self.v_codes, self.v_scales)

    def state(self) -> dict[str, torch.Tensor]:
        grid = _grid(self.bits)
        return {"u_codes": pack_codes(self.u_codes, self.bits, grid), "u_scales": self.u_scales,
                "v_codes": pack_codes(self.v_codes, self.bits, grid), "v_scales": self.v_scales}

    @classmethod
    def from_state(cls, shape, tensors):
        u_scales, v_scales = tensors["u_scales"], tensors["v_scales"]
        if len(shape) != 2 or u_scales.dim() != 2 or v_scales.dim() != 2 or u_scales.shape != v_scales.shape or u_scales.shape[1] != 1:
            raise ValueError(f"low-bit low-rank scales {tuple(u_scales.shape)} and {tuple(v_scales.shape)} do not fit {tuple(shape)}")
        r = u_scales.shape[0]
        bits = bits_of(tensors["u_codes"], (r, shape[0]))
        if bits_of(tensors["v_codes"], (r, shape[1])) != bits:
            raise ValueError("low-bit low-rank factors stored in two bit widths")
        grid = _grid(bits)
        return cls(codes_of(tensors["u_codes"], (r, shape[0]), grid), u_scales, codes_of(tensors["v_codes"], (r, shape[1]), grid), v_scales, bits)

    def check(self) -> None:
        expect(self.u_scales, (self.rank, 1), values=True)
        expect(self.v_scales, (self.rank, 1), values=True)

    def nbytes(self) -> int:
        return math.ceil(self.rank * self.shape[0] * self.bits / 8) + math.ceil(self.rank * self.shape[1] * self.bits / 8) + 2 * 2 * self.rank

    def num_params(self) -> int:
        return self.rank * sum(self.shape)

    def num_substructures(self) -> int:
        return self.rank

    def add_to(self, out: torch.Tensor) -> None:
        u, v = self.factors()
        out += u @ v

