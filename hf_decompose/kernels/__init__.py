"""Compiled CPU kernels for split execution, built on first use.

`codes_matmul` runs a matrix's 4-bit codes (`parts.QuantPart`) and, optionally, the base matrix and low-rank
factors beside them (or the base and the factors alone), reading each once: the bytes a split decode step must read
(base + delta) in one pass, instead of the base through one kernel and each part through others. `rows_codes_matmul`
runs the base matrix once for rows that each add codes of their own (many fine-tunes of one base in one batch, as
Punica's and S-LoRA's grouped kernels do for adapters). The C source (`codes_matmul.c`: AVX2 + FMA, OpenMP threads)
is compiled with the system's C compiler (``$CC``, else ``cc``) into ``~/.cache/hf_decompose/kernels/<hash>/`` on
first use and loaded with ctypes; inside `torch.compile` the kernels run as the custom ops
``hf_decompose::codes_matmul`` and ``hf_decompose::rows_codes_matmul``.
Where that cannot be done (no compiler, a CPU without AVX2, ``HF_DECOMPOSE_KERNELS=0``) `available()` is False,
a warning says why once, and the parts run through PyTorch's own kernels (the same values up to rounding).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch

from ..pair import cache_dir

SOURCE = Path(__file__).with_name("codes_matmul.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
_AVAILABLE: bool | None = None


def available() -> bool:
    """Whether the compiled kernels run here (built and loaded on the first call; after it a plain flag, which
    `torch.compile` reads as a constant)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = _library() is not None
    return _AVAILABLE


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``(out, in)`` in -8..7 (``in`` a multiple of 16) in the kernel's layout: 16 codes in 8 bytes, byte b
    holding ``codes[b] + 8`` in its low and ``codes[b + 8] + 8`` in its high nibble."""
    n_out, n_in = codes.shape
    u = (codes.to(torch.int16) + 8).to(torch.uint8).view(n_out, n_in // 16, 2, 8)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(n_out, n_in // 2).contiguous()


def unpack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """The int8 codes of `pack_nibbles`."""
    n_out, half = nibbles.shape
    u = nibbles.view(n_out, half // 8, 1, 8)
    return (torch.cat([u & 15, u >> 4], 2).to(torch.int8) - 8).reshape(n_out, 2 * half)


def fits(shape: tuple[int, ...], group: int) -> bool:
    """Whether 4-bit codes (-8..7) of a matrix of `shape` with `group` columns per scale fit the kernel: ``in`` and
    `group` multiples of 16."""
    return len(shape) == 2 and shape[1] % 16 == 0 and group % 16 == 0


def codes_matmul(x: torch.Tensor, nibbles: torch.Tensor | None, scales: torch.Tensor | None, weight: torch.Tensor | None = None,
                 ut: torch.Tensor | None = None, v: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (weight + dequantize(codes, scales) + ut^T @ v)^T + bias`` for float32 CPU rows ``x`` ``(rows, in)``:
    `nibbles` from `pack_nibbles` and `scales` ``(out, in / group)`` (or both None, with a `weight`); `weight`
    ``(out, in)``, low-rank factors ``ut`` ``(r, out)`` and ``v`` ``(r, in)`` and `bias` optional, all float32 (`ut`
    may be a transposed view)."""
    if torch.compiler.is_compiling():
        return torch.ops.hf_decompose.codes_matmul(x, nibbles, scales, weight, ut, v, bias)
    return _run(x, nibbles, scales, weight, ut, v, bias)


