"""Low-bit storage of a delta: symmetric integer codes with one bfloat16 scale per row group.

A matrix ``(out, in)`` is cut into groups of at most `group` input columns (``group=0``: whole rows); each
group's values are divided by its scale and rounded to the nearest code of a grid, so the error is
at most half a step. Two grids:

- ``signed`` (the first format): the integers ``-qmax..qmax`` (``qmax = 2^(bits-1) - 1``) with
  scale ``absmax / qmax``; it leaves one of the ``2^bits`` codes unused, which at 2 bits is a
  quarter of them (3 levels: -1, 0, 1).
- ``step`` (`quantize`'s `step`): the uniform quantizer of entropy coding: one scale per row, `step` times the
  row's RMS, the signed integers up to ``qmax`` (4 bits: +-7, so codes run through the fused 4-bit kernels; values
  beyond 7 steps are clipped). Its rate follows the step, not the width: Huffman-coded, a Gaussian row costs about
  ``2.05 - log2(step)`` bits of entropy per entry (Huffman-coded at step 1.7: ~1.5 bits) and no group scales
  (3 bits with a bfloat16 scale per 64 entries spend a quarter bit on scales). Its step may also differ per column
  (`column_steps`: coarser where an input is small), a bfloat16 multiplier per column, and per row beyond the RMS
  (`row_steps`, also on the absmax grid: an output head's rows coarser for tokens far from the top), kept in its scale.
- ``full``: every code used, the odd integers ``-(2^bits - 1)..2^bits - 1`` (2 bits: -3, -1, 1, 3),
  with the scale (half a step) whose rounding error is smallest among clipped absmax candidates
  (outliers clipped where that lowers the group's error, as GPTQ's and AWQ's clip searches do).

Codes are stored offset to unsigned (``c + qmax``, or ``(c + 2^bits - 1) / 2``) and bit-packed:
``bits`` bits per value, little-endian, in one uint8 stream; or, where it is smaller, Huffman-coded
(`huffman_code`: ``8 // bits`` codes to a symbol, DEFLATE with Huffman coding only, in the standard library's
zlib), which stores each code in about its entropy (3-bit codes of Gaussian values on the signed grid: ~2.4 bits) and
changes no value; scales likewise (`huffman_scales`: about half their 16 bits). One bit is the same in both grids
(BitDelta's sign codes): ``sign(x)`` as 0 / 1 with the group's mean ``|x|`` as its scale (the
least-squares scale of sign codes); zero rounds to +1.

With the Gram ``H = X^T X`` of the matrix's inputs, columns are rounded one at a time and each
column's rounding error is pushed onto the columns not yet rounded through ``H^-1`` (optimal brain
surgeon updates, as in GPTQ), so the error of the outputs ``||(W - Q) X^T||`` is what shrinks.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from . import kernels

BITS = (1, 2, 3, 4, 5, 6, 8)
GRIDS = ("signed", "full")
CLIPS = tuple(1.0 - 0.05 * i for i in range(12))  # the clipped absmax candidates of the full grid's scale search


def group_size(shape: tuple[int, ...], group: int) -> int:
    """The group actually used: the largest divisor of the row of at most `group` entries (a 576-wide row
    in groups of 128 uses groups of 96), the whole row for ``group=0``."""
    n = shape[-1]
    return next((g for g in range(min(group, n), 0, -1) if n % g == 0), n) if group else n


def quantize(values: torch.Tensor, bits: int, group: int = 0, gram: torch.Tensor | Feedback | None = None, grid: str = "signed",
             step: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, scales ``(out, in / group)`` in bfloat16) of a canonical ``(out, in)`` tensor
    on `grid`; with `gram` (the inputs' ``X^T X``, or its `Feedback` made once for many calls), rounding errors
    are compensated on the columns to come.
    `step`: on the signed grid, one scale per row of `step` times its RMS (`group` must be 0).
    Computed on `values`' device (`gram` moved there); the results are on CPU."""
    codes, scales = quantize_codes(values, bits, group, gram, grid, step)
    return pack_codes(codes, bits, grid), scales


