"""Substructure modules: every kept piece of a delta is its own small `nn.Module`.

A part computes its contribution to ``x @ delta^T`` (linear layers, canonical ``(out, in)``
layout) or, with ``lookup=True``, the delta rows of token ids (embeddings). Parts are submodules
of `DeltaOps` (``<module>.ops.dense | .block<i> | .sparse | .override | .lowrank | .quant | .bias``), so
Accelerate can address, place and offload each one. `run_split` adds the contributions to the
base module's output, running them concurrently where that can pay off: other GPUs asynchronously,
a thread pool on CPU for large pieces. (CUDA side streams were slower than one stream on an H200:
22.3 vs 30.4 ms/token at batch 1; the parts' kernels are too small to overlap, so they are gone.)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from .quantize import codes_of, dequantize
from .substructures import TensorDelta

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

PARALLEL = ("auto", "off", "threads")
THREAD_MIN_MACS = 1 << 24  # a CPU piece worth a thread hand-off (about a millisecond of work)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class Part(nn.Module):
    """One substructure of an ``(out, in)`` delta; `cost` is its multiply-adds per input row."""

    kind = "part"

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)
        self._cost: int | None = None

    def cost(self) -> int:
        if self._cost is None:  # sizes never change (a move or a cast keeps them)
            self._cost = sum(b.numel() for b in self._buffers.values() if b.is_floating_point())
        return self._cost

    def extra_repr(self) -> str:
        return f"shape={self.shape}, cost={self.cost()}"


class DensePart(Part):
    kind = "dense"

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape)
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor, lookup: bool = False) -> torch.Tensor:
        return F.embedding(x, self.weight) if lookup else F.linear(x, _cast(self.weight, x.dtype))


class LowRankPart(Part):
    """``u @ v`` with u ``(out, r)`` (singular values folded in) and v ``(r, in)``."""

    kind = "lowrank"

    def __init__(self, u: torch.Tensor, v: torch.Tensor):
        super().__init__((u.shape[0], v.shape[1]))
        self.register_buffer("u", u)
        self.register_buffer("v", v)

    def forward(self, x: torch.Tensor, lookup: bool = False) -> torch.Tensor:
        if lookup:
            return F.embedding(x, self.u) @ self.v
        return F.linear(F.linear(x, _cast(self.v, x.dtype)), _cast(self.u, x.dtype))


class QuantPart(Part):
    """Every entry in low-bit integer codes (int8 in memory) with bfloat16 group scales.

    On CPU, codes of at most 4 bits in groups of 32 to 256 columns (rows a multiple of 16) also keep an int4-packed copy
    (half a byte per entry) for PyTorch's fused dequantize-matmul kernel, which reads the packed
    codes and never builds the float matrix: the product is computed in bfloat16 (float16 inputs
    stay float16), within bfloat16 rounding of the reference ``x @ dequantize(codes, scales)^T``.
    Other codes run the reference (a float32 matrix per call).
    """

    kind = "quant"
    FUSED_GROUPS = (32, 64, 128, 256)

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        super().__init__(codes.shape)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        group = codes.shape[-1] // max(scales.shape[-1], 1)
        self.group = group
        if codes.device.type == "cpu" and group in self.FUSED_GROUPS and codes.shape[0] % 16 == 0 and codes.numel() and int(codes.abs().max()) <= 7:
            step = scales.float().t().contiguous()  # (in / group, out, [scale, zero]): zero 0, codes offset by 8
            packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32) + 8, 1)
            self.register_buffer("packed", packed, persistent=False)
            self.register_buffer("scale_zeros", torch.stack([step, torch.zeros_like(step)], -1).bfloat16(), persistent=False)

    def cost(self) -> int:
        return self.codes.numel()

    def fused(self, x: torch.Tensor) -> bool:
        """Whether ``x`` runs through the packed int4 kernel."""
        return "packed" in self._buffers and x.device.type == "cpu" and self.packed.device.type == "cpu"

    def forward(self, x: torch.Tensor, lookup: bool = False) -> torch.Tensor:
        if lookup:
            return dequantize(self.codes[x], self.scales[x])
        if "packed" in self._buffers and x.device.type == "cpu" and self.packed.device.type == "cpu":  # `fused`, inlined
            dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
            y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).to(dtype), self.packed, self.group, _cast(self.scale_zeros, dtype))
            return y.to(x.dtype).view(*x.shape[:-1], self.shape[0])
        return F.linear(x, _cast(dequantize(self.codes, self.scales), x.dtype))


class BlockPart(Part):
    """A dense block on sorted ``rows`` x ``cols``."""

    kind = "block"

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]):
        super().__init__(shape)
        if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
            rows, order = rows.sort()
            values = values[order]
        self.register_buffer("rows", rows)
        self.register_buffer("cols", cols)
        self.register_buffer("values", values)

    def forward(self, x: torch.Tensor, lookup: bool = False) -> torch.Tensor:
        if lookup:
            pos = torch.searchsorted(self.rows, x).clamp_(max=self.rows.numel() - 1)
            found = F.embedding(pos, self.values) * (self.rows[pos] == x).unsqueeze(-1)
            return found.new_zeros(*x.shape, self.shape[1]).index_copy_(-1, self.cols, found)
        y = F.linear(x.index_select(-1, self.cols), _cast(self.values, x.dtype))
        return y.new_zeros(*x.shape[:-1], self.shape[0]).index_copy_(-1, self.rows, y)


class SparsePart(Part):
    """Scattered entries in CSR form (``crow``, ``cols``, ``values``; int32 indices where they fit)."""

    kind = "sparse"

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]):
        super().__init__(shape)
        if rows.numel() > 1 and not bool((rows[1:] >= rows[:-1]).all()):
            rows, order = rows.sort(stable=True)
            cols, values = cols[order], values[order]
        index = torch.int32 if max(shape[0], shape[1], rows.numel()) < 2**31 else torch.long
        crow = torch.zeros(shape[0] + 1, dtype=index)
        crow[1:] = torch.bincount(rows.long(), minlength=shape[0]).cumsum(0)
        self.register_buffer("crow", crow)
        self.register_buffer("cols", cols.to(index).contiguous())
        self.register_buffer("values", values)

    def forward(self, x: torch.Tensor, lookup: bool = False) -> torch.Tensor:
        if lookup:
            return self._rows(x)
        matrix = torch.sparse_csr_tensor(self.crow, self.cols, _cast(self.values, x.dtype), self.shape[:2], check_invariants=False)
        flat = x.reshape(-1, x.shape[-1])
        return (matrix @ flat.t()).t().reshape(*x.shape[:-1], self.shape[0])

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Delta rows of token ids: a ragged gather of each id's CSR row."""
        flat = ids.reshape(-1)
        starts = self.crow[flat]
        counts = self.crow[flat + 1] - starts
        which = torch.repeat_interleave(torch.arange(flat.numel(), device=ids.device), counts)
        first = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        entry = starts[which] + torch.arange(which.numel(), device=ids.device) - first
        out = self.values.new_zeros(flat.numel(), self.shape[1])
        out.index_put_((which, self.cols[entry]), self.values[entry], accumulate=True)
        return out.reshape(*ids.shape, self.shape[1])


