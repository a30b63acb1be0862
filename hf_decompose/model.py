"""`decompose`: checkpoints -> deltas -> criterion -> substructures -> a `DecomposedModel`;
`decompose_to_disk`: the same, layer by layer into an artifact, without the model."""

from __future__ import annotations

import math
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from . import artifact, locks, resume
from .checkpoints import TORCH_DTYPES, CheckpointPair, CheckpointReader, read_config, resolve, sha256_files
from .config import DecomposedConfig
from .annealing import anneal_model
from .criterion import assess_layer
from .deltas import exact_delta, narrow_delta
from .equivalence import load_prompts
from .errors import ArtifactError, CheckpointError, ConfigError, DecomposeError, PromptError
from .groups import READS_HIDDEN, WRITES_HIDDEN, Geometry, ParamInfo, describe
from .heap import release_free_memory
from .hub import commit_of, push_artifact
from .modules import DecomposedModule
from .names import Target, TensorTargets
from .placement import place
from .substructures import TensorDelta, extract, layer_components

WRAPPABLE = (nn.Linear, nn.Embedding, Conv1D)
CHUNK_BYTES = 4 * 2**20  # large tensors are read and differenced this many bytes of rows at a time


def compute_deltas(
    pair: CheckpointPair, config: DecomposedConfig, progress: bool = True, cache: resume.LayerCache | None = None
) -> tuple[dict[str, TensorDelta], list[dict]]:
    """The kept deltas of every tensor and the per-layer statistics (`iter_layers`, collected)."""
    deltas: dict[str, TensorDelta] = {}
    layers = []
    for layer_deltas, stats in iter_layers(pair, config, progress, cache):
        deltas.update(layer_deltas)
        layers.append(stats)
    return deltas, layers


def iter_layers(
    pair: CheckpointPair, config: DecomposedConfig, progress: bool = True, cache: resume.LayerCache | None = None
) -> Iterator[resume.LayerResult]:
    """Stream the pair one layer at a time: yield each layer's kept deltas and statistics.

    Layers found in `cache` are reused, layers computed are added to it.
    """
    model_type = pair.finetuned.config.get("model_type", "")
    try:
        geometry = Geometry.from_config(pair.finetuned.config)
    except ValueError:
        geometry = None
    by_layer: dict[str, list[ParamInfo]] = defaultdict(list)
    for name in pair.names():
        info = describe(name, pair.finetuned.shape(name), model_type)
        by_layer[info.layer or name].append(info)
    for i, (layer, infos) in enumerate(tqdm(sorted(by_layer.items(), key=lambda kv: _natural(kv[0])), desc="decomposing", unit="layer", disable=not progress)):
        yield resume.cached_layer(cache, i, layer, lambda: _compute_layer(pair, config, geometry, layer, infos))
        release_free_memory()  # kept deltas interleave with freed temporaries: give those pages back


def _compute_layer(pair: CheckpointPair, config: DecomposedConfig, geometry: Geometry | None, layer: str, infos: list[ParamInfo]) -> resume.LayerResult:
    layer_deltas = {}
    if config.mode in ("lossless", "anneal"):  # annealing starts from the exact decomposition
        for info in infos:
            delta, idx, values = _exact_delta(pair, info)  # in the fine-tune's dtype where it is 16-bit
            nonzero = torch.from_numpy(delta.numpy() != 0) if delta.dtype == torch.float32 else delta != 0  # numpy: faster
            layer_deltas[info.name] = extract(info, delta, nonzero, overrides=(idx, values), dense_block_density=config.dense_block_density, in_place=True)
            if config.mode == "lossless" and delta.dtype != torch.float32:
                layer_deltas[info.name] = _at_most_finetuned(pair, info, layer_deltas[info.name])
        tests = {}
    else:
        tests = assess_layer({i.name: (i, _delta(pair, i)) for i in infos}, config, geometry, in_place=True)
        release_free_memory()  # the tests' temporaries, before the substructures are gathered
        for name, t in tests.items():
            lowrank = (t.spectral.u, t.spectral.v) if t.spectral and t.spectral.rank else None
            layer_deltas[name] = extract(t.info, t.residual, t.mask, lowrank=lowrank, dense_block_density=config.dense_block_density, in_place=True)
    return layer_deltas, _layer_stats(layer, infos, layer_deltas, tests, geometry)


