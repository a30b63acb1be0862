"""The bytes a decode step must read: the base weights once plus each active fine-tune's substructures."""

from __future__ import annotations

import re
from collections import defaultdict

from torch import nn

from hf_decompose.parts import Part, QuantPart
from hf_decompose.parts.quant import KERNEL_CODES


def part_bytes(part: Part) -> int:
    """Bytes a part reads per step: a fused low-bit part its packed codes, scales and columns' multipliers (codes in the
    compiled kernel's layout or int4-packed for PyTorch's), others every buffer."""
    fused = next((k for k in ((*KERNEL_CODES, "scales", "columns"), ("packed", "scale_zeros", "columns")) if isinstance(part, QuantPart) and k[0] in part._buffers), None)
    if fused:
        return sum(part._buffers[k].numel() * part._buffers[k].element_size() for k in fused if part._buffers.get(k) is not None)
    return sum(b.numel() * b.element_size() for b in part.buffers(recurse=False))


def step_bytes(model: nn.Module) -> dict:
    """``{"base": bytes, "parts": {fine-tune: bytes}}``: base parameters (shared storages once) and the
    substructures of each fine-tune (``""`` for a single decomposed model)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    parts: dict[str, int] = defaultdict(int)
    for name, module in model.named_modules(remove_duplicate=True):
        if isinstance(module, Part):
            tenant = re.search(r"\.tenants\.([^.]+)\.", name)
            parts[tenant.group(1) if tenant else ""] += part_bytes(module)
    return {"base": sum(storages.values()), "parts": dict(parts)}


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds (parameters and buffers, shared storages once)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
