"""An accelerator emulated on CPU, to test device placement without one.

Tensors made on or moved to the emulated device (PyTorch's ``lazy`` device type, which a CPU build dispatches
without a backend of its own) are `OnDevice` wrappers around CPU tensors; every operation on them runs on CPU
through `EmulatedDevice`, and one that mixes them with CPU tensors of a dimension or more raises, as CUDA does
(copies may cross, and CPU indices may index a tensor on the device, not the other way). NumPy refuses them, as it
refuses CUDA tensors.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("lazy", 0)
aten = torch.ops.aten
COPIES = {aten.copy_.default, aten._to_copy.default}
INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}  # indices may be on CPU


class OnDevice(torch.Tensor):
    """A CPU tensor (`inner`) that says it is on the emulated device."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        strided = {"strides": inner.stride(), "storage_offset": inner.storage_offset()} if inner.layout == torch.strided else {}
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, **strided, layout=inner.layout, dtype=inner.dtype, device=DEVICE,
                                                    requires_grad=inner.requires_grad)  # fmt: skip

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    def tolist(self):  # a copy to the host, as on CUDA (PyTorch refuses it for subclasses)
        return self.inner.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on the emulated device outside `emulated_device()`")


class EmulatedDevice(TorchDispatchMode):
    """Runs operations on `OnDevice` tensors on CPU; refuses those mixing them with CPU tensors."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        on_device = any(isinstance(t, OnDevice) for t in tensors)
        checked = tensors if func not in INDEXING else [args[0], *args[2:3]] if isinstance(args[0], OnDevice) else tensors  # self, values
        if on_device and func not in COPIES and any(not isinstance(t, OnDevice) and t.dim() for t in checked if isinstance(t, torch.Tensor)):
            raise RuntimeError(f"{func}: tensors on the emulated device and on CPU")
        target = kwargs.get("device")
        to_device = target is not None and torch.device(target).type == DEVICE.type
        if to_device:
            kwargs = dict(kwargs, device=torch.device("cpu"))
        inner = {id(t.inner): t for t in tensors if isinstance(t, OnDevice)} | {id(t): t for t in tensors if not isinstance(t, OnDevice)}
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        wrap = to_device if func is aten._to_copy.default and target is not None else on_device or to_device

        def result(o):
            if not isinstance(o, torch.Tensor):
                return o
            if id(o) in inner:  # in place or out=: the argument itself
                return inner[id(o)]
            return OnDevice(o) if wrap else o

        return tree_map(result, out)


def _unwrap(a):
    return a.inner if isinstance(a, OnDevice) else a


@contextlib.contextmanager
def emulated_device() -> Iterator[torch.device]:
    """The emulated device, while operations on it run, in this thread and in threads started meanwhile (a dispatch
    mode is per thread). `torch.tensor` and `torch.as_tensor` with a device make their tensor on CPU and move it
    (they would ask the ``lazy`` backend directly)."""
    constructors = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}
    run = threading.Thread.run

    def run_emulated(thread: threading.Thread) -> None:
        with EmulatedDevice():
            run(thread)

    def made_on_cpu(make):
        def construct(*args, device=None, **kwargs):
            out = make(*args, **kwargs)
            return out if device is None else out.to(device)

        return construct

    try:
        for name, make in constructors.items():
            setattr(torch, name, made_on_cpu(make))
        threading.Thread.run = run_emulated
        with EmulatedDevice():
            yield DEVICE
    finally:
        threading.Thread.run = run
        for name, make in constructors.items():
            setattr(torch, name, make)
