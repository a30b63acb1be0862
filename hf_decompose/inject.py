"""Module surgery: an artifact's deltas put into a loaded transformers model, and taken out again.

* merged: every changed parameter becomes base + delta in place (computed in float32, stored in the
  parameter's dtype). Nothing else stays in memory: the model holds what the fine-tune holds.
* split: matrices (linear, embedding, Conv1D, the tied head) become `DecomposedModule` (the base
  module plus its substructures, `hf_decompose.parts`); vectors (norms, biases) are merged in place.

A module whose weights Accelerate keeps offloaded (on the meta device) always runs split: its base
weight is only materialised inside its forward.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import ArtifactError, CheckpointError
from .modules import DecomposedModule
from .names import Target, TensorTargets
from .parts import TensorDelta

WRAPPABLE = (nn.Linear, nn.Embedding, Conv1D)


def apply_deltas(model: nn.Module, deltas: dict[str, TensorDelta], execution: str, swappable: bool = False,
                 targets: TensorTargets | None = None) -> None:
    """Put `deltas` (checkpoint tensor name -> delta) into `model`, merged or split (see the module docstring).

    `swappable`: every changed matrix becomes a `DecomposedModule` run as `execution`, so that its delta
    can be swapped (`DecomposedModule.set_delta`: annealing tries several). `targets`: the model's
    `TensorTargets`, when the caller has them already. Entries of a fused parameter
    (mixture-of-experts weights stored per expert) are always merged in place, through their view.
    """
    targets = targets or TensorTargets(model)
    modules = dict(model.named_modules())  # owners as loaded, before any is wrapped
    names = list(deltas)
    done: set[str] = set()
    wrapped: dict[str, DecomposedModule] = {}
    for name, delta in deltas.items():
        try:
            target = target_parameter(name, names, model, targets)
        except CheckpointError:
            if delta.is_empty():  # a saved buffer (old GPT-2 attention masks): nothing to put in
                continue
            raise
        owner_name, _, attr = target.parameter.rpartition(".")
        owner = modules[owner_name]
        param = getattr(owner, attr)
        stored = tuple(reversed(delta.shape)) if delta.transposed else tuple(delta.shape)
        shape = tuple(param.shape) if target.strides is None else target.shape
        if shape != stored:  # checked for unchanged tensors too: an entry must describe the model
            raise ArtifactError(f"tensor {name!r}: its delta has shape {stored}, parameter {target.parameter} of {type(model).__name__} has {shape}")
        if delta.is_empty() or (target.strides is None and target.parameter in done):  # a tied head beside its embedding: once
            continue
        done.add(target.parameter)
        if target.strides is not None:
            with torch.no_grad():
                view = target.view(param.data)
                view.copy_(delta.merge(view))
        elif runs_split(target, owner) and (swappable or execution == "split" or param.device.type == "meta"):
            wrapped[owner_name] = DecomposedModule(owner, delta, execution if swappable else "split")
            if param.device.type != "meta":
                wrapped[owner_name].ops.to(param.device)
            set_submodule(model, owner_name, wrapped[owner_name])
        else:
            merge_into(param, delta)
    _wrap_tied_head(model, modules, wrapped)


def off_text_path(model: nn.Module) -> set[str]:
    """Names of the modules a forward on token ids alone never calls: those outside the decoder and the input and output
    embeddings (a multimodal model's vision tower and projector). The guard's calibration is text, so it cannot weigh a
    change there: annealing keeps those deltas exact. They run on a batch's images, not on its rows: serving fine-tunes by
    name, a batch mixing fine-tunes that change them is refused."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    roots = [m for m in (model if decoder is None else decoder, model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    inside = {id(m) for root in roots for m in root.modules()}
    return {n for n, m in model.named_modules() if not any(id(sub) in inside for sub in m.modules())}


def runs_split(target: Target, owner: nn.Module) -> bool:
    """Whether split execution runs this delta as substructures: the whole weight of a `wrappable` module
    (vectors, entries of fused parameters and modules with a forward of their own stay merged)."""
    return target.strides is None and target.parameter.rpartition(".")[2] == "weight" and wrappable(owner)


def wrappable(module: nn.Module) -> bool:
    """Modules whose forward `DecomposedModule` reproduces exactly: plain linear, embedding and GPT-2 Conv1D
    layers, and scaled word embeddings (Gemma's). Subclasses with a forward of their own (OPT's learned
    positions, called with position ids) are merged in place instead."""
    return type(module) in WRAPPABLE or (isinstance(module, nn.Embedding) and hasattr(module, "embed_scale"))


def merged_values(owner: nn.Module, attrs: dict[str, list[tuple[TensorDelta, Target]]]) -> dict[str, torch.Tensor]:
    """Copies of `owner`'s parameters named in `attrs`, each delta merged into the entries its target views (a fused
    parameter takes several)."""
    values = {}
    for attr, found in attrs.items():
        value = getattr(owner, attr).detach().clone()
        for delta, target in found:
            view = target.view(value)
            view.copy_(delta.merge(view))
        values[attr] = value
    return values


def merge_into(param: nn.Parameter, delta: TensorDelta) -> None:
    """param <- param + delta, in place (the same Parameter and storage, so ties, views and optimizers keep it)."""
    if param.device.type == "meta":
        raise CheckpointError(f"cannot merge the delta of {delta.name!r} into an offloaded parameter")
    with torch.no_grad():
        param.copy_(delta.merge(param))


def _wrap_tied_head(model: nn.Module, modules: dict[str, nn.Module], wrapped: dict[str, DecomposedModule]) -> None:
    """A head tied to a wrapped embedding runs the embedding's parts (stored and placed there only)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embed, DecomposedModule) or head is None or isinstance(head, DecomposedModule):
        return
    if head.weight is not embed.base.weight:
        return
    head_name = next(n for n, m in modules.items() if m is head)
    set_submodule(model, head_name, DecomposedModule(head, embed.delta, embed.execution, tied=embed))


def unwrap(model: nn.Module) -> dict[str, DecomposedModule]:
    """Put every `DecomposedModule`'s base module back in its place; return the wrappers by name."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, DecomposedModule)}
    for name, module in found.items():
        set_submodule(model, name, module.base)
    return found


def tied(model: nn.Module) -> bool:
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    embed = embed.base if isinstance(embed, DecomposedModule) else embed
    head = head.base if isinstance(head, DecomposedModule) else head
    return head is not None and embed is not None and head.weight is embed.weight


def target_parameter(name: str, names: list[str], model: nn.Module, targets: TensorTargets) -> Target:
    """Where in `model` tensor `name`'s delta applies (`names.TensorTargets`, transformers' own checkpoint
    conversion; else a unique parameter whose name ends alike; a tied LM head's: the input embedding)."""
    target = targets.get(name)
    if target is None:
        pname = param_name(name, targets.params)
        if pname is None and name.endswith("lm_head.weight") and tied(model):
            pname = param_name(next(n for n in names if n.endswith(("embed_tokens.weight", "wte.weight"))), targets.params)
        target = None if pname is None else Target(pname)
    if target is None:
        raise CheckpointError(f"tensor {name!r} has no matching parameter in {type(model).__name__} "
                              "(an unsupported module or architecture: nothing was decomposed)")
    return target


def param_name(name: str, params: dict[str, nn.Parameter]) -> str | None:
    if name in params:
        return name
    matches = [p for p in params if p.endswith("." + name) or name.endswith("." + p)]
    return matches[0] if len(matches) == 1 else None


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
