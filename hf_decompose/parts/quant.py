"""Low-bit codes: every entry of a matrix delta as a signed integer code times a bfloat16 group scale.

Stored bit-packed (`hf_decompose.quantize`: ``bits`` bits per entry, key ``codes``) or, where that is smaller,
Huffman-coded (about the codes' entropy per entry, key ``codes_huffman``), with scales ``(out, in / group)``
(``scales``, or Huffman-coded ``scales_huffman``) and, for a step quantizer with a step per column, each column's
bfloat16 multiplier (``columns``, ``(in,)``; the kernels multiply the codes' inputs by them); held as int8 codes. At
run time on CPU, codes of at most 4 bits run fused, never building the float matrix: through hf_decompose's compiled
kernel (`hf_decompose.kernels`: rows of a multiple of 16 codes, held four bits each, or after `compact` two bits each
with the rarer codes escaped; products in float32; `run_with_base` runs a split module's base matrix and low-rank factors in the same pass), or
where that kernel is not available, in groups of a multiple of 32 columns (rows a multiple of 16; a wider group as
several of a width the kernel takes, its scale repeated) as an int4-packed copy through PyTorch's dequantize-matmul
kernel (products in bfloat16; float16 inputs stay float16). That copy is then all the run-time part holds; an
embedding unpacks the rows it looks up from it (with PyTorch's kernel, from its codes bit-packed per row, kept
beside the int4 copy). Other codes run the reference ``x @ dequantize(codes, scales)^T`` (a float32 matrix per call).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..quantize import bits_of, codes_of, dequantize, huffman_code, huffman_codes_of, huffman_scales, huffman_scales_of, pack_codes, row_codes
from .base import Part, cast, expect, register_part, row_blocks
from .lowrank import LowRankPart
from .quantlowrank import QuantLowRankPart

KERNEL_CODES = ("kernel_codes", "escapes", "escape_offsets", "code_signs")  # buffers of the codes in the compiled kernel's layout (`kernels.HeldCodes`)


@register_part
class QuantPart(Part):
    kind = "quant"
    order = 60
    fields = ("codes", "codes_huffman", "scales", "scales_huffman", "columns")
    optional = frozenset(fields)  # codes and scales each in one of two forms; columns only where a step is per column
    FUSED_GROUPS = (32, 64, 128, 256)
    grid = "signed"  # the codes' grid (`hf_decompose.quantize`)

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bits: int, columns: torch.Tensor | None = None):
        super().__init__(codes.shape)
        self.bits = bits
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("columns", columns)  # bfloat16 (in,): each column's step multiplier, or None (all 1)
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
            coded = huffman_code(self.codes, self.bits, self.grid) if self.bits > 1 else None
            packed_bytes = math.ceil(self.codes.numel() * self.bits / 8)  # packed only where it is the form kept
            codes = {"codes_huffman": coded} if coded is not None and coded.numel() < packed_bytes else {"codes": pack_codes(self.codes, self.bits, self.grid)}
            scales = huffman_scales(self.scales)
            self._stored = codes | ({"scales_huffman": scales} if scales.numel() < self.scales.numel() * 2 else {"scales": self.scales})
            if self.columns is not None:
                self._stored["columns"] = self.columns
        return self._stored

    @classmethod
    def from_state(cls, shape, tensors):
        forms = [(tensors["codes"], tensors["codes_huffman"]), (tensors["scales"], tensors["scales_huffman"])]
        columns = tensors.get("columns")
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
        if columns is not None:
            part.columns = columns
        part._stored = {k: t for k, t in tensors.items() if t is not None}
        return part

    def check(self) -> None:
        expect(self.scales, (self.shape[0], self.scales.shape[1]), values=True)
        if self.columns is not None:
            expect(self.columns, (self.shape[1],), values=True)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state().values())

    def num_params(self) -> int:
        return self.codes.numel()

    def add_to(self, out: torch.Tensor) -> None:
        for rows in row_blocks(out):
            out[rows] += dequantize(self.codes[rows], self.scales[rows], self.columns)

    def mark(self, mask: torch.Tensor) -> None:
        mask[...] = True

    def runtime(self, base: torch.Tensor, rest: Callable[[], torch.Tensor], lookup: bool = False) -> Part:
        part = super().runtime(base, rest, lookup)
        part._stored = None  # the stored form stays with the stored part
        codes, scales = self.codes, self.scales
        if codes.device.type != "cpu" or not codes.numel() or int(codes.abs().max()) > 7:
            return part
        fused = next((g for g in reversed(self.FUSED_GROUPS) if self.group % g == 0), None)  # a wider group: its scale repeated
        if kernels.fits(self.shape, self.group) and kernels.available():
            part._hold(kernels.HeldCodes(kernels.pack_nibbles(codes)))
            part.scales = scales.bfloat16().contiguous()  # stored in bfloat16: exact
        elif fused and codes.shape[0] % 16 == 0:
            step = scales.float().repeat_interleave(self.group // fused, 1).t().contiguous()  # (in / fused, out, [scale, zero]): zero 0, codes offset by 8
            packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32) + 8, 1)
            part.register_buffer("packed", packed, persistent=False)
            part.group = fused
            part.register_buffer("scale_zeros", torch.stack([step, torch.zeros_like(step)], -1).bfloat16(), persistent=False)
        else:
            return part
        if part.columns is not None:
            part.columns = part.columns.float()  # as the kernels read them
        if lookup and "packed" in part._buffers:  # rows are looked up in their stored bit-packing (rows of a multiple of 32 codes end on a byte)
            part.register_buffer("rows", pack_codes(codes, self.bits, self.grid).view(self.shape[0], -1), persistent=False)
        part.codes = None  # the fused copy is all the forward reads
        return part

    def _apply(self, fn, recurse=True):
        """Moved to another device, a fused copy (a CPU kernel's layout) gives way to the int8 codes it holds
        (to the meta device, as Accelerate offloads, it stays: it comes back with the weights)."""
        super()._apply(fn, recurse)
        fused = self._fused_copy()
        if fused is not None and fused.device.type not in ("cpu", "meta"):
            if self.codes is None:
                self.codes = self._held_codes().to(fused.device)
            for name in (*KERNEL_CODES, "packed", "scale_zeros", "rows"):
                self._buffers.pop(name, None)
        return self

    def _fused_copy(self) -> torch.Tensor | None:
        return self._buffers.get("kernel_codes", self._buffers.get("packed"))

    def compact(self) -> None:
        """Hold the codes in the compiled kernel's smallest layout (`kernels.pack`): annealing's codes a bit each
        marking -1 and 1, a sign bit for those and a list of the rarer ones (1.41 bits a code in the default tie
        artifact's embedding, 1.74 in most of its layers, against 4), for about twice the kernel's decoding work. A
        model serving many fine-tunes holds each one's so; one split model, four bits."""
        held = self.kernel_layout()
        if held is not None and held.escapes is None:
            self._hold(kernels.pack(kernels.unpack(held)))

    def _hold(self, held: kernels.HeldCodes) -> None:
        """Hold codes in the kernel's layout as non-persistent buffers; a layout's absent tensors are no buffers at all
        (Accelerate's offloading moves every non-persistent buffer, and a None one failed it)."""
        for name, t in zip(KERNEL_CODES, held):
            if t is None:
                self._buffers.pop(name, None)
                self._non_persistent_buffers_set.discard(name)
            else:
                self.register_buffer(name, t, persistent=False)

    def kernel_layout(self) -> kernels.HeldCodes | None:
        """The codes in the compiled kernel's layout, where the part holds them so."""
        return kernels.HeldCodes(*(self._buffers.get(name) for name in KERNEL_CODES)) if "kernel_codes" in self._buffers else None

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The int8 codes of rows `ids` (an embedding's lookup), unpacked from the form the part holds."""
        if self.codes is not None:
            return self.codes[ids]
        if "kernel_codes" in self._buffers:
            return kernels.unpack(self.kernel_layout(), ids.flatten()).view(*ids.shape, -1)
        return row_codes(self.rows[ids], self.bits, self.grid)

    def _held_codes(self) -> torch.Tensor:
        """The int8 codes, from whichever form the part holds them in."""
        if self.codes is not None:
            return self.codes
        if "kernel_codes" in self._buffers:
            return kernels.unpack(self.kernel_layout())
        return _int4_codes(self.packed.cpu(), self.group, self.shape)

    def kernel_columns(self) -> torch.Tensor | None:
        """The columns' step multipliers as the compiled kernel reads them (float32), or None."""
        return None if self.columns is None else cast(self.columns, torch.float32)

    def cost(self) -> int:
        return math.prod(self.shape)

    def fused(self, x: torch.Tensor) -> bool:
        """Whether ``x`` runs through a fused kernel (`matmul`; no gradient flows through those)."""
        fused = self._fused_copy()
        return fused is not None and x.device.type == "cpu" and fused.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled())

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat @ dequantize(codes)^T`` through the fused kernel, for rows `flat` ``(rows, in)``, in their dtype."""
        if "kernel_codes" in self._buffers:
            return cast(kernels.codes_matmul(cast(flat, torch.float32), self.kernel_layout(), self.scales, columns=self.kernel_columns()), flat.dtype)
        x = flat if self.columns is None else flat * self.columns  # the codes' inputs
        x = cast(x, fused_dtype(flat)).contiguous()  # the kernel needs it contiguous: a bfloat16 model's head gets a view of the last positions
        return cast(torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group, cast(self.scale_zeros, x.dtype)), flat.dtype)

    def forward(self, x: torch.Tensor, lookup: bool = False) -> torch.Tensor:
        if lookup:
            return dequantize(self._rows(x), self.scales[x], self.columns)
        if self.fused(x):
            return self.matmul(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.shape[0])
        return F.linear(x, cast(dequantize(self._held_codes().to(x.device), self.scales, self.columns), x.dtype))


def kernel_base(base: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a base the compiled kernel can run on ``x``: a float32 `nn.Linear` on CPU with a contiguous
    weight, float32 inputs on CPU, no gradient needed (the kernel has no backward); otherwise None."""
    if type(base) is not nn.Linear or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    w, b = base.weight, base.bias
    if w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous() or (b is not None and b.dtype != torch.float32):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return None
    return w.detach(), None if b is None else b.detach()


def kernel_parts(parts: list[Part]) -> tuple[kernels.HeldCodes | None, torch.Tensor | None, torch.Tensor | None, tuple[kernels.Factors, ...]] | None:
    """(codes, scales, columns, factors) of parts the compiled kernel runs (`kernels.codes_matmul`), on CPU: at most one
    `QuantPart` in the kernel's layout (else codes, scales and columns None; columns None where its steps are per row
    alone) and at most two sets of low-rank factors (`LowRankPart.kernel_factors`, `QuantLowRankPart.kernel_factors`);
    otherwise None."""
    codes = scales = columns = None
    factors = []
    for part in parts:
        held = part.kernel_layout() if isinstance(part, QuantPart) and codes is None else None
        if held is not None and held.q.device.type == "cpu":
            codes, scales, columns = held, part.scales, part.kernel_columns()
            continue
        f = part.kernel_factors() if isinstance(part, (LowRankPart, QuantLowRankPart)) else None
        if f is None:
            return None
        factors.append(f)
    if not parts or len(factors) > 2 or (codes is None and not kernels.available()):
        return None
    return codes, scales, columns, tuple(factors)


def run_with_base(base: nn.Module, parts: list[Part], x: torch.Tensor) -> torch.Tensor | None:
    """``base(x)`` plus the parts' contributions in one pass of the compiled kernel, where it runs them all (a base it
    runs, `kernel_base`, and parts it runs, `kernel_parts`; otherwise None)."""
    weights = kernel_base(base, x)
    return None if weights is None else run_with_weight(*weights, parts, x)


def run_with_weight(weight: torch.Tensor, bias: torch.Tensor | None, parts: list[Part], x: torch.Tensor) -> torch.Tensor | None:
    """``x @ weight^T + bias`` plus the parts' contributions in one pass of the compiled kernel (a float32 contiguous
    weight on CPU, as `kernel_base` gives), where it runs the parts (`kernel_parts`); otherwise None."""
    args = kernel_parts(parts)
    if args is None:
        return None
    codes, scales, columns, factors = args
    y = kernels.codes_matmul(x.reshape(-1, x.shape[-1]), codes, scales, weight, factors, bias, columns)
    return y.view(*x.shape[:-1], -1)


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
