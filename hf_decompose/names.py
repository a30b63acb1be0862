"""Checkpoint tensor names -> model parameters, through transformers' own checkpoint conversion.

transformers 5 loads some checkpoints through conversions (`transformers.conversion_mapping`): legacy
renames, and mixture-of-experts weights stored per expert in checkpoints (``experts.3.w1.weight``) but
fused into 3-D parameters of the model (``experts.gate_up_proj``). `TensorTargets` asks transformers'
own reverse conversion (`revert_weight_conversion`, what ``save_pretrained`` writes) which checkpoint
tensors each parameter becomes: on meta tensors for names and shapes, and for a parameter that a
converter splits, fuses or transposes, on an index probe, so that each checkpoint tensor maps to a
strided view of the parameter (a conversion that is no view is refused). No name is renamed by hand here.

A checkpoint's 3-D tensor of matrices (a mixture of experts' experts fused in one tensor) is decomposed one matrix at a
time: matrix ``i`` of tensor ``t`` is the checkpoint tensor ``t@i`` to every reader (`CheckpointReader`), and its
target is the matrix's view of the tensor's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn


SLICE = "@"


def stacked(shape: tuple[int, ...]) -> bool:
    """Whether a checkpoint tensor of `shape` is a stack of matrices (decomposed as ``<name>@<i>``, one per matrix)."""
    return len(shape) == 3 and shape[1] > 1 and shape[2] > 1


def matrices(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """The names and shapes a checkpoint tensor is read as: ``<name>@<i>`` for each matrix of a stack, else itself."""
    if not stacked(shape):
        return [(name, shape)]
    return [(f"{name}{SLICE}{i}", tuple(shape[1:])) for i in range(shape[0])]


def matrix_of(name: str) -> tuple[str, int | None]:
    """(the checkpoint tensor, the matrix's index) of a name ``<tensor>@<i>``; (name, None) for a whole tensor."""
    stem, sep, index = name.rpartition(SLICE)
    return (stem, int(index)) if sep and index.isdigit() else (name, None)


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor lives in a model: a parameter, whole (`strides` None, same shape), or a
    strided view of it (entries of a fused parameter: offset and strides into the flat parameter)."""

    parameter: str
    shape: tuple[int, ...] | None = None
    strides: tuple[int, ...] | None = None
    offset: int = 0

    def matrix(self, index: int, param_shape: tuple[int, ...]) -> Target:
        """The target of matrix `index` of this 3-D tensor (of a parameter of shape `param_shape`)."""
        shape = self.shape if self.strides is not None else param_shape
        strides = self.strides if self.strides is not None else torch.empty(param_shape, device="meta").stride()
        return Target(self.parameter, tuple(shape[1:]), tuple(strides[1:]), self.offset + index * strides[0])

    def view(self, param: torch.Tensor) -> torch.Tensor:
        """The entries of `param` (contiguous) that the checkpoint tensor holds, in its shape."""
        if self.strides is None:
            return param
        flat = param.view(-1)
        return flat.as_strided(self.shape, self.strides, flat.storage_offset() + self.offset)


class TensorTargets:
    """The `Target` of every checkpoint tensor name of `model`'s class, as transformers saves it."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self._targets: dict[str, Target] = {}
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}  # a converted parameter's checkpoint tensors and their shapes
        converted = []
        metas = {pname: torch.empty(param.shape, dtype=param.dtype, device="meta") for pname, param in self.params.items()}
        if _unchanged(metas, _revert(model, metas)):  # no conversion at all (most architectures): one call, not one a parameter
            self._targets, self._converted = {pname: Target(pname) for pname in metas}, []
            return
        for pname, param in self.params.items():
            saved = _revert(model, {pname: torch.empty(param.shape, dtype=param.dtype, device="meta")})
            if list(saved) == [pname] or (len(saved) == 1 and tuple(next(iter(saved.values())).shape) == tuple(param.shape)):
                self._targets.setdefault(next(iter(saved)), Target(pname))
            elif saved:
                converted.append(pname)
                self._shapes[pname] = {name: tuple(t.shape) for name, t in saved.items()}
        self._converted = converted  # probed on first use

    def saved_buffers(self) -> set[str]:
        """The checkpoint names of the model's saved buffers, transformers' conversion reverted (MiniMax-M2 saves its
        ``mlp.e_score_correction_bias`` as ``block_sparse_moe.e_score_correction_bias``)."""
        buffers = {name: t for name, t in self.model.state_dict().items() if name not in self.params}
        metas = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in buffers.items()}
        return {*buffers, *_revert(self.model, metas)} if metas else set()

    def get(self, name: str) -> Target | None:
        """The target of checkpoint tensor `name` (None when the model has no such parameter)."""
        stem, index = matrix_of(name)
        if index is not None:
            whole = self.get(stem)
            return None if whole is None else whole.matrix(index, tuple(self.params[whole.parameter].shape))
        if name not in self._targets and self._converted:
            self._probe()
        return self._targets.get(name)

    def _probe(self) -> None:
        """Run the reverse conversion of each converted parameter on its flat indices (one at a time; int32 where they
        fit: a 64-expert Qwen3-MoE's 16 fused parameters took 3.2 s in int64 and a check by arithmetic, 0.6 s so). A
        parameter like one probed but in another layer (the same name after its layer's number, shape and dtype) whose
        checkpoint tensors are that one's under its own layer's prefix, with the same shapes, takes that one's views:
        one probe per kind of fused parameter, not per layer (a 28-layer mixture's reverse conversions copied 5 GB)."""
        n = max((self.params[pname].numel() for pname in self._converted), default=0)
        flat = torch.arange(n, dtype=torch.int32 if n <= torch.iinfo(torch.int32).max else torch.int64)  # one for all
        probed: dict[tuple, tuple[str, dict[str, Target]]] = {}  # kind -> (its probed parameter's layer prefix, its targets)
        for pname in self._converted:
            param = self.params[pname]
            prefix, rest = _layer_split(pname)
            kind = (rest, tuple(param.shape), param.dtype)
            if kind in probed and prefix is not None and (like := _like(probed[kind], prefix, self._shapes[pname], pname)) is not None:
                targets = like
            else:
                positions = _revert(self.model, {pname: flat[: param.numel()].view(param.shape)})
                targets = {name: _strided(pname, p, flat) for name, p in positions.items()}
                if prefix is not None:
                    probed.setdefault(kind, (prefix, targets))
            for name, target in targets.items():
                self._targets.setdefault(name, target)
        self._converted = []


