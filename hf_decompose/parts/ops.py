"""Running a delta's parts beside the base module they belong to.

`DeltaOps` holds the run-time parts of one matrix delta as submodules (``<module>.ops.dense | .block<i> |
.sparse | .override | .lowrank | .qlowrank | .quant | .bias``), so Accelerate can address, place and offload each one.
`run_split` adds their contributions to the base module's output, running them concurrently where that can
pay off: other GPUs asynchronously, a thread pool on CPU for large pieces. (CUDA side streams were slower
than one stream on an H200: 22.3 vs 30.4 ms/token at batch 1; the parts' kernels are too small to overlap,
so they are gone.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .base import Part
from .delta import TensorDelta
from .quant import QuantPart, run_with_base
from .quantlowrank import QuantLowRankPart
from .vector import VectorPart

PARALLEL = ("auto", "off", "threads")
THREAD_MIN_MACS = 1 << 24  # a CPU piece worth a thread hand-off (about a millisecond of work)


class DeltaOps(nn.Module):
    """The run-time parts of one matrix delta (views of the `TensorDelta`'s tensors), plus a bias delta;
    `lookup`: the matrix is an embedding's (its rows are looked up too)."""

    def __init__(self, delta: TensorDelta, base_weight: torch.Tensor, bias: torch.Tensor | None = None, lookup: bool = False):
        super().__init__()
        self.delta: TensorDelta | None = delta  # None once only the parts are kept
        canonical = base_weight.t() if delta.transposed else base_weight
        dense: list[torch.Tensor] = []

        def rest() -> torch.Tensor:  # the additive parts' sum, for an override's correction (built once)
            if not dense:
                dense.append(delta.to_dense())
            return dense[0]

        count: dict[str, int] = {}
        low_bit = [p for p in delta.parts if p.kind == "qlowrank"]
        if low_bit:  # every width's directions as one module, their codes held one byte each
            self.add_module("qlowrank", QuantLowRankPart.joined(low_bit).runtime(canonical, rest, lookup))
        for part in delta.parts:
            if part.kind == "qlowrank":
                continue
            name = part.kind
            if part.numbered:
                count[name] = count.get(name, -1) + 1
                name = f"{name}{count[name]}"
            self.add_module(name, part.runtime(canonical, rest, lookup))
        if bias is not None:
            self.add_module("bias", VectorPart(bias))

    def parts(self) -> list[Part]:
        return list(self._modules.values())  # not `children()`, whose de-duplication split pays per call

    def compact(self) -> DeltaOps:
        """Keep the parts only (what only the `TensorDelta` holds is freed), low-bit codes in the compiled kernel's
        smallest layout (`QuantPart.compact`): what a model serving many fine-tunes holds of each."""
        self.delta = None
        for part in self.parts():
            if isinstance(part, QuantPart):
                part.compact()
        return self

    def forward(self, x: torch.Tensor, lookup: bool = False) -> torch.Tensor:
        """The summed contribution of every part (on x's device)."""
        out = None
        for part in self.children():
            c = part(x, lookup).to(x.device)
            out = c if out is None else out + c
        return out


def embedding_scale(module: nn.Module) -> torch.Tensor | None:
    """The factor a scaled word embedding multiplies its rows by (Gemma's a buffer, XGLM's a float), as a tensor; None
    for another module."""
    scale = getattr(module, "embed_scale", None)
    return scale if scale is None or isinstance(scale, torch.Tensor) else torch.tensor(scale)


def set_parallel(model: nn.Module, mode: str) -> None:
    """Set how split modules run their parts: "auto", "off" or "threads" (CPU)."""
    if mode not in PARALLEL:
        raise ValueError(f"parallel={mode!r} is not one of {PARALLEL}")
    for module in model.modules():
        if hasattr(module, "parallel"):
            module.parallel = mode


def run_split(
    base: Callable[[torch.Tensor], torch.Tensor],
    parts: Collection[nn.Module],
    x: torch.Tensor,
    lookup: bool = False,
    scale: torch.Tensor | None = None,
    parallel: str = "auto",
) -> torch.Tensor:
    """``base(x)`` plus every part's contribution (times `scale`), summed in the parts' order.

    The order of the sum is fixed, so every way of running gives the same numbers. Where nothing is hooked or
    placed and the compiled kernel runs the base and all the parts (`quant.run_with_base`: annealing's low rank and
    4-bit codes beside a float32 linear layer on CPU), they run in one pass of it, whatever `parallel` says.
    """
    rows = x.numel() if lookup else x.numel() // x.shape[-1]
    threads, direct = False, runs_direct(base)
    for p in parts:  # a plain loop: at batch 1 a generator here cost 4% of a split decode step
        direct = direct and not _hooked(p)
    if direct and not lookup and scale is None:
        y = run_with_base(base, parts, x)
        if y is not None:
            return y
    for p in parts:  # (a lookup gathers a row per id, whatever `cost` says of the matrix: never worth a hand-off on its own)
        threads = threads or parallel == "threads" or (parallel == "auto" and not lookup and p.cost() * rows >= THREAD_MIN_MACS and _cores() > 1)
    threads = threads and x.device.type == "cpu"  # the thread pool is for CPU pieces
    if direct and not threads:  # the common case, kept lean: nothing hooked or placed, so each forward is called
        y = base.forward(x)  # without nn.Module's call machinery (a tenth of a split decode step at batch 1)
        for p in parts:
            c = p.forward(x, lookup)
            c = c if c.dtype == y.dtype else c.to(y.dtype)
            y = y + (c if scale is None else c * scale.to(c.dtype))
        return y
    if threads:
        y, contributions = _on_threads(base, parts, x, lookup, rows, parallel == "threads")
    else:  # placed or hooked parts: those on other devices start first (asynchronous there)
        pending = {i: p(x, lookup) for i, p in enumerate(parts) if _device(p, x) != x.device}
        y = base(x)
        contributions = [pending[i] if i in pending else p(x, lookup) for i, p in enumerate(parts)]
    for c in contributions:
        c = c.to(y.device, y.dtype)
        y = y + (c * scale.to(c.dtype) if scale is not None else c)
    return y


class LazyWeight(torch.Tensor):
    """A module's weight for code that reads it outside the module's forward, built only where an operation uses it:
    its shape, dtype and device are `like`'s (Llama 4 reads ``embed_tokens.weight.device`` on every call: no copy is
    built for that), its values `build()`'s (Jamba's ``dt_proj.weight @ x``), handed to the operation as a plain tensor."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, like: torch.Tensor, build: Callable[[], torch.Tensor]):
        return torch.Tensor._make_wrapper_subclass(cls, like.shape, dtype=like.dtype, device=like.device)

    def __init__(self, like: torch.Tensor, build: Callable[[], torch.Tensor]):
        self.build = build

    def tolist(self):  # PyTorch refuses these two for subclasses
        return self.build().tolist()

    def numpy(self, *, force: bool = False):
        return self.build().numpy(force=force)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def built(t):
            return t.build() if isinstance(t, LazyWeight) else t

        return func(*tree_map(built, args), **tree_map(built, kwargs or {}))


@contextlib.contextmanager
def weights_loaded(*modules: nn.Module) -> Iterator[None]:
    """The weights of `modules` and their submodules where they run, for code that reads them outside their forward:
    an Accelerate hook (offloaded to CPU or disk; one or several, in a `SequentialHook`) loads them first and offloads
    them again after."""
    hooked = [m for module in modules for m in module.modules() if "_hf_hook" in m.__dict__]
    with contextlib.ExitStack() as stack:
        for m in hooked:
            m._hf_hook.pre_forward(m)
            stack.callback(m._hf_hook.post_forward, m, None)
        yield


def runs_direct(*modules: Callable) -> bool:
    """Whether calling each module's ``forward`` skips nothing: no hook (global or its own) and no Accelerate placement."""
    return not _global_hooks() and not any(map(_hooked, modules))


def _hooked(module: Callable) -> bool:
    """Whether calling ``module.forward`` would skip a hook (`nn.Module.__call__`'s) or an Accelerate placement."""
    return not isinstance(module, nn.Module) or bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                                                     or module._backward_pre_hooks or "_hf_hook" in module.__dict__)  # fmt: skip


def _global_hooks() -> bool:
    m = torch.nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks or m._global_backward_pre_hooks)


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