def quantize_codes(values: torch.Tensor, bits: int, group: int = 0, gram: torch.Tensor | Feedback | None = None, grid: str = "signed",
                   step: float | None = None, overwrite: bool = False, row_steps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize` with the signed codes unpacked (int8; int16 for 8 bits on the full grid), as `codes_of` reads them.
    `overwrite`: float32 `values` may be overwritten by error feedback (the caller's scratch), not copied first.
    `row_steps`: on the signed grid of 2 bits and more, each row's scales multiplied by its entry (``(out,)``, positive):
    its step, stored in its scales."""
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not one of {BITS}")
    if grid not in GRIDS:
        raise ValueError(f"grid={grid!r} is not one of {GRIDS}")
    if step is not None and (group or grid != "signed" or bits == 1 or not step > 0):
        raise ValueError(f"a step quantizer (step={step}) takes one positive step per row on the signed grid, at least 2 bits")
    out, n_in = values.shape
    if row_steps is not None and (grid != "signed" or bits == 1 or row_steps.shape != (out,) or not bool((row_steps > 0).all())):
        raise ValueError(f"row_steps take the signed grid of 2 bits or more and one positive multiplier per row ({out}); got {tuple(row_steps.shape)}"
                         f" with {bits} bits on the {grid} grid")
    g = group_size(values.shape, group)
    grid_ = _Grid(bits, grid, step, None if row_steps is None else row_steps.to(values.device, torch.float32))
    if gram is not None:
        feedback = gram if isinstance(gram, Feedback) else Feedback.of(gram.to(values.device))
        w = values.float()
        codes, scales = _error_feedback(w if overwrite or w is not values else w.clone(), feedback, grid_, g)
    else:
        x = values.float().reshape(out, n_in // g, g)
        scales = grid_.scales(x)
        codes = grid_.round(x, scales.float()).reshape(out, n_in)
    return codes.cpu().to(_codes_dtype(bits, grid)), scales.reshape(out, n_in // g).contiguous().cpu()


class _Grid:
    """The codes of `bits` bits on a grid: rounding, scales, and the unsigned stored form."""

    def __init__(self, bits: int, grid: str, step: float | None = None, rows: torch.Tensor | None = None):
        self.bits, self.full, self.step, self.rows = bits, grid == "full" or bits == 1, step, rows
        self.qmax = 2**bits - 1 if self.full else 2 ** (bits - 1) - 1  # the largest code

    def round(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.bits == 1:
            return self.nearest(x)
        return self.nearest(torch.where(scale > 0, x / scale.clamp_min(1e-38), torch.zeros_like(x)))

    def nearest(self, y: torch.Tensor) -> torch.Tensor:
        """The grid's code nearest to `y` (values in steps; one bit: the sign of the value)."""
        if self.bits == 1:
            return torch.where(y >= 0, 1.0, -1.0)
        if self.full:  # the nearest odd integer
            return (2 * torch.floor(y / 2) + 1).clamp_(-self.qmax, self.qmax)
        return y.round().clamp_(-self.qmax, self.qmax)

    def scales(self, x: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """Per group (last dim) of `x`: the mean magnitude (one bit), `step` x the RMS (a step quantizer) or absmax /
        qmax (signed), either times the multipliers of `rows` (the matrix rows `x` holds) where the grid has them, or the
        clipped absmax / qmax of smallest rounding error (full)."""
        if self.bits == 1:
            return x.abs().mean(-1, keepdim=True).bfloat16()
        if not self.full:
            scale = self.step * x.square().mean(-1, keepdim=True).sqrt() if self.step is not None else x.abs().amax(-1, keepdim=True) / self.qmax
            return (scale if self.rows is None else scale * self.rows[rows].reshape(-1, *[1] * (x.dim() - 1))).bfloat16()
        amax = x.abs().amax(-1, keepdim=True)
        best, best_err = None, None
        for clip in CLIPS:
            scale = (amax * clip / self.qmax).bfloat16()
            err = (self.round(x, scale.float()) * scale.float() - x).square().sum(-1, keepdim=True)
            if best is None:
                best, best_err = scale, err
            else:
                better = err < best_err
                best, best_err = torch.where(better, scale, best), torch.where(better, err, best_err)
        return best

    def unsigned(self, codes: torch.Tensor) -> torch.Tensor:
        return ((codes + self.qmax) / 2 if self.full else codes + self.qmax).to(torch.uint8)


@dataclass(frozen=True)
class Feedback:
    """What error feedback needs of a Gram ``H = X^T X``: the upper Cholesky factor of the damped ``H^-1`` and the
    inputs never seen (zero diagonal), computed once for every quantization of the same matrix's delta."""

    factor: torch.Tensor
    dead: torch.Tensor

    @classmethod
    def of(cls, gram: torch.Tensor, damping: float = 1e-2) -> Feedback:
        """One float64 matrix of the Gram's size on CPU from `IN_PLACE_FROM` inputs (`inverse_cholesky_upper`: an
        8192-wide Gram's 0.5 GiB, where PyTorch's Cholesky and inverse held two); the factor held by rows, as the
        compiled kernel reads it."""
        h = gram.to(torch.float64, copy=True)
        dead = h.diagonal() == 0
        h[dead, dead] = 1.0
        h.diagonal().add_(damping * h.diagonal().mean())
        return cls(inverse_cholesky_upper(h).float().contiguous(), dead)


def column_steps(gram_diagonal: torch.Tensor, power: float, damping: float = 1e-2) -> torch.Tensor:
    """Each column's step multiplier (bfloat16, geometric mean about 1) from the diagonal of the inputs' Gram ``X^T X``:
    ``(H_jj + damping * mean H_jj)^(-power / 2)``, coarser steps where an input is small (AWQ's scaling as a step). A
    column's rounding error weighs ``H_jj`` in the outputs' error (uncorrelated inputs): ``power = 1`` weighs every
    column's error alike (the high-rate optimum); inputs never seen keep 1. The diagonal, not error feedback's
    conditional weights ``[H^-1]_jj``: a second moment per input generalises beyond the calibration prompts (on the
    default pair, the conditional weights let 4 of 192 held-out prompts diverge outside the tie grade, the diagonal 1)."""
    h = gram_diagonal.double()
    seen = h > 0
    c = torch.ones_like(h)
    if seen.any():
        c[seen] = (h[seen] + damping * h.mean()).pow(-power / 2)
        c[seen] /= c[seen].log().mean().exp()
    return c.bfloat16()


def scaled_by_columns(feedback: Feedback, columns: torch.Tensor) -> Feedback:
    """Error feedback for ``w / columns`` (the Gram ``C H C``): the factor's columns divided by `columns`."""
    return Feedback((feedback.factor / columns.float()[None, :]).contiguous(), feedback.dead)


# width from which the float64 factors are computed in the Gram's own memory (LAPACK through scipy: a few ms slower
# than PyTorch's below it, where the second copy is small; 0.26 GiB less at 8192)
IN_PLACE_FROM = 2048


def cholesky_lower(h: torch.Tensor) -> torch.Tensor:
    """L with ``h = L L^T`` for a symmetric positive-definite float64 matrix; on CPU from `IN_PLACE_FROM` wide
    computed in `h`'s memory."""
    if h.device.type != "cpu" or h.shape[0] < IN_PLACE_FROM:
        return torch.linalg.cholesky(h)
    return _lapack_in_place(h, False, "potrf").tril_()


def inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """U with ``h^-1 = U^T U`` for a symmetric positive-definite float64 matrix; on CPU from `IN_PLACE_FROM` wide
    computed in `h`'s memory."""
    if h.device.type != "cpu" or h.shape[0] < IN_PLACE_FROM:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return _lapack_in_place(h, True, "potrf", "potri", "potrf").triu_()


def _lapack_in_place(h: torch.Tensor, lower: bool, *routines: str) -> torch.Tensor:
    """LAPACK's `routines` (``potrf``: Cholesky factor, ``potri``: the inverse from it) on a CPU float64 matrix in
    its own memory (PyTorch's hold a second copy). LAPACK is column-major: they work on `h`'s transpose, the same
    symmetric matrix, in its `lower` triangle, `h`'s upper one where `lower`; returned as `h` sees it, its other
    triangle keeping what `h` held. Raises `torch.linalg.LinAlgError` where the matrix is not positive-definite."""
    from scipy.linalg import lapack

    f = h.numpy().T
    for routine in routines:
        f, info = lapack.dpotrf(f, lower=lower, overwrite_a=1, clean=0) if routine == "potrf" else lapack.dpotri(f, lower=lower, overwrite_c=1)
        if info:
            raise torch.linalg.LinAlgError(f"{routine}: the matrix is not positive-definite (LAPACK info {info})")
    return torch.from_numpy(f.T)


def _error_feedback(w: torch.Tensor, feedback: Feedback, grid: _Grid, g: int, block: int = 128, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-by-column rounding of float32 `w` (overwritten) with the errors spread through the upper Cholesky factor
    of H^-1: in blocks of `block` columns (later blocks updated once per block, GPTQ's lazy batches, `rows` rows at a
    time), within a block a group at a time, each group's scales from its compensated values, its columns by the
    compiled kernel on CPU (`kernels.feedback_columns`) or by PyTorch (`_feedback_columns`, the same codes)."""
    out, n_in = w.shape
    hinv = feedback.factor.to(w.device).contiguous()  # by rows, as the kernel reads it (`Feedback.of` holds it so: no copy)
    w[:, feedback.dead.to(w.device)] = 0.0
    codes = torch.empty(out, n_in, dtype=_codes_dtype(grid.bits, "full" if grid.full else "signed"), device=w.device)
    scales = torch.empty(out, n_in // g, dtype=torch.bfloat16, device=w.device)
    block = max(g, block // g * g) if g < n_in else block
    compiled = w.device.type == "cpu" and kernels.available()
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        w1, err1, h1, codes1 = w[:, i1:i2].clone(), w.new_zeros(out, i2 - i1), hinv[i1:i2, i1:i2], w.new_empty(out, i2 - i1)
        alpha = (-1 / h1.diagonal().double()).float()  # each column's step along h1's row, as addr_ rounds -1 / d
        i = 0
        while i < i2 - i1:
            col = i1 + i
            if col % g == 0:  # a group's scale from its (already compensated) values
                if g <= i2 - i1 - i:
                    scales[:, col // g] = grid.scales(w1[:, i : i + g])[:, 0]
                else:  # a group past the block (a step quantizer's whole row): gathered rows at a time, never whole
                    for r in range(0, out, rows):
                        scales[r : r + rows, col // g] = grid.scales(torch.cat([w1[r : r + rows, i:], w[r : r + rows, i2 : col + g]], 1), slice(r, r + rows))[:, 0]
                step = scales[:, col // g].float()
                inverse = torch.where(step > 0, 1 / step.clamp_min(1e-38), 0.0)
            end = min(i2 - i1, i + g - col % g)  # to the next group's first column, or the block's end
            if compiled:
                kernels.feedback_columns(w1, err1, codes1, h1, alpha, inverse, step, i, end, 2 if grid.bits == 1 else int(grid.full), grid.qmax)
            else:
                _feedback_columns(w1, err1, codes1, h1, alpha, inverse, step, i, end, grid)
            i = end
        codes[:, i1:i2] = codes1  # whole numbers: exact in the codes' integer type
        err1 /= h1.diagonal()
        for r in range(0, out, rows):  # rows at a time: no temporary of the matrix's size (a vocabulary-sized head's)
            w[r : r + rows, i2:] -= err1[r : r + rows] @ hinv[i1:i2, i2:]
    return codes, scales


def _feedback_columns(w1: torch.Tensor, err1: torch.Tensor, codes: torch.Tensor, h1: torch.Tensor, alpha: torch.Tensor, inverse: torch.Tensor,
                      step: torch.Tensor, c0: int, c1: int, grid: _Grid) -> None:
    """Columns ``c0:c1`` of a block: each rounded (its codes to `codes`, its error to `err1`) and its error spread over
    the block's later columns of `w1`, a column at a time (what `kernels.feedback_columns` does in one call)."""
    for i in range(c0, c1):
        q = grid.nearest(w1[:, i] * inverse if grid.bits > 1 else w1[:, i])
        codes[:, i] = q
        err = torch.addcmul(w1[:, i], q, step, value=-1)
        err1[:, i] = err
        w1[:, i + 1 :].addr_(err, h1[i, i + 1 :], alpha=float(alpha[i]))


def pack_codes(codes: torch.Tensor, bits: int, grid: str = "signed") -> torch.Tensor:
    """Signed codes on `grid` as stored: offset to unsigned and bit-packed (the inverse of `codes_of`)."""
    return pack(_Grid(bits, grid).unsigned(codes.to(torch.int16)).reshape(-1), bits)


def huffman_code(codes: torch.Tensor, bits: int, grid: str = "signed") -> torch.Tensor:
    """Signed codes on `grid` Huffman-coded: one byte `bits`, then the unsigned codes in row-major order, ``8 // bits``
    to a byte (bit-packed within it, the last byte padded with zeros), as a raw DEFLATE stream with Huffman coding
    only (`huffman_codes_of` reads it back). Coding several codes per symbol spends less than the one bit per code
    a symbol costs at least (codes of 1.45 bits' entropy: 1.64 bits one to a byte, about 1.5 two to a byte)."""
    per, flat, chunk = 8 // bits, codes.reshape(-1), 2**22 * (8 // bits)
    symbols = torch.empty(-(-flat.numel() // per), dtype=torch.uint8)
    for start in range(0, flat.numel(), chunk):  # a chunk at a time: a vocabulary-sized matrix's codes never widened whole
        unsigned = _Grid(bits, grid).unsigned(flat[start : start + chunk].to(torch.int16))
        unsigned = torch.cat([unsigned, unsigned.new_zeros(-len(unsigned) % per)]).reshape(-1, per).to(torch.int32)
        symbols[start // per : start // per + len(unsigned)] = (unsigned << (bits * torch.arange(per, dtype=torch.int32))).sum(1).to(torch.uint8)
    return _as_tensor(bytes([bits]) + _huffman(symbols.numpy()))


def huffman_codes_of(stream: torch.Tensor, shape: tuple[int, ...], grid: str = "signed") -> tuple[torch.Tensor, int]:
    """(signed codes ``(out, in)``, bits) of a `huffman_code` stream; ValueError unless it holds exactly
    ``prod(shape)`` codes of its width (decoding stops there: a stream that would inflate further is refused)."""
    data = _bytes_of(stream)
    if not data or data[0] not in BITS:
        raise ValueError("Huffman-coded codes without a valid bit width")
    bits, n = data[0], math.prod(shape)
    per = 8 // bits
    symbols = torch.frombuffer(bytearray(_inflate(data[1:], -(-n // per))), dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
    codes_of_symbol, valid = _symbols(bits, grid)
    if n and (bool(torch.bincount(symbols, minlength=256)[~valid].any()) or int(symbols[-1]) >> (bits * (n - (len(symbols) - 1) * per))):
        raise ValueError(f"Huffman-coded codes exceed {bits} bits on the {grid} grid")  # or the last byte is not padded with zeros
    codes = torch.index_select(codes_of_symbol, 0, symbols.int())  # a byte's codes looked up as one wide integer
    return codes.view(_codes_dtype(bits, grid)).reshape(-1)[:n].reshape(shape), bits


@functools.cache
def _symbols(bits: int, grid: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Of every byte of a `huffman_code` stream: the ``8 // bits`` signed codes it holds (lowest bits first) as one
    integer of their bytes, and whether a stream may hold it (each code on the grid, no bits above the last)."""
    per = 8 // bits
    symbol = torch.arange(256, dtype=torch.int32)
    unsigned = (symbol[:, None] >> (bits * torch.arange(per, dtype=torch.int32))) & (2**bits - 1)
    valid = (unsigned < 2**bits - (grid == "signed" and bits > 1)).all(1) & (symbol < 2 ** (bits * per))
    codes = _signed(unsigned.to(torch.uint8), bits, grid).contiguous()
    wide = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[per * codes.element_size()]
    return codes.view(wide).reshape(256), valid


def huffman_scales(scales: torch.Tensor) -> torch.Tensor:
    """bfloat16 scales Huffman-coded: their high bytes (sign and exponent, few distinct values), then their low
    bytes, as one raw DEFLATE stream with Huffman coding only (about half their 16 bits)."""
    bits = scales.contiguous().view(torch.int16).reshape(-1)
    return _as_tensor(_huffman(((bits >> 8) & 0xFF).to(torch.uint8).numpy().tobytes() + (bits & 0xFF).to(torch.uint8).numpy().tobytes()))


def huffman_scales_of(stream: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The bfloat16 scales ``(out, in / group)`` a `huffman_scales` stream holds for a matrix of `shape`
    (ValueError unless a whole number of groups divides each row; never inflated past the matrix's size)."""
    rows, cols = shape
    planes = _inflate(_bytes_of(stream), 2 * rows * cols, exact=False)
    n = len(planes) // 2
    if not n or rows == 0 or n % rows or cols % (n // rows):
        raise ValueError(f"Huffman-coded scales ({n} values) do not divide a {rows} x {cols} matrix into groups")
    planes = torch.frombuffer(bytearray(planes), dtype=torch.uint8).to(torch.int16)
    return ((planes[:n] << 8) | planes[n:]).view(torch.bfloat16).reshape(rows, n // rows)


def _huffman(data) -> bytes:
    """A raw DEFLATE stream, Huffman coding only, of a bytes-like `data`."""
    coder = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    return coder.compress(data) + coder.flush()


def _inflate(data: bytes, n: int, exact: bool = True) -> bytes:
    """The bytes of a raw DEFLATE stream: exactly `n` (`exact`) or at most `n`, never inflating past ``n + 1``
    (ValueError otherwise)."""
    decoder = zlib.decompressobj(-15)
    try:
        raw = decoder.decompress(data, n + 1)
    except zlib.error as err:
        raise ValueError(f"a Huffman-coded stream is corrupt ({err})") from None
    if len(raw) > n or (exact and len(raw) != n) or not decoder.eof or decoder.unused_data or decoder.unconsumed_tail:
        raise ValueError(f"a Huffman-coded stream does not hold {'exactly' if exact else 'at most'} {n} values")
    return raw


def _bytes_of(stream: torch.Tensor) -> bytes:
    return stream.numpy().tobytes() if stream.dtype == torch.uint8 and stream.dim() == 1 else b""


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def codes_of(packed: torch.Tensor, shape: tuple[int, ...], grid: str = "signed") -> torch.Tensor:
    """Signed codes ``(out, in)`` of a packed tensor on `grid` (int8; int16 for 8 bits on the full grid)."""
    bits = bits_of(packed, shape)
    return _signed(unpack(packed, bits, math.prod(shape)), bits, grid).reshape(shape)


def row_codes(rows: torch.Tensor, bits: int, grid: str = "signed") -> torch.Tensor:
    """Signed codes ``(..., in)`` of bit-packed rows ``(..., in * bits / 8)`` (rows of a packed matrix whose
    rows end on a byte): torch operations only, so a looked-up row is unpacked where it is, without numpy."""
    stream = (rows[..., None] >> torch.arange(8, dtype=torch.uint8, device=rows.device)) & 1  # little-endian bits
    planes = stream.flatten(-2).unflatten(-1, (-1, bits))
    return _signed((planes << torch.arange(bits, dtype=torch.uint8, device=rows.device)).sum(-1, dtype=torch.uint8), bits, grid)


def _signed(unsigned: torch.Tensor, bits: int, grid: str) -> torch.Tensor:
    unsigned = unsigned.to(torch.int16)
    codes = 2 * unsigned - (2**bits - 1) if grid == "full" or bits == 1 else unsigned - (2 ** (bits - 1) - 1)
    return codes.to(_codes_dtype(bits, grid))


def _codes_dtype(bits: int, grid: str) -> torch.dtype:
    """The integer type signed codes are held in: int8, int16 for 8 bits on the full grid (odd codes up to 255)."""
    return torch.int16 if (grid == "full" and bits == 8) else torch.int8


def dequantize(codes: torch.Tensor, scales: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
    """float32 values of signed codes ``(..., in)`` with scales ``(..., in / group)`` and, where given, each column's
    step multiplier `columns` ``(in,)``."""
    g = codes.shape[-1] // scales.shape[-1]
    values = (codes.float().unflatten(-1, (scales.shape[-1], g)) * scales.float()[..., None]).flatten(-2)
    return values if columns is None else values.mul_(columns.float())


def bits_of(packed: torch.Tensor, shape: tuple[int, ...]) -> int:
    """Bits per value, from the packed length (``ceil(n * bits / 8)`` bytes)."""
    n = math.prod(shape)
    bits = packed.numel() * 8 // max(n, 1)
    if bits not in BITS or packed.numel() != math.ceil(n * bits / 8):
        raise ValueError(f"{packed.numel()} packed bytes fit no bit width for {n} values")
    return bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (< 2^bits) into ``ceil(n * bits / 8)`` bytes."""
    if bits == 8:
        return codes.clone()
    planes = (codes.numpy()[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: n unsigned codes as uint8."""
    if bits == 8:
        return packed.clone()
    planes = np.unpackbits(packed.numpy(), count=n * bits, bitorder="little").reshape(n, bits)
    return torch.from_numpy((planes << np.arange(bits, dtype=np.uint8)).sum(1, dtype=np.uint8))
