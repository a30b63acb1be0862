"""`decompose`: checkpoints -> deltas -> criterion -> substructures -> a `DecomposedModel`."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from . import artifact
from .checkpoints import CheckpointPair, CheckpointReader, resolve, sha256_files
from .config import DecomposedConfig
from .criterion import assess_layer
from .deltas import exact_delta
from .errors import ArtifactError, ConfigError
from .groups import Geometry, ParamInfo, describe
from .modules import DecomposedModule
from .substructures import TensorDelta, extract, layer_components

WRAPPABLE = (nn.Linear, nn.Embedding, Conv1D)


def compute_deltas(pair: CheckpointPair, config: DecomposedConfig, progress: bool = True) -> tuple[dict[str, TensorDelta], list[dict]]:
    """Stream the pair one layer at a time; return the kept deltas and per-layer statistics."""
    model_type = pair.finetuned.config.get("model_type", "")
    try:
        geometry = Geometry.from_config(pair.finetuned.config)
    except ValueError:
        geometry = None
    by_layer: dict[str, list[ParamInfo]] = defaultdict(list)
    for name in pair.names():
        info = describe(name, pair.base.shape(name), model_type)
        by_layer[info.layer or name].append(info)
    deltas: dict[str, TensorDelta] = {}
    layers = []
    for layer, infos in tqdm(by_layer.items(), desc="decomposing", unit="layer", disable=not progress):
        layer_deltas = {}
        if config.mode == "lossless":
            for info in infos:
                base, ft = info.canonical(pair.base.get(info.name)), info.canonical(pair.finetuned.get(info.name))
                delta, idx, values = exact_delta(base, ft)
                layer_deltas[info.name] = extract(info, delta, delta != 0, overrides=(idx, values), dense_block_density=config.dense_block_density)
            tests = {}
        else:
            tensors = {i.name: (i, i.canonical(pair.finetuned.get(i.name)) - i.canonical(pair.base.get(i.name))) for i in infos}
            tests = assess_layer(tensors, config, geometry)
            for name, t in tests.items():
                lowrank = (t.spectral.u, t.spectral.v) if t.spectral and t.spectral.rank else None
                layer_deltas[name] = extract(t.info, t.residual, t.mask, lowrank=lowrank, dense_block_density=config.dense_block_density)
            del tensors
        deltas.update(layer_deltas)
        layers.append(_layer_stats(layer, infos, layer_deltas, tests, geometry))
    return deltas, layers


def _layer_stats(layer: str, infos: list[ParamInfo], deltas: dict[str, TensorDelta], tests: dict, geometry: Geometry | None) -> dict:
    entries = sum(int(torch.tensor(d.shape).prod()) for d in deltas.values())
    kept = sum(d.num_params() for d in deltas.values())
    comps = layer_components({n: (i, deltas[n]) for n, i in ((i.name, i) for i in infos)}, geometry)
    in_graph = {i.name for i in infos if i.role in ("q", "k", "v", "o", "gate", "up", "down", "c_attn", "c_fc", "c_proj")} if comps else set()
    rank = sum(d.rank for d in deltas.values())
    others = sum(d.num_substructures() - d.rank for n, d in deltas.items() if n not in in_graph)
    largest = comps[0] if comps else max(
        ({"rows": d.shape[0], "cols": d.shape[1] if len(d.shape) > 1 else 1} for d in deltas.values() if not d.is_empty()),
        key=lambda s: s["rows"] * s["cols"], default=None,
    )
    stats = {
        "name": layer,
        "kept_fraction": kept / entries if entries else 0.0,
        "kept_params": kept,
        "delta_params": entries,
        "num_substructures": len(comps) + rank + others,
        "spectral_rank": rank,
        "largest_substructure": largest,
    }
    if tests:
        stats["tensors"] = {n: t.stats for n, t in tests.items()}
    return stats


class DecomposedModel(nn.Module):
    """A transformers causal LM whose modules are the shared base plus kept substructures.

    Behaves like the wrapped model (``forward``, ``generate``, attributes); adds
    ``set_execution``, ``save_pretrained`` and ``from_pretrained``.
    """

    def __init__(self, model: nn.Module, deltas: dict[str, TensorDelta], config: DecomposedConfig, index: dict, report: dict, source_dir: Path):
        super().__init__()
        self.model = model
        self.deltas = deltas
        self.decomposed_config = config
        self.index = index
        self.report = report
        self.source_dir = source_dir  # where config.json and the tokenizer come from

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    def set_execution(self, execution: str) -> DecomposedModel:
        """Switch every decomposed module to ``"merged"`` or ``"split"``."""
        if execution not in ("merged", "split"):
            raise ConfigError(f"execution={execution!r} is not one of ('merged', 'split')")
        for module in self.model.modules():
            if isinstance(module, DecomposedModule):
                module.execution = execution
        self.decomposed_config.execution = execution
        return self

    def save_pretrained(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the artifact (only what differs from the base) atomically."""
        path = artifact.save(directory, self.deltas, self.index, self.report, self.source_dir, overwrite=overwrite)
        self.report = artifact.read_report(path)
        return path

    @classmethod
    def from_pretrained(cls, directory: str | Path, base_model: str | Path | None = None, execution: str | None = None, **hub_kwargs) -> DecomposedModel:
        """Rebuild from an artifact directory; the base comes from the index unless given."""
        directory = Path(directory)
        index, deltas = artifact.load(directory)
        config = DecomposedConfig.from_dict(index["config"])
        if execution:
            config.execution = execution
        recorded = index["base_model"]
        base_dir = resolve(base_model or recorded["id"], None if base_model else recorded.get("revision"), **hub_kwargs)
        actual = sha256_files(CheckpointReader(base_dir).files)
        if actual != recorded["sha256"]:
            raise ArtifactError(
                f"base mismatch: {directory} was decomposed against {recorded['id']} (revision {recorded.get('revision')}, "
                f"sha256 {sorted(recorded['sha256'].values())[0][:12]}...) but {base_dir} has sha256 {sorted(actual.values())[0][:12]}..."
            )
        model = build_model(base_dir, directory, deltas, config)
        report = artifact.read_report(directory) if (directory / artifact.REPORT).exists() else {}
        return cls(model, deltas, config, index, report, directory)