class VectorPart(Part):
    """An additive bias delta."""

    kind = "bias"

    def __init__(self, bias: torch.Tensor):
        super().__init__(bias.shape)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor, lookup: bool = False) -> torch.Tensor:
        return _cast(self.bias, x.dtype).expand(*x.shape[:-1], -1)


class DeltaOps(nn.Module):
    """The parts of one matrix delta (sharing the `TensorDelta`'s storage wherever it can)."""

    def __init__(self, delta: TensorDelta, base_weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.delta: TensorDelta | None = delta  # None once only the parts are kept
        if delta.dense is not None:
            self.add_module("dense", DensePart(delta.dense))
        for i, b in enumerate(delta.blocks):
            self.add_module(f"block{i}", BlockPart(b.rows, b.cols, b.values, delta.shape))
        if delta.sparse_values is not None:
            self.add_module("sparse", SparsePart(delta.sparse_indices[0], delta.sparse_indices[1], delta.sparse_values, delta.shape))
        canonical = base_weight.t() if delta.transposed else base_weight
        if delta.replaces_all:  # every entry replaced: the whole difference to the base
            self.add_module("override", DensePart(delta.override_values.float() - canonical.detach().float().cpu() - delta.to_dense()))
        elif delta.override_values is not None:  # overridden entries: the correction on top of the rest
            at = tuple(delta.override_indices.t())
            fix = delta.override_values - canonical.detach().float().cpu()[at] - delta.to_dense()[at]
            self.add_module("override", SparsePart(at[0], at[1], fix, delta.shape))
        if delta.lowrank_u is not None:
            self.add_module("lowrank", LowRankPart(delta.lowrank_u, delta.lowrank_v))
        if delta.quant_codes is not None:
            self.add_module("quant", QuantPart(codes_of(delta.quant_codes, delta.shape), delta.quant_scales))
        if bias is not None:
            self.add_module("bias", VectorPart(bias))

    def parts(self) -> list[Part]:
        return list(self.children())

    def forward(self, x: torch.Tensor, lookup: bool = False) -> torch.Tensor:
        """The summed contribution of every part (on x's device)."""
        out = None
        for part in self.children():
            c = part(x, lookup).to(x.device)
            out = c if out is None else out + c
        return out


def set_parallel(model: nn.Module, mode: str) -> None:
    """Set how split modules run their parts: "auto", "off" or "threads" (CPU)."""
    if mode not in PARALLEL:
        raise ValueError(f"parallel={mode!r} is not one of {PARALLEL}")
    for module in model.modules():
        if hasattr(module, "parallel"):
            module.parallel = mode


def run_split(
    base: Callable[[torch.Tensor], torch.Tensor],
    parts: Sequence[nn.Module],
    x: torch.Tensor,
    lookup: bool = False,
    scale: torch.Tensor | None = None,
    parallel: str = "auto",
) -> torch.Tensor:
    """``base(x)`` plus every part's contribution (times `scale`), summed in the parts' order.

    The order of the sum is fixed, so every way of running gives the same numbers.
    """
    rows = x.numel() if lookup else x.numel() // x.shape[-1]
    if _plan(parts, x, rows, parallel) == "threads":
        y, contributions = _on_threads(base, parts, x, lookup, rows, parallel == "threads")
    elif any("_hf_hook" in p.__dict__ for p in parts):  # placed parts: those on other devices start first (asynchronous there)
        pending = {i: p(x, lookup) for i, p in enumerate(parts) if _device(p, x) != x.device}
        y = base(x)
        contributions = [pending[i] if i in pending else p(x, lookup) for i, p in enumerate(parts)]
    else:  # the common case, kept lean: every part here, one after another (per-call overhead counts at batch 1)
        y = base(x)
        for p in parts:
            c = p(x, lookup)
            y = y + (c if scale is None else c * scale.to(c.dtype)).to(y.dtype)
        return y
    for c in contributions:
        c = c.to(y.device, y.dtype)
        y = y + (c * scale.to(c.dtype) if scale is not None else c)
    return y


def _plan(parts: Sequence[nn.Module], x: torch.Tensor, rows: int, parallel: str) -> str:
    if parallel == "off" or not parts or x.device.type != "cpu":
        return "off"
    if parallel == "threads":
        return "threads"
    return "threads" if _cores() > 1 and any(p.cost() * rows >= THREAD_MIN_MACS for p in parts) else "off"


@cache
def _cores() -> int:
    return os.cpu_count() or 1


def _device(part: nn.Module, x: torch.Tensor) -> torch.device:
    """Where a part runs: its Accelerate execution device, else where its tensors are."""
    hook = part.__dict__.get("_hf_hook")
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    t = next(iter(part._buffers.values()), None)
    return x.device if t is None or t.device.type == "meta" else t.device


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="hf_decompose")


def _on_threads(base, parts, x, lookup, rows, force):
    modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())  # thread-local: carry them over
    futures = {i: _pool().submit(_in_modes, p, x, lookup, *modes) for i, p in enumerate(parts) if force or p.cost() * rows >= THREAD_MIN_MACS}
    y = base(x)
    return y, [futures[i].result() if i in futures else p(x, lookup) for i, p in enumerate(parts)]


def _in_modes(part: nn.Module, x: torch.Tensor, lookup: bool, grad: bool, inference: bool) -> torch.Tensor:
    with torch.inference_mode(inference), torch.set_grad_enabled(grad):
        return part(x, lookup)
