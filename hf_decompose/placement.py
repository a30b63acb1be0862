"""Placement: base layers and substructures on devices, through Accelerate.

`place` takes what transformers' ``from_pretrained`` takes: ``device_map="auto" | "balanced" |
"balanced_low_0" | "sequential"`` or ``{module name: device}`` (GPU index, ``"cpu"`` or ``"disk"``),
with ``max_memory`` and ``offload_folder``. Names are those of the transformers model; every
substructure is a module of its own (``model.layers.0.mlp.up_proj.ops.lowrank``), so a map can put
it anywhere, offloaded included. Strategies for the string maps:

* ``"spread"`` (default): Accelerate places the base layers as it would without the substructures;
  then the substructures, largest first, go to the compute device with the least load (bytes of
  base and substructures placed there) that still has room, else to the CPU, else to disk.
* ``"layers"``: plain Accelerate; substructures stay inside their layer.

`dispatch_model` attaches the hooks that move weights (CPU / disk offload) and inputs; split
execution moves each contribution back to the base output's device.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from accelerate import dispatch_model, infer_auto_device_map
from accelerate.utils import compute_module_sizes, get_balanced_memory, get_max_memory
from torch import nn
from transformers import PreTrainedModel

from .errors import ConfigError
from .modules import DecomposedModule
from .parts import DeltaOps, Part

STRATEGIES = ("spread", "layers")
# modules whose forward reads a child's weights outside the child's forward, so an offloaded layer loads their whole
# subtree first (Accelerate's `preload_module_classes`): transformers' Jamba mixer multiplies by ``dt_proj.weight``
PRELOADED = ["JambaMambaMixer"]
AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
Device = int | str


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a decomposed model (or the model itself)."""
    return model if isinstance(model, PreTrainedModel) else model.model


def substructures(model: nn.Module) -> dict[str, Part]:
    """Every substructure by name (a tied head's parts are its embedding's)."""
    return {n: m for n, m in transformers_model(model).named_modules() if isinstance(m, Part)}


def place(
    model: nn.Module,
    device_map: str | dict[str, Device] = "auto",
    *,
    max_memory: dict[Device, int | str] | None = None,
    offload_folder: str | Path | None = None,
    strategy: str = "spread",
) -> dict[str, Device]:
    """Dispatch `model` (a `DecomposedModel`, `MultiDecomposedModel` or transformers model) over
    devices; return the device map, also kept as ``hf_device_map`` on the transformers model."""
    inner = transformers_model(model)
    if any(hasattr(m, "_hf_hook") for m in inner.modules()):
        raise ConfigError("the model is already placed on devices: load it again to place it differently")
    if isinstance(device_map, str):
        device_map = infer_device_map(inner, device_map, max_memory, strategy)
    compute = [d for d in device_map.values() if d not in ("cpu", "disk")]
    _check(device_map, offloaded={"disk", "cpu"} if compute else {"disk"})
    if "disk" in device_map.values() and offload_folder is None:
        raise ConfigError("the device map offloads to disk: pass offload_folder=")
    dispatch_model(inner, device_map, main_device=compute[0] if compute else "cpu", offload_dir=offload_folder, offload_buffers=True,
                   preload_module_classes=PRELOADED)
    for module in inner.modules():  # a merged copy made before is rebuilt where its base now lives
        if isinstance(module, DecomposedModule):
            object.__setattr__(module, "_merged", None)
    return inner.hf_device_map


