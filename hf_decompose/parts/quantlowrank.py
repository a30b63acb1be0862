"""Low-bit low rank: singular directions whose factors are stored in a few bits (Delta-CoMe's mixed
precision: more bits for the leading directions, fewer for the next ones, none for the tail).

``u`` ``(out, r)`` and ``v`` ``(r, in)`` as integer codes (`hf_decompose.quantize`, the full grid from 2
bits up) with one bfloat16 scale per direction, ``u`` stored as the rows of its transpose. A delta
holds one part per bit width (``qlowrank.<i>.*``). At run time `DeltaOps` joins every width's directions in one
module holding their codes one byte each (all are odd, ``2h + 1`` for an int8 ``h``, up to 8 bits; a quarter of
float32 factors' bytes): on CPU the compiled kernel reads them so (`kernels.Factors`); elsewhere (an accelerator,
16-bit inputs) the factors are dequantized once per device and dtype and run as two skinny matmuls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import kernels
from ..quantize import bits_of, codes_of, dequantize, pack_codes, quantize
from .base import Part, cast, expect, register_part, row_blocks


def _times_double(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in float64 for a float64 `b`, `a` cast a block of rows at a time (whole, the float64 copy of the 1.5B
    synthetic Llama's tied embedding delta would be 1.5 GiB); bit for bit the whole product on the shapes checked."""
    return torch.cat([a[rows].double() @ b for rows in row_blocks(a)])


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
            gv = _times_double(gram.to(vq.device), vq.t())  # (in, r): never an (in, in) product
            normal = vq @ gv
            normal += 1e-6 * normal.diagonal().mean().clamp_min(1e-30) * torch.eye(r, dtype=normal.dtype)
            u = torch.linalg.solve(normal, _times_double(target, gv).t()).t().float()
        u_packed, u_scales = quantize(u.t().contiguous(), bits, 0, grid=_grid(bits))
        return cls(codes_of(u_packed, (r, u.shape[0]), _grid(bits)), u_scales, v_codes, scales, bits)

    @classmethod
    def joined(cls, parts: list[QuantLowRankPart]) -> QuantLowRankPart:
        """The directions of `parts` (one matrix's, of any widths) as one part of the widest width (the narrower codes
        lie on its grid too)."""
        cat = lambda name: torch.cat([getattr(p, name).to(torch.int16 if "codes" in name else p.u_scales.dtype) for p in parts])  # noqa: E731
        return cls(cat("u_codes"), cat("u_scales"), cat("v_codes"), cat("v_scales"), max(p.bits for p in parts))

    @property
    def rank(self) -> int:
        return int(self.u_scales.shape[0])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u, v)`` in float32."""
        u_codes, v_codes = self._codes()
        return dequantize(u_codes, self.u_scales).t(), dequantize(v_codes, self.v_scales)

    def _codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes of ``u^T`` and ``v``, from the form the part holds (a run-time part: half codes ``h``, ``2h + 1``)."""
        return self._held("u"), self._held("v")

    def _held(self, factor: str) -> torch.Tensor:
        codes = self._buffers[f"{factor}_codes"]
        return codes if codes is not None else 2 * self._buffers[f"{factor}_half"].to(torch.int16) + 1

    def runtime(self, base, rest, lookup=False):
        """Codes held as int8 half codes ``h`` (``2h + 1``; a quarter of float32 factors' bytes, the compiled kernel's
        `kernels.Factors`), with each direction's two scales multiplied in float32 for the kernel."""
        part = super().runtime(base, rest, lookup)
        for name, codes in zip(("u_half", "v_half"), self._codes()):
            part.register_buffer(name, torch.div(codes.to(torch.int16) - 1, 2, rounding_mode="floor").to(torch.int8), persistent=False)
        part.register_buffer("scale", (self.u_scales.float() * self.v_scales.float()).flatten(), persistent=False)
        part.u_codes = part.v_codes = None
        return part

    def kernel_factors(self) -> kernels.Factors | None:
        """The factors as the compiled kernel reads them (a run-time part's, on CPU, float32 scales), else None."""
        held = self._buffers.get("u_half")
        if held is None or held.device.type != "cpu" or self.scale.dtype != torch.float32 or self.shape[1] % 8:
            return None
        return kernels.Factors(held, self.v_half, self.scale)

    def cost(self) -> int:
        return self.rank * sum(self.shape)

    def forward(self, x: torch.Tensor, lookup: bool = False) -> torch.Tensor:
        if lookup:  # the looked-up rows of u, then v (in the run's dtype: `scale` is cast with the model); u never whole
            codes = self.u_codes.t()[x].float() if self.u_codes is not None else 2 * self.u_half.t()[x].float() + 1
            dtype = self.scale.dtype if self.u_codes is None else torch.float32
            return cast((codes * self.u_scales.float().flatten()) @ dequantize(self._held("v"), self.v_scales).to(x.device), dtype)
        f = self.kernel_factors()
        if f is not None and x.dtype == torch.float32 and x.device.type == "cpu" and kernels.available() and not (x.requires_grad and torch.is_grad_enabled()):
            return kernels.codes_matmul(x.reshape(-1, x.shape[-1]), None, None, factors=(f,)).view(*x.shape[:-1], -1)
        u, v = self._float_factors(x.device, x.dtype)
        return F.linear(F.linear(x, v), u)

    def _float_factors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u, v)`` for PyTorch's matmuls where the kernel does not run (an accelerator, 16-bit inputs, a gradient):
        dequantized once per device and dtype rather than per call (on a GPU, five small kernels more per matrix and
        step), dropped on a move or a cast."""
        cached = self.__dict__.get("_float")
        if cached is None or cached[0] != (device, dtype):
            u, v = self.factors()
            cached = self.__dict__["_float"] = ((device, dtype), u.to(device, dtype), v.to(device, dtype))
        return cached[1], cached[2]

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_float", None)
        return super()._apply(fn, recurse)

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
        for rows in row_blocks(out):
            out[rows] += u[rows] @ v