_LAYER = re.compile(r"^(.*\.\d+)(\.\D.*)$")  # a parameter name: up to its last number (its layer), the rest


def _layer_split(pname: str) -> tuple[str | None, str]:
    """(its layer's prefix, the rest) of a parameter name; (None, the name) for one outside numbered layers."""
    match = _LAYER.match(pname)
    return (match.group(1), match.group(2)) if match else (None, pname)


def _like(probed: tuple[str, dict[str, Target]], prefix: str, shapes: dict[str, tuple[int, ...]], pname: str) -> dict[str, Target] | None:
    """The targets of parameter `pname` (layer `prefix`, checkpoint tensors `shapes` from the meta conversion) as the
    probed parameter's of its kind under its layer's prefix; None unless its tensors are exactly those, shape for shape."""
    other, targets = probed
    start = other + "."
    if not all(name.startswith(start) for name in targets):
        return None
    moved = {prefix + name[len(other) :]: t for name, t in targets.items()}
    if moved.keys() != shapes.keys() or any(tuple(t.shape) != shapes[name] for name, t in moved.items()):
        return None
    return {name: Target(pname, t.shape, t.strides, t.offset) for name, t in moved.items()}


def _strided(pname: str, positions: torch.Tensor, flat: torch.Tensor | None = None) -> Target:
    """`positions` as offset and strides; a conversion that is no strided view (one that computes) is refused. `flat`:
    ``arange(n)`` for some n above every position (default: made here), the strided view checked against its entries."""
    from .errors import CheckpointError

    first = [0] * positions.dim()
    offset = int(positions[tuple(first)]) if positions.numel() else 0
    strides = []
    for d, n in enumerate(positions.shape):
        step = list(first)
        step[d] = 1 if n > 1 else 0
        strides.append(int(positions[tuple(step)]) - offset if n > 1 else 1)
    extent = offset + sum((n - 1) * s for n, s in zip(positions.shape, strides))
    if flat is None or len(flat) <= extent:
        flat = torch.arange(max(extent + 1, 1), dtype=positions.dtype)
    if any(s < 0 for s in strides) or not torch.equal(flat.as_strided(positions.shape, strides, offset), positions.to(flat.dtype)):
        raise CheckpointError(f"transformers converts checkpoint tensors into {pname!r} by more than a strided view: "
                              "this architecture is not supported by hf_decompose")  # fmt: skip
    return Target(pname, tuple(positions.shape), tuple(strides), offset)


def _unchanged(state: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> bool:
    """Whether a reverse conversion gave back the very tensors of `state`, each under its own name."""
    return list(saved) == list(state) and all(saved[k] is v for k, v in state.items())


def _revert(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, state)