def infer_device_map(inner: nn.Module, device_map: str, max_memory: dict | None = None, strategy: str = "spread") -> dict[str, Device]:
    """A device map for one of the string forms, under `max_memory` (bytes or "10GiB" per device)."""
    if device_map not in AUTO_MAPS:
        raise ConfigError(f"device_map={device_map!r} is not one of {AUTO_MAPS} or a dict")
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy={strategy!r} is not one of {STRATEGIES}")
    no_split = list(getattr(inner, "_no_split_modules", None) or [])
    max_memory = get_max_memory(max_memory)
    if device_map != "sequential":  # budgets balanced for the whole model, substructures included
        max_memory = get_balanced_memory(inner, max_memory, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0")
    hide = _hidden_parts(inner) if strategy == "spread" else contextlib.nullcontext()
    with hide:
        base = infer_auto_device_map(inner, max_memory=max_memory, no_split_module_classes=no_split, offload_buffers=True)
        sizes = compute_module_sizes(inner)
    return base if strategy == "layers" else {**base, **spread(inner, base, sizes, max_memory)}


def spread(inner: nn.Module, base_map: dict[str, Device], base_sizes: dict[str, int], max_memory: dict[Device, int]) -> dict[str, Device]:
    """Substructures to devices, largest first: the least-loaded compute device with room, else CPU,
    else disk. Those of an offloaded layer stay offloaded with it."""
    load: dict[Device, int] = defaultdict(int)
    for name, device in base_map.items():
        load[device] += base_sizes.get(name, 0)
    free = {d: int(m) - load[d] for d, m in max_memory.items()}
    compute = [d for d in max_memory if d not in ("cpu", "disk")] or ["cpu"]
    out: dict[str, Device] = {}
    parts = {n: p for n, p in substructures(inner).items() if _where(n, base_map) in map(str, compute)}
    for name, part in sorted(parts.items(), key=lambda kv: -_nbytes(kv[1])):
        size = _nbytes(part)
        fits = [d for d in compute if free.get(d, 0) >= size]
        device = min(fits, key=lambda d: load[d]) if fits else ("cpu" if free.get("cpu", 0) >= size else "disk")
        free[device] = free.get(device, 0) - size
        load[device] += size
        out[name] = device
    return out


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.buffers())


@contextlib.contextmanager
def _hidden_parts(inner: nn.Module) -> Iterator[None]:
    """Detach every substructure for a while, so Accelerate sizes the base layers alone."""
    saved = [(ops, dict(ops._modules)) for ops in inner.modules() if isinstance(ops, DeltaOps)]
    try:
        for ops, _ in saved:
            ops._modules.clear()
        yield
    finally:
        for ops, modules in saved:
            ops._modules.update(modules)


def _check(device_map: dict[str, Device], offloaded: set[str]) -> None:
    """Accelerate cannot keep a module resident inside an offloaded one: say so up front."""
    for name, device in device_map.items():
        parent = _where(name.rpartition(".")[0], device_map) if name else None
        if parent in offloaded and device not in offloaded:
            raise ConfigError(f"{name!r} -> {device!r} lies inside a module offloaded to {parent!r}; offload it too or map its parent")


def device_table(model: nn.Module) -> list[tuple[str, str, int, str]]:
    """(module, kind, bytes, device) for every entry of the device map and every substructure."""
    inner = transformers_model(model)
    hf_map = getattr(inner, "hf_device_map", None) or {}
    parts = substructures(inner)
    sizes = compute_module_sizes(inner)
    rows = []
    for name, module in inner.named_modules():
        if name in parts:
            rows.append((name, parts[name].kind, sizes[name], _where(name, hf_map) or _tensor_device(module)))
        elif name in hf_map:
            rows.append((name or "<model>", type(module).__name__, sizes[name], str(hf_map[name])))
    return rows


def _where(name: str, device_map: dict[str, Device]) -> str | None:
    """The device of `name` or of its nearest mapped ancestor, if any."""
    while name not in device_map:
        if not name:
            return None
        name = name.rpartition(".")[0]
    return str(device_map[name])


def _tensor_device(module: nn.Module) -> str:
    tensor = next(module.buffers(), None)
    return str(tensor.device) if tensor is not None else "-"


def print_device_map(model: nn.Module) -> str:
    """Print (and return) where every mapped module and every substructure lives."""
    rows = [("module", "kind", "MiB", "device")] + [(n, k, f"{b / 2**20:.2f}", d) for n, k, b, d in device_table(model)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
    print(text)
    return text