def _at_most_finetuned(pair: CheckpointPair, info: ParamInfo, delta: TensorDelta) -> TensorDelta:
    """`delta`, or where it costs more bytes than the 16-bit fine-tune tensor itself, that tensor's own
    values (every entry replaced): a lossless artifact is never larger than the fine-tune."""
    dtype = TORCH_DTYPES[pair.finetuned.dtype(info.name)]
    if delta.nbytes() <= math.prod(delta.shape) * dtype.itemsize:
        return delta
    values = info.canonical(pair.finetuned.get(info.name)).to(dtype).contiguous()
    return TensorDelta(info.name, delta.shape, info.transposed, override_values=values)


def _row_blocks(pair: CheckpointPair, info: ParamInfo) -> Iterator[tuple[slice | None, torch.Tensor, torch.Tensor]]:
    """(rows, base, fine-tune) of one tensor as float32 in canonical layout: whole (rows None), or for a
    large matrix (an embedding) `CHUNK_BYTES` of rows at a time, so that it is never held three times."""
    shape = pair.finetuned.shape(info.name)
    row_bytes = 4 * math.prod(shape[1:])
    if info.transposed or len(shape) < 2 or shape[0] * row_bytes <= CHUNK_BYTES:
        yield None, info.canonical(pair.base_tensor(info.name)), info.canonical(pair.finetuned.get(info.name))
        return
    step = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, shape[0], step):
        rows = slice(start, min(start + step, shape[0]))
        yield rows, pair.base_tensor(info.name, rows), pair.finetuned.get(info.name, rows)


def _delta(pair: CheckpointPair, info: ParamInfo) -> torch.Tensor:
    """fine-tune - base, float32, canonical layout."""
    out = None
    for rows, base, ft in _row_blocks(pair, info):
        if rows is None:
            return ft - base
        out = torch.empty(pair.finetuned.shape(info.name)) if out is None else out
        torch.sub(ft, base, out=out[rows])
    return out


