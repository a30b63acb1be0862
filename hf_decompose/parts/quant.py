"""Low-bit codes: every entry of a matrix delta as a signed integer code times a bfloat16 group scale.

Stored bit-packed (`hf_decompose.quantize`: ``bits`` bits per entry, key ``codes``) or, where that is smaller,
Huffman-coded (about the codes' entropy per entry, key ``codes_huffman``), with scales ``(out, in / group)``
(``scales``, or Huffman-coded ``scales_huffman``); held as int8 codes. At run time on CPU, codes of at most 4
bits in groups of a multiple of 32 columns (rows a multiple of 16; a group wider than 256 as several of a width
the kernel takes, its scale repeated) run as an int4-packed copy through PyTorch's fused dequantize-matmul
kernel, which reads the packed codes and never builds the float matrix: the product is computed in bfloat16
(float16 inputs stay float16), within bfloat16 rounding of ``x @ dequantize(codes, scales)^T``. That copy is
then all the run-time part holds (half a byte per entry); an embedding also keeps its codes bit-packed per row,
and unpacks the rows it looks up.
Other codes run that reference (a float32 matrix per call).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..quantize import bits_of, codes_of, dequantize, huffman_code, huffman_codes_of, huffman_scales, huffman_scales_of, pack_codes, row_codes
from .base import Part, cast, expect, register_part


@register_part
class QuantPart(Part):
    kind = "quant"
    order = 60
    fields = ("codes", "codes_huffman", "scales", "scales_huffman")
    optional = frozenset(fields)  # codes and scales each in one of two forms
    FUSED_GROUPS = (32, 64, 128, 256)
    grid = "signed"  # the codes' grid (`hf_decompose.quantize`)

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bits: int):
        super().__init__(codes.shape)
        self.bits = bits
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.group = codes.shape[-1] // max(scales.shape[-1], 1)
        self._stored: dict[str, torch.Tensor] | None = None  # the stored form, once stored or read

    @classmethod
    def from_packed(cls, packed: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...]) -> QuantPart:
        """From `quantize`'s packed codes and scales."""
        cls._check_packed(packed, scales, shape)
        return cls(codes_of(packed, shape), scales, bits_of(packed, shape))

    @staticmethod
    def _check_packed(packed: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...]) -> None:
        if packed.dtype != torch.uint8:
            raise ValueError(f"quantized codes are {packed.dtype}, expected packed uint8")
        if len(shape) != 2 or scales.dim() != 2 or scales.shape[1] == 0 or shape[1] % scales.shape[1]:
            raise ValueError(f"quantization scales of shape {tuple(scales.shape)} do not divide {tuple(shape)}")

    def state(self) -> dict[str, torch.Tensor]:
        """Codes and scales each in the smaller of their forms: bit-packed or Huffman-coded codes (one-bit codes stay
        packed: signs are near-uniform), bfloat16 or Huffman-coded scales."""
        if self._stored is None:
            packed = pack_codes(self.codes, self.bits, self.grid)
            coded = huffman_code(self.codes, self.bits, self.grid) if self.bits > 1 else packed
            scales = huffman_scales(self.scales)
            self._stored = ({"codes_huffman": coded} if coded.numel() < packed.numel() else {"codes": packed}) | (
                {"scales_huffman": scales} if scales.numel() < self.scales.numel() * 2 else {"scales": self.scales})
        return self._stored

    @classmethod
    def from_state(cls, shape, tensors):
        forms = [(tensors["codes"], tensors["codes_huffman"]), (tensors["scales"], tensors["scales_huffman"])]
        if any((plain is None) == (coded is None) for plain, coded in forms):
            raise ValueError("a quantized part stores its codes and its scales each in exactly one form, plain or Huffman-coded")
        (packed, coded), (scales, coded_scales) = forms
        if len(shape) != 2:
            raise ValueError(f"quantized codes of a tensor of shape {tuple(shape)}: a matrix expected")
        if scales is None:
            scales = huffman_scales_of(coded_scales, shape)
        if packed is not None:
            part = cls.from_packed(packed, scales, shape)
        else:
            cls._check_packed(coded, scales, shape)
            codes, bits = huffman_codes_of(coded, shape, cls.grid)
            part = cls(codes, scales, bits)
        part._stored = {k: t for k, t in tensors.items() if t is not None}
        return part

    def check(self) -> None:
        expect(self.scales, (self.shape[0], self.scales.shape[1]), values=True)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state().values())

    def num_params(self) -> int:
        return self.codes.numel()

    def add_to(self, out: torch.Tensor) -> None:
        out += dequantize(self.codes, self.scales)

    def mark(self, mask: torch.Tensor) -> None:
        mask[...] = True

    def runtime(self, base: torch.Tensor, rest: Callable[[], torch.Tensor], lookup: bool = False) -> Part:
        part = super().runtime(base, rest, lookup)
        part._stored = None  # the stored form stays with the stored part
        codes, scales = self.codes, self.scales
        fused = next((g for g in reversed(self.FUSED_GROUPS) if self.group % g == 0), None)  # a wider group: its scale repeated
        if codes.device.type == "cpu" and fused and codes.shape[0] % 16 == 0 and codes.numel() and int(codes.abs().max()) <= 7:
            step = scales.float().repeat_interleave(self.group // fused, 1).t().contiguous()  # (in / fused, out, [scale, zero]): zero 0, codes offset by 8
            packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32) + 8, 1)
            part.register_buffer("packed", packed, persistent=False)
            part.group = fused
            part.register_buffer("scale_zeros", torch.stack([step, torch.zeros_like(step)], -1).bfloat16(), persistent=False)
            if lookup:  # rows are looked up in their stored bit-packing (rows of a multiple of 32 codes end on a byte)
                part.register_buffer("rows", pack_codes(codes, self.bits, self.grid).view(self.shape[0], -1), persistent=False)
            part.codes = None  # the packed copies are all the forward reads
        return part

    def _apply(self, fn, recurse=True):
        """Moved to another device, the int4 copy (a CPU kernel's layout) gives way to the int8 codes it holds
        (to the meta device, as Accelerate offloads, it stays: it comes back with the weights)."""
        super()._apply(fn, recurse)
        if "packed" in self._buffers and self.packed.device.type not in ("cpu", "meta"):
            if self.codes is None:
                self.codes = _int4_codes(self.packed.cpu(), self.group, self.shape).to(self.packed.device)
            for name in ("packed", "scale_zeros", "rows"):
                self._buffers.pop(name, None)
        return self

    def cost(self) -> int:
        return math.prod(self.shape)

    def fused(self, x: torch.Tensor) -> bool:
        """Whether ``x`` runs through the packed int4 kernel."""
        return "packed" in self._buffers and x.device.type == "cpu" and self.packed.device.type == "cpu"

    def fused_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat @ dequantize(codes)^T`` through the int4 kernel: `flat` ``(rows, in)`` already in `fused_dtype` (the
        kernel needs it contiguous: a bfloat16 model's head gets a view of the last positions)."""
        return torch._weight_int4pack_mm_for_cpu(flat.contiguous(), self.packed, self.group, cast(self.scale_zeros, flat.dtype))

    def forward(self, x: torch.Tensor, lookup: bool = False) -> torch.Tensor:
        if lookup:
            codes = self.codes[x] if self.codes is not None else row_codes(self.rows[x], self.bits, self.grid)
            return dequantize(codes, self.scales[x])
        if self.fused(x):
            flat = x.reshape(-1, x.shape[-1]).to(fused_dtype(x))
            return self.fused_matmul(flat).to(x.dtype).reshape(*x.shape[:-1], self.shape[0])
        codes = self.codes if self.codes is not None else _int4_codes(self.packed.cpu(), self.group, self.shape).to(x.device)
        return F.linear(x, cast(dequantize(codes, self.scales), x.dtype))


def fused_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the int4 kernel multiplies `x` in: its own if 16-bit, else bfloat16."""
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def _int4_codes(packed: torch.Tensor, group: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The int8 codes ``(out, in)`` an int4-packed CPU copy holds: the fused kernel run on the identity with unit
    scales (small integers, exact in bfloat16)."""
    n_out, n_in = shape
    unit = torch.stack([torch.ones(n_in // group, n_out), torch.zeros(n_in // group, n_out)], -1).bfloat16()
    eye = torch.eye(n_in, dtype=torch.bfloat16)
    return torch._weight_int4pack_mm_for_cpu(eye, packed, group, unit).t().round().to(torch.int8).contiguous()