def codes_table(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``(1 + len(parts), 3)`` int64 rows for `rows_codes_matmul`: zeros (the base alone), then each (nibbles, float32
    scales)'s addresses and group. The table is only valid while those tensors live and stay where they are."""
    rows = [(0, 0, 0)] + [(n.data_ptr(), s.data_ptr(), n.shape[1] * 2 // s.shape[1]) for n, s in parts]
    return torch.tensor(rows, dtype=torch.int64)


def rows_codes_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, codes: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T + bias``, each float32 CPU row ``x[i]`` plus its own codes' product: `codes` ``(rows, 3)`` rows of a
    `codes_table` (all of one shape ``(out, in)``)."""
    if torch.compiler.is_compiling():
        return torch.ops.hf_decompose.rows_codes_matmul(x, weight, bias, codes)
    return _run_rows(x, weight, bias, codes)


def _run_rows(x, weight, bias, codes) -> torch.Tensor:
    x = x if x.is_contiguous() else x.contiguous()
    y = torch.empty(x.shape[0], weight.shape[0])
    codes = codes if codes.is_contiguous() else codes.contiguous()
    _library().hfd_rows_codes_matmul(x.data_ptr(), x.shape[0], x.shape[1], weight.shape[0], weight.data_ptr(), codes.data_ptr(), _ptr(bias),
                                     y.data_ptr(), torch.get_num_threads())
    return y


def _run(x, nibbles, scales, weight, ut, v, bias) -> torch.Tensor:
    lib = _library()
    rows, n_in = x.shape
    n_out = weight.shape[0] if nibbles is None else nibbles.shape[0]
    x = x if x.is_contiguous() else x.contiguous()
    y = torch.empty(rows, n_out)
    r = 0 if ut is None else ut.shape[0]
    t = torch.empty(rows * r) if r else None
    lib.hfd_codes_matmul(
        x.data_ptr(), rows, n_in, n_out, _ptr(weight), _ptr(nibbles), _ptr(scales), 0 if scales is None else n_in // scales.shape[1],
        _ptr(ut), ut.stride(0) if r else 0, ut.stride(1) if r else 0, _ptr(v), r, _ptr(bias), y.data_ptr(), _ptr(t),
        torch.get_num_threads())
    return y


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@torch.library.custom_op("hf_decompose::codes_matmul", mutates_args=())
def _codes_matmul_op(x: torch.Tensor, nibbles: torch.Tensor | None, scales: torch.Tensor | None, weight: torch.Tensor | None,
                     ut: torch.Tensor | None, v: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    return _run(x, nibbles, scales, weight, ut, v, bias)


@_codes_matmul_op.register_fake
def _(x, nibbles, scales, weight, ut, v, bias):
    return x.new_empty(x.shape[0], (weight if nibbles is None else nibbles).shape[0])


@torch.library.custom_op("hf_decompose::rows_codes_matmul", mutates_args=())
def _rows_codes_matmul_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, codes: torch.Tensor) -> torch.Tensor:
    return _run_rows(x, weight, bias, codes)


@_rows_codes_matmul_op.register_fake
def _(x, weight, bias, codes):
    return x.new_empty(x.shape[0], weight.shape[0])


@cache
def _library() -> ctypes.CDLL | None:
    reason = _unavailable()
    if reason is None:
        try:
            lib = ctypes.CDLL(str(_build()))
        except subprocess.CalledProcessError as e:
            reason = f"compiling {SOURCE.name} failed ({(e.stderr or '').strip()[-300:] or e})"
        except OSError as e:
            reason = f"building or loading {SOURCE.name} failed ({e})"
        else:
            p, i = ctypes.c_void_p, ctypes.c_int64
            lib.hfd_codes_matmul.argtypes = [p, i, i, i, p, p, p, i, p, i, i, p, i, p, p, p, ctypes.c_int]
            lib.hfd_codes_matmul.restype = None
            lib.hfd_rows_codes_matmul.argtypes = [p, i, i, i, p, p, p, p, ctypes.c_int]
            lib.hfd_rows_codes_matmul.restype = None
            return lib
    if reason:
        warnings.warn(f"hf_decompose's CPU kernels are off: {reason}; low-bit parts run through PyTorch's kernels (slower in split execution)", stacklevel=3)
    return None


def _unavailable() -> str | None:
    """Why the kernels cannot run here ("" where they were turned off on purpose), or None."""
    if os.environ.get("HF_DECOMPOSE_KERNELS", "1") == "0":
        return ""
    if not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")):
        return f"the CPU's vector capability is {torch.backends.cpu.get_cpu_capability()}, AVX2 needed"
    if shutil.which(os.environ.get("CC", "cc")) is None:
        return f"no C compiler ({os.environ.get('CC', 'cc')!r} not found; set CC)"
    return None


def _build() -> Path:
    """The shared library for this source, flags and compiler (compiled once, moved into place atomically)."""
    cc = os.environ.get("CC", "cc")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    folder = cache_dir() / "kernels" / key
    target = folder / "codes_matmul.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            built = Path(tmp) / target.name
            subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True, check=True)
            os.replace(built, target)
    return target