def _exact_delta(pair: CheckpointPair, info: ParamInfo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`deltas.exact_delta` of one tensor, computed a block of rows at a time (it is entry-wise); for a
    16-bit fine-tune tensor `deltas.narrow_delta`, stored in its dtype."""
    dtype = TORCH_DTYPES[pair.finetuned.dtype(info.name)]
    exact = (lambda b, f: narrow_delta(b, f, dtype, pair.dtype)) if dtype in (torch.float16, torch.bfloat16) else exact_delta
    out, indices, values = None, [], []
    for rows, base, ft in _row_blocks(pair, info):
        delta, idx, vals = exact(base, ft)
        if rows is None:
            return delta, idx, vals
        out = torch.empty(pair.finetuned.shape(info.name), dtype=delta.dtype) if out is None else out
        out[rows] = delta
        idx[:, 0] += rows.start
        indices.append(idx)
        values.append(vals)
    return out, torch.cat(indices), torch.cat(values)


def _natural(name: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def summarize_layers(deltas: dict[str, TensorDelta], hf_config: dict) -> list[dict]:
    """Per-layer statistics of kept deltas (after annealing, where no tests ran)."""
    model_type = hf_config.get("model_type", "")
    try:
        geometry = Geometry.from_config(hf_config)
    except ValueError:
        geometry = None
    by_layer: dict[str, list[ParamInfo]] = defaultdict(list)
    for name, d in deltas.items():
        info = describe(name, d.shape, model_type)
        by_layer[info.layer or name].append(info)
    return [_layer_stats(layer, infos, {i.name: deltas[i.name] for i in infos}, {}, geometry) for layer, infos in sorted(by_layer.items(), key=lambda kv: _natural(kv[0]))]


def _layer_stats(layer: str, infos: list[ParamInfo], deltas: dict[str, TensorDelta], tests: dict, geometry: Geometry | None) -> dict:
    entries = sum(int(torch.tensor(d.shape).prod()) for d in deltas.values())
    kept = sum(d.num_params() for d in deltas.values())
    comps = layer_components({n: (i, deltas[n]) for n, i in ((i.name, i) for i in infos)}, geometry)
    in_graph = {i.name for i in infos if i.role in READS_HIDDEN | WRITES_HIDDEN} if comps else set()
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
        "stored_bytes": sum(d.nbytes() for d in deltas.values()),
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

    def __init__(
        self, model: nn.Module, deltas: dict[str, TensorDelta], config: DecomposedConfig, index: dict, report: dict, source_dir: Path,
        resume_dir: str | Path | None = None,
    ):
        super().__init__()
        self.model = model
        self.deltas = deltas
        self.decomposed_config = config
        self.index = index
        self.report = report
        self.source_dir = source_dir  # where config.json and the tokenizer come from
        self.resume_dir = resume_dir  # the layer cache of `decompose`, deleted once saved

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

    def dispatch(self, device_map="auto", max_memory: dict | None = None, offload_folder: str | Path | None = None, strategy: str = "spread") -> DecomposedModel:
        """Place base layers and substructures through Accelerate (`placement.place`): ``device_map`` is
        ``"auto" | "balanced" | "balanced_low_0" | "sequential" | {module name: device}``."""
        if device_map is not None:
            place(self, device_map, max_memory=max_memory, offload_folder=offload_folder, strategy=strategy)
        return self

    def save_pretrained(self, directory: str | Path, overwrite: bool = False, push_to_hub: bool = False, **push_kwargs) -> Path:
        """Write the artifact (only what differs from the base) atomically; with `push_to_hub`, upload it
        too (``repo_id`` defaults to the directory's name; other keywords as in `push_to_hub`)."""
        path = artifact.save(directory, self.deltas, self.index, self.report, self.source_dir, overwrite=overwrite)
        self.report = artifact.read_report(path)
        if self.resume_dir is not None:
            resume.clear(self.resume_dir)
            self.resume_dir = None
        if push_to_hub:
            push_artifact(path, push_kwargs.pop("repo_id", Path(path).name), **push_kwargs)
        return path

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the artifact and its model card to the Hub (`hf_decompose.hub.push_artifact` keywords:
        ``token``, ``private``, ``revision``, ``commit_message``, ``create_pr``, ``tags``); returns the `CommitInfo`."""
        with tempfile.TemporaryDirectory() as tmp:
            return push_artifact(artifact.save(Path(tmp) / "artifact", self.deltas, self.index, self.report, self.source_dir), repo_id, **kwargs)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, base_model: str | Path | None = None, execution: str | None = None, base_revision: str | None = None,
        device_map=None, max_memory: dict | None = None, offload_folder: str | Path | None = None, **hub_kwargs
    ) -> DecomposedModel:
        """Rebuild from an artifact directory; the base (and its revision) comes from the index unless given.
        With `device_map` (`max_memory`, `offload_folder`) the model is placed as by `dispatch`."""
        directory = Path(directory)
        index, deltas = artifact.load(directory)
        config = DecomposedConfig.from_dict(index["config"])
        if execution:
            config.execution = execution
        recorded = index["base_model"]
        base_dir = resolve(base_model or recorded["id"], base_revision or (None if base_model else recorded.get("revision")), **hub_kwargs)
        actual = sha256_files(CheckpointReader(base_dir).files)
        if actual != recorded["sha256"]:
            raise ArtifactError(
                f"base mismatch: {directory} was decomposed against {recorded['id']} (revision {recorded.get('revision')}, "
                f"sha256 {sorted(recorded['sha256'].values())[0][:12]}...) but {base_dir} has sha256 {sorted(actual.values())[0][:12]}..."
            )
        dtype = getattr(torch, str(index.get("finetuned_model", {}).get("dtype")), None)  # None: the config's
        model = build_model(base_dir, directory, deltas, config, dtype if isinstance(dtype, torch.dtype) else None)
        report = artifact.read_report(directory) if (directory / artifact.REPORT).exists() else {}
        return cls(model, deltas, config, index, report, directory).dispatch(device_map, max_memory, offload_folder)


def build_model(base_dir: Path, config_dir: Path, deltas: dict[str, TensorDelta], config: DecomposedConfig, dtype: torch.dtype | None = None) -> nn.Module:
    """Load the base with the fine-tune's config, in the fine-tune's `dtype` (default: its config's, else
    float32), and graft the deltas onto it (merged in float32, cast back to each parameter's dtype)."""
    hf_config = _plain_config(config_dir)
    model = _load_base(base_dir, hf_config, dtype or _config_dtype(hf_config))
    model.eval()
    targets = TensorTargets(model)
    modules = dict(model.named_modules())  # owners as loaded, before any is wrapped
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = _tied(model)
    wrapped: dict[int, DecomposedModule] = {}
    names = list(deltas)
    for name, delta in deltas.items():
        if delta.is_empty():
            continue
        target = _target_parameter(name, names, model, targets)
        owner_name, _, attr = target.parameter.rpartition(".")
        owner = modules[owner_name]
        if target.strides is not None:  # part of a fused parameter (experts): merged in place there
            with torch.no_grad():
                view = target.view(getattr(owner, attr).data)
                view.copy_(delta.merge(view))
        elif attr == "weight" and _wrappable(owner):
            module = DecomposedModule(owner, delta, config.execution)
            _set_submodule(model, owner_name, module)
            wrapped[id(owner)] = module
        else:  # vectors (norms, biases), other small tensors, modules whose forward is their own: merged in place
            param = getattr(owner, attr)
            setattr(owner, attr, nn.Parameter(delta.merge(param.detach()), requires_grad=False))
    if tied and id(embed) in wrapped:
        head_name = next(n for n, m in model.named_modules() if m is head)
        _set_submodule(model, head_name, DecomposedModule(head, wrapped[id(embed)].delta, config.execution, tied=wrapped[id(embed)]))
    return model


def _plain_config(config_dir: Path):
    """The transformers config of `config_dir`; an artifact's config.json without its quantization entries."""
    hf_config = AutoConfig.from_pretrained(config_dir)
    for key in ("quantization_config", "transformers_weights"):  # an artifact's config.json: load the base plainly
        if hasattr(hf_config, key):
            delattr(hf_config, key)
    return hf_config


def _tied(model: nn.Module) -> bool:
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def _wrappable(module: nn.Module) -> bool:
    """Modules whose forward `DecomposedModule` reproduces exactly: plain linear, embedding and GPT-2 Conv1D
    layers, and scaled word embeddings (Gemma's). Subclasses with a forward of their own (OPT's learned
    positions, called with position ids) are merged in place instead."""
    return type(module) in WRAPPABLE or (isinstance(module, nn.Embedding) and hasattr(module, "embed_scale"))


def _target_parameter(name: str, names: list[str], model: nn.Module, targets: TensorTargets) -> Target:
    """Where in `model` tensor `name`'s delta applies (`names.TensorTargets`, transformers' own checkpoint
    conversion; else a unique parameter whose name ends alike; a tied LM head's: the input embedding)."""
    target = targets.get(name)
    if target is None:
        pname = _param_name(name, targets.params)
        if pname is None and name.endswith("lm_head.weight") and _tied(model):
            pname = _param_name(next(n for n in names if n.endswith(("embed_tokens.weight", "wte.weight"))), targets.params)
        target = None if pname is None else Target(pname)
    if target is None:
        raise CheckpointError(f"tensor {name!r} has no matching parameter in {type(model).__name__} "
                              "(an unsupported module or architecture: nothing was decomposed)")
    return target


def _check_targets(pair: CheckpointPair, ft_dir: Path) -> None:
    """Refuse, before any work, a checkpoint tensor with no place in the fine-tune's model class (saved
    buffers, such as old GPT-2 attention masks, aside)."""
    skeleton = _skeleton(ft_dir)
    targets, names = TensorTargets(skeleton), pair.names()
    buffers = tuple(n for n, _ in skeleton.named_buffers())
    for name in names:
        if not name.endswith(buffers) and not any(b.endswith("." + name) for b in buffers):
            _target_parameter(name, names, skeleton, targets)


def _skeleton(config_dir: Path) -> nn.Module:
    """The fine-tune's model class with no weights (meta device): to check deltas fit it without building it."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(_plain_config(config_dir))


def _config_dtype(hf_config) -> torch.dtype:
    dtype = getattr(hf_config, "dtype", None)
    dtype = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _load_base(base_dir: Path, hf_config, dtype: torch.dtype) -> nn.Module:
    """The base as a model of the fine-tune's config in the fine-tune's dtype, loaded as transformers
    loads the fine-tune (parameters cast on load; buffers such as RoPE's ``inv_freq`` as the model
    makes them); token rows the fine-tune added start at zero."""
    base_vocab, vocab = read_config(base_dir).get("vocab_size"), getattr(hf_config, "vocab_size", None)
    if base_vocab is None or vocab == base_vocab:
        return AutoModelForCausalLM.from_pretrained(base_dir, config=hf_config, dtype=dtype)
    hf_config.vocab_size = base_vocab
    model = AutoModelForCausalLM.from_pretrained(base_dir, config=hf_config, dtype=dtype)
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the new rows' random init is overwritten
        model.resize_token_embeddings(vocab, mean_resizing=False)
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                module.weight[base_vocab:] = 0
    return model


def _param_name(name: str, params: dict[str, nn.Parameter]) -> str | None:
    if name in params:
        return name
    matches = [p for p in params if p.endswith("." + name) or name.endswith("." + p)]
    return matches[0] if len(matches) == 1 else None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@dataclass
class _Inputs:
    """A resolved, validated pair and what its artifact records about it."""

    base_dir: Path
    ft_dir: Path
    pair: CheckpointPair
    base_sha: dict[str, str]
    cache: resume.LayerCache | None
    index: dict
    read_s: float


def _open_inputs(finetuned, base_model, config: DecomposedConfig, revision, resume_dir, hub_kwargs: dict) -> _Inputs:
    t0 = time.perf_counter()
    if base_model is None:
        raise ConfigError("no base model: pass base_model= or set DecomposedConfig.base_model")
    if config.null == "init":
        raise ConfigError("null='init' tests weights against their initialization distribution (criterion statistics); "
                          "building a decomposed model needs null='reference'")
    base_dir = resolve(base_model, config.base_revision, **hub_kwargs)
    ft_dir = resolve(finetuned, revision, **hub_kwargs)
    pair = CheckpointPair(CheckpointReader(base_dir), CheckpointReader(ft_dir))
    _check_targets(pair, ft_dir)
    base_sha = sha256_files(pair.base.files)
    cache = None if resume_dir is None else resume.LayerCache(resume_dir, resume.cache_record(base_sha, sha256_files(pair.finetuned.files), config))
    index = {
        "config": config.to_dict(),
        "base_model": {"id": str(base_model), "revision": commit_of(base_dir) or config.base_revision, "sha256": base_sha},  # pinned
        "finetuned_model": {"id": str(finetuned), "revision": commit_of(ft_dir) or revision, "dtype": str(pair.dtype).removeprefix("torch.")},
    }
    return _Inputs(base_dir, ft_dir, pair, base_sha, cache, index, time.perf_counter() - t0)


def _report(inputs: _Inputs, config: DecomposedConfig, layers: list[dict], timings: dict) -> dict:
    total = sum(layer["delta_params"] for layer in layers)
    kept = sum(layer["kept_params"] for layer in layers)
    stored = sum(layer["stored_bytes"] for layer in layers)
    pair = inputs.pair
    return {
        "base_model": inputs.index["base_model"]["id"],
        "finetuned_model": inputs.index["finetuned_model"]["id"],
        "mode": config.mode,
        "kept_fraction": kept / total if total else 0.0,
        "kept_params": kept,
        "delta_params": total,
        "stored_fraction": stored / (4 * total) if total else 0.0,  # stored bytes over the delta in float32
        "num_substructures": sum(layer["num_substructures"] for layer in layers),
        "size_bytes": {"artifact": stored, "finetuned": pair.finetuned.nbytes(), "base": pair.base.nbytes()},
        "layers": layers,
        "timings": {"read_and_validate_s": inputs.read_s} | timings,
    }


def _log_resumed(inputs: _Inputs, layers: int, resume_dir) -> None:
    if inputs.cache is not None and inputs.cache.reused:
        resume.logger.info("resumed %d of %d layers from %s", inputs.cache.reused, layers, resume_dir)


def decompose(
    finetuned: str | Path,
    base_model: str | Path | None = None,
    config: DecomposedConfig | None = None,
    *,
    revision: str | None = None,
    progress: bool = True,
    resume_dir: str | Path | None = None,
    device_map=None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
    calibration=None,
    **hub_kwargs,
) -> DecomposedModel:
    """Decompose a fine-tune against its base: the library's one verb.

    With `resume_dir`, finished layers are cached there and reused by a re-run of the same inputs
    and config; `save_pretrained` deletes the cache once the artifact is written. ``mode="anneal"``
    needs `calibration` prompts (a list, dataset or file; keep them disjoint from evaluation prompts). With `device_map`
    (`max_memory`, `offload_folder`) the model is placed as by `DecomposedModel.dispatch`. To write an
    artifact without building the model (less memory), use `decompose_to_disk`.

    Example::

        model = decompose("my-finetune", base_model="my-base", config=DecomposedConfig(mode="criterion"))
        model.save_pretrained("out")
    """
    config = config or DecomposedConfig()
    if config.mode == "anneal":  # bad or missing calibration fails before any checkpoint is read
        if calibration is None:
            raise PromptError("mode='anneal' needs calibration prompts (decompose(..., calibration=...)), disjoint from evaluation prompts")
        calibration = load_prompts(calibration)
    inputs = _open_inputs(finetuned, base_model or config.base_model, config, revision, resume_dir, hub_kwargs)
    t1 = time.perf_counter()
    try:
        deltas, layers = compute_deltas(inputs.pair, config, progress=progress, cache=inputs.cache)
        t2 = time.perf_counter()
        model = build_model(inputs.base_dir, inputs.ft_dir, deltas, config, inputs.pair.dtype)
    except DecomposeError:  # a bad input: nothing to resume
        if resume_dir is not None:
            resume.clear(resume_dir)
        raise
    finally:
        if inputs.cache is not None:
            inputs.cache.close()
    _log_resumed(inputs, len(layers), resume_dir)
    t3 = time.perf_counter()
    annealing_report = None
    if config.mode == "anneal":
        deltas, annealing_report = anneal_model(model, deltas, inputs.ft_dir, inputs.base_dir, calibration, config, progress)
        layers = summarize_layers(deltas, inputs.pair.finetuned.config)
    t4 = time.perf_counter()
    report = _report(inputs, config, layers, {"criterion_and_substructures_s": t2 - t1, "build_model_s": t3 - t2, "annealing_s": t4 - t3})
    if annealing_report is not None:
        report["annealing"] = annealing_report
    return DecomposedModel(model, deltas, config, inputs.index, report, inputs.ft_dir, resume_dir=resume_dir).dispatch(device_map, max_memory, offload_folder)


def decompose_to_disk(
    finetuned: str | Path,
    base_model: str | Path | None = None,
    config: DecomposedConfig | None = None,
    *,
    output_dir: str | Path,
    overwrite: bool = False,
    revision: str | None = None,
    progress: bool = True,
    resume_dir: str | Path | None = None,
    **hub_kwargs,
) -> Path:
    """`decompose(...).save_pretrained(output_dir)` without building the model: each layer's deltas are
    written to the artifact as soon as they are computed and then dropped, so memory stays near one
    layer of each checkpoint (the largest: the embedding). The artifact is the same (its weights file
    byte for byte; the report's timings aside). Modes ``lossless`` and ``criterion``; ``anneal`` needs
    the model (use `decompose`). Returns the artifact's directory.
    """
    config = config or DecomposedConfig()
    if config.mode == "anneal":
        raise ConfigError("mode='anneal' runs the model on calibration prompts: use decompose(...).save_pretrained(...)")
    with locks.owning(output_dir):  # one run per output, from the first check to the published artifact
        return _decompose_to_disk(finetuned, base_model, config, output_dir, overwrite, revision, progress, resume_dir, hub_kwargs)


def _decompose_to_disk(finetuned, base_model, config: DecomposedConfig, output_dir, overwrite: bool, revision, progress: bool, resume_dir, hub_kwargs: dict) -> Path:
    artifact.check_target(output_dir, overwrite)  # before any work; a refused target keeps the layer cache
    inputs = _open_inputs(finetuned, base_model or config.base_model, config, revision, resume_dir, hub_kwargs)
    t1 = time.perf_counter()
    layers, names = [], inputs.pair.names()
    try:
        skeleton = _skeleton(inputs.ft_dir)
        targets = TensorTargets(skeleton)
        with artifact.writing(output_dir, names, overwrite) as writer:
            for layer_deltas, stats in iter_layers(inputs.pair, config, progress, inputs.cache):
                for name, delta in layer_deltas.items():  # what `build_model` would refuse, refused before it is written
                    if not delta.is_empty():
                        _target_parameter(name, names, skeleton, targets)
                writer.add(layer_deltas)
                layers.append(stats)
                del layer_deltas
            timings = {"criterion_and_substructures_s": time.perf_counter() - t1, "build_model_s": 0.0, "annealing_s": 0.0}
            writer.finish(inputs.index, _report(inputs, config, layers, timings), inputs.ft_dir)
    except DecomposeError:  # a bad input: nothing to resume
        if resume_dir is not None:
            resume.clear(resume_dir)
        raise
    finally:
        if inputs.cache is not None:
            inputs.cache.close()
    _log_resumed(inputs, len(layers), resume_dir)
    if resume_dir is not None:
        resume.clear(resume_dir)
    return writer.target