def build_model(base_dir: Path, config_dir: Path, deltas: dict[str, TensorDelta], config: DecomposedConfig) -> nn.Module:
    """Load the base with the fine-tune's config and graft the deltas onto it."""
    hf_config = AutoConfig.from_pretrained(config_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, config=hf_config, dtype=torch.float32)
    model.eval()
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())  # owners as loaded, before any is wrapped
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    wrapped: dict[int, DecomposedModule] = {}
    for name, delta in deltas.items():
        if delta.is_empty():
            continue
        pname = _param_name(name, params)
        if pname is None and tied and name.endswith("lm_head.weight"):
            pname = _param_name(next(n for n in deltas if n.endswith(("embed_tokens.weight", "wte.weight"))), params)
        if pname is None:
            raise ArtifactError(f"tensor {name!r} has no matching parameter in {type(model).__name__}")
        owner_name, _, attr = pname.rpartition(".")
        owner = modules[owner_name]
        if attr == "weight" and isinstance(owner, WRAPPABLE):
            module = DecomposedModule(owner, delta, config.execution)
            _set_submodule(model, owner_name, module)
            wrapped[id(owner)] = module
        else:  # vectors (norms, biases) and other small tensors: merged in place
            param = getattr(owner, attr)
            setattr(owner, attr, nn.Parameter(delta.merge(param.detach()), requires_grad=False))
    if tied and id(embed) in wrapped:
        head_name = next(n for n, m in model.named_modules() if m is head)
        _set_submodule(model, head_name, DecomposedModule(head, wrapped[id(embed)].delta, config.execution, tied=wrapped[id(embed)]))
    return model


def _param_name(name: str, params: dict[str, nn.Parameter]) -> str | None:
    if name in params:
        return name
    matches = [p for p in params if p.endswith("." + name) or name.endswith("." + p)]
    return matches[0] if len(matches) == 1 else None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def decompose(
    finetuned: str | Path,
    base_model: str | Path | None = None,
    config: DecomposedConfig | None = None,
    *,
    revision: str | None = None,
    progress: bool = True,
    **hub_kwargs,
) -> DecomposedModel:
    """Decompose a fine-tune against its base: the library's one verb.

    Example::

        model = decompose("my-finetune", base_model="my-base", config=DecomposedConfig(mode="criterion"))
        model.save_pretrained("out")
    """
    config = config or DecomposedConfig()
    base_model = base_model or config.base_model
    if base_model is None:
        raise ConfigError("no base model: pass base_model= or set DecomposedConfig.base_model")
    if config.null == "init":
        raise ConfigError("null='init' tests weights against their initialization distribution (criterion statistics); "
                          "building a decomposed model needs null='reference'")
    t0 = time.perf_counter()
    base_dir = resolve(base_model, config.base_revision, **hub_kwargs)
    ft_dir = resolve(finetuned, revision, **hub_kwargs)
    pair = CheckpointPair(CheckpointReader(base_dir), CheckpointReader(ft_dir))
    t1 = time.perf_counter()
    deltas, layers = compute_deltas(pair, config, progress=progress)
    t2 = time.perf_counter()
    model = build_model(base_dir, ft_dir, deltas, config)
    t3 = time.perf_counter()
    total = sum(int(torch.tensor(d.shape).prod()) for d in deltas.values())
    kept = sum(d.num_params() for d in deltas.values())
    index = {
        "config": config.to_dict(),
        "base_model": {"id": str(base_model), "revision": config.base_revision, "sha256": sha256_files(pair.base.files)},
        "finetuned_model": {"id": str(finetuned), "revision": revision},
    }
    report = {
        "base_model": str(base_model),
        "finetuned_model": str(finetuned),
        "mode": config.mode,
        "kept_fraction": kept / total if total else 0.0,
        "kept_params": kept,
        "delta_params": total,
        "num_substructures": sum(layer["num_substructures"] for layer in layers),
        "size_bytes": {"artifact": 4 * kept, "finetuned": pair.finetuned.nbytes(), "base": pair.base.nbytes()},
        "layers": layers,
        "timings": {"read_and_validate_s": t1 - t0, "criterion_and_substructures_s": t2 - t1, "build_model_s": t3 - t2},
    }
    return DecomposedModel(model, deltas, config, index, report, ft_dir)
