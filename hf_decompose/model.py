"""`decompose`: checkpoints -> deltas -> criterion -> substructures -> a `DecomposedModel`;
`decompose_to_disk`: the same, layer by layer into an artifact, without the model."""

from __future__ import annotations

import dataclasses
import math
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from . import artifact, kernels, locks, resume
from .checkpoints import TORCH_DTYPES, CheckpointPair, CheckpointReader, read_config, sha256_files, sha256_files_in_background
from .config import HUB_OPTIONS, DecomposedConfig
from .annealing import _layer_of, _tokenizer, anneal_streaming
from .criterion import assess_layer
from .deltas import exact_delta
from .decomposed import DecomposedModel
from .errors import CheckpointError, ConfigError, DecomposeError
from .groups import READS_HIDDEN, WRITES_HIDDEN, Geometry, ParamInfo, describe
from .heap import release_free_memory
from .hub import commit_of, resolve
from .inject import apply_deltas, target_parameter
from .layerwise import DeltaStore, Layerwise
from .names import TensorTargets
from .parts import OverridePart, TensorDelta
from .substructures import extract, layer_components

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
    """One layer's kept deltas and statistics, computed on ``config.device``; the results are on CPU."""
    device = config.torch_device()
    layer_deltas = {}
    if config.mode in ("lossless", "anneal"):  # annealing starts from the exact decomposition
        for info in infos:
            # in the fine-tune's dtype where it is 16-bit; lossless: None where that surely costs more than its values
            delta, idx, values, finetuned = _exact_delta(pair, info, device, config.dense_block_density if config.mode == "lossless" else None)
            if delta is None:
                layer_deltas[info.name] = _finetuned_values(pair, info, finetuned)
                continue
            layer_deltas[info.name] = extract(info, delta, None, overrides=(idx, values), dense_block_density=config.dense_block_density,
                                              in_place=True, zero_outside=True)
            if config.mode == "lossless" and delta.dtype != torch.float32:
                layer_deltas[info.name] = _at_most_finetuned(pair, info, layer_deltas[info.name], finetuned)
            del finetuned
        tests = {}
    else:
        tests = assess_layer({i.name: (i, _delta(pair, i, device)) for i in infos}, config, geometry, in_place=True)
        release_free_memory()  # the tests' temporaries, before the substructures are gathered
        for name, t in tests.items():
            lowrank = (t.spectral.u.cpu(), t.spectral.v.cpu()) if t.spectral and t.spectral.rank else None
            layer_deltas[name] = extract(t.info, t.residual.cpu(), t.mask.cpu(), lowrank=lowrank, dense_block_density=config.dense_block_density, in_place=True)
    return layer_deltas, _layer_stats(layer, infos, layer_deltas, tests, geometry)


def _at_most_finetuned(pair: CheckpointPair, info: ParamInfo, delta: TensorDelta, finetuned: torch.Tensor | None) -> TensorDelta:
    """`delta`, or where it costs more bytes than the 16-bit fine-tune tensor itself, that tensor's own
    values (every entry replaced): a lossless artifact is never larger than the fine-tune. `finetuned`:
    the tensor as read for the delta (canonical, float32), or None to read it again."""
    if delta.nbytes() <= math.prod(delta.shape) * TORCH_DTYPES[pair.finetuned.dtype(info.name)].itemsize:
        return delta
    return _finetuned_values(pair, info, finetuned)


def _finetuned_values(pair: CheckpointPair, info: ParamInfo, finetuned: torch.Tensor | None) -> TensorDelta:
    """The 16-bit fine-tune tensor's own values, every entry replaced (`finetuned`: as read, canonical, or None)."""
    finetuned = info.canonical(pair.finetuned.get(info.name)) if finetuned is None else finetuned
    values = finetuned.to("cpu", TORCH_DTYPES[pair.finetuned.dtype(info.name)]).contiguous()
    return TensorDelta(info.name, tuple(values.shape), info.transposed, [OverridePart(values, None, tuple(values.shape))])


def _row_blocks(pair: CheckpointPair, info: ParamInfo, device: torch.device, dtype: torch.dtype = torch.float32) -> Iterator[tuple[slice | None, torch.Tensor, torch.Tensor]]:
    """(rows, base, fine-tune) of one tensor as `dtype` in canonical layout on `device`: whole (rows None),
    or for a large matrix (an embedding) read as float32 `CHUNK_BYTES` of rows at a time, so that it is never
    held three times in float32 (read in a 16-bit dtype, as stored, it is read whole: no copies of chunks)."""
    shape = pair.finetuned.shape(info.name)
    row_bytes = 4 * math.prod(shape[1:])
    if info.transposed or len(shape) < 2 or shape[0] * row_bytes <= CHUNK_BYTES or dtype.itemsize < 4:
        yield None, info.canonical(pair.base_tensor(info.name, dtype=dtype)).to(device), info.canonical(pair.finetuned.get(info.name, dtype=dtype)).to(device)
        return
    step = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, shape[0], step):
        rows = slice(start, min(start + step, shape[0]))
        yield rows, pair.base_tensor(info.name, rows, dtype).to(device), pair.finetuned.get(info.name, rows, dtype).to(device)


def _delta(pair: CheckpointPair, info: ParamInfo, device: torch.device) -> torch.Tensor:
    """fine-tune - base, float32, canonical layout, on `device`. A pair stored in bfloat16 (and not loaded as float16)
    is read as stored: on CPU subtracted in one pass (`kernels.difference_bf16`: the same values, without float32
    copies of both tensors), on an accelerator moved there in bfloat16 (half the bytes of float32, no conversion on
    the CPU) and subtracted there in float32 (exact: the same values)."""
    stored = {TORCH_DTYPES[pair.finetuned.dtype(info.name)], TORCH_DTYPES[pair.base.dtype(info.name)]}
    as_stored = stored == {torch.bfloat16} and pair.dtype != torch.float16
    if as_stored and device.type == "cpu" and kernels.available():
        base, ft = pair.base_tensor(info.name, dtype=torch.bfloat16), pair.finetuned.get(info.name, dtype=torch.bfloat16)
        return info.canonical(kernels.difference_bf16(base, ft))
    if as_stored and device.type != "cpu":
        ((_, base, ft),) = _row_blocks(pair, info, device, torch.bfloat16)  # 16-bit: read whole
        return ft.float().sub_(base.float())
    out = None
    for rows, base, ft in _row_blocks(pair, info, device):
        if rows is None:
            return ft.sub_(base)
        out = torch.empty(pair.finetuned.shape(info.name), device=device) if out is None else out
        torch.sub(ft, base, out=out[rows])
    return out


def _exact_delta(pair: CheckpointPair, info: ParamInfo, device: torch.device, unless_dense: float | None = None) -> tuple:
    """`deltas.exact_delta` of one tensor computed on `device` a block of rows at a time (it is entry-wise),
    returned on CPU; for a 16-bit fine-tune tensor stored in its dtype. Last, the fine-tune tensor as read
    when it was read whole (else None: not held beside the delta). With `unless_dense`, a 16-bit tensor of the
    model's dtype whose delta surely costs more than its own values gives no delta (None, None, None, tensor)."""
    dtype = TORCH_DTYPES[pair.finetuned.dtype(info.name)]
    # a 16-bit tensor of the model's own dtype is read and compared as stored (exact_delta's arithmetic
    # in float32 rounds alike): half the bytes of float32 copies, read whole
    read_as = dtype if dtype == pair.dtype and dtype in (torch.float16, torch.bfloat16) else torch.float32

    def exact(base: torch.Tensor, ft: torch.Tensor):
        if dtype not in (torch.float16, torch.bfloat16):
            return exact_delta(base, ft)
        return exact_delta(base, ft, dtype, pair.dtype, unless_dense if read_as == dtype else None)  # read whole: no chunks to join

    out, indices, values = None, [], []
    for rows, base, ft in _row_blocks(pair, info, device, read_as):
        result = exact(base, ft)
        if result is None:
            return None, None, None, ft
        delta, idx, vals = result
        if rows is None:
            return delta.cpu(), idx.cpu(), vals.cpu(), ft
        out = torch.empty(pair.finetuned.shape(info.name), dtype=delta.dtype) if out is None else out
        out[rows] = delta
        idx[:, 0] += rows.start
        indices.append(idx.cpu())
        values.append(vals.cpu())
    return out, torch.cat(indices), torch.cat(values), None


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


def build_model(base_dir: Path, config_dir: Path, deltas: dict[str, TensorDelta], config: DecomposedConfig, dtype: torch.dtype | None = None) -> nn.Module:
    """The model annealing starts from: the base with the fine-tune's config in the fine-tune's `dtype`
    (default: its config's, else float32), every changed matrix a `DecomposedModule` run as
    ``config.execution`` (so that annealing can swap its delta), other deltas merged in place."""
    hf_config = _plain_config(config_dir)
    model = _load_base(base_dir, hf_config, dtype or _config_dtype(hf_config))
    model.eval()
    apply_deltas(model, deltas, config.execution, swappable=True)
    return model


def _plain_config(config_dir: Path):
    """The transformers config of `config_dir`; an artifact's config.json without its quantization entries."""
    hf_config = AutoConfig.from_pretrained(config_dir)
    for key in ("quantization_config", "transformers_weights"):  # an artifact's config.json: load the base plainly
        if hasattr(hf_config, key):
            delattr(hf_config, key)
    return hf_config


def _check_targets(pair: CheckpointPair, ft_dir: Path) -> tuple[nn.Module, TensorTargets]:
    """Refuse, before any work, a checkpoint tensor with no place in the fine-tune's model class (saved
    buffers, such as old GPT-2 attention masks, aside) and a saved buffer the fine-tune changed (a mixture's score
    correction: the base's is loaded with the base); return that class's skeleton and its targets."""
    skeleton = _skeleton(ft_dir)
    targets, names = TensorTargets(skeleton), pair.names()
    saved = targets.saved_buffers()
    buffers = tuple(n for n, _ in skeleton.named_buffers())
    for name in names:
        if name in saved:
            if not torch.equal(pair.base.raw.get(name).double(), pair.finetuned.raw.get(name).double()):  # either may be stored wider
                raise CheckpointError(f"{ft_dir}: tensor {name!r} is a buffer of {type(skeleton).__name__} the fine-tune changed; "
                                      "only parameters are decomposed, a buffer comes with the base")
        elif not name.endswith(buffers) and not any(b.endswith("." + name) for b in buffers):
            target_parameter(name, names, skeleton, targets)
    return skeleton, targets


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


@dataclass
class _Inputs:
    """A resolved, validated pair and what its artifact records about it."""

    base_dir: Path
    ft_dir: Path
    pair: CheckpointPair
    skeleton: nn.Module  # the fine-tune's model class on the meta device
    targets: TensorTargets
    base_sha: Future[dict[str, str]]  # hashed while the layers are worked on
    cache: resume.LayerCache | None
    index: dict  # the artifact's record of the inputs, but the base's file hashes (`record`)
    read_s: float

    def record(self) -> dict:
        """The artifact's record of the inputs, the base's file hashes included (waited for)."""
        return dict(self.index, base_model=dict(self.index["base_model"], sha256=self.base_sha.result()))


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
    skeleton, targets = _check_targets(pair, ft_dir)
    base_sha = sha256_files_in_background(pair.base.files)
    cache = None if resume_dir is None else resume.LayerCache(resume_dir, resume.cache_record(base_sha.result(), sha256_files(pair.finetuned.files), config))
    index = {
        "config": config.to_dict(),
        "base_model": {"id": _recorded_id(base_model), "revision": commit_of(base_dir) or config.base_revision},  # pinned by `record`'s hashes
        "finetuned_model": {"id": _recorded_id(finetuned), "revision": commit_of(ft_dir) or revision, "dtype": str(pair.dtype).removeprefix("torch.")},
    }
    return _Inputs(base_dir, ft_dir, pair, skeleton, targets, base_sha, cache, index, time.perf_counter() - t0)


def _recorded_id(model: str | Path) -> str:
    """A Hub id as given; a local directory as its absolute path, so the artifact loads from anywhere."""
    return str(Path(model).expanduser().resolve()) if Path(model).expanduser().is_dir() else str(model)


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


def _log_resumed(inputs: _Inputs, layers: int, cache: resume.LayerCache | None) -> None:
    if cache is not None and cache.reused:
        resume.logger.info("resumed %d of %d layers from %s", cache.reused, layers, cache.directory)


def decompose(
    finetuned: str | Path,
    base_model: str | Path | None = None,
    config: DecomposedConfig | None = None,
    *,
    revision: str | None = None,
    progress: bool = True,
    resume_dir: str | Path | None = None,
    calibration=None,
    device_map=None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
    dtype=None,
    **hub_kwargs,
) -> DecomposedModel:
    """Decompose a fine-tune against its base: the library's one verb. Returns the `DecomposedModel`
    (a transformers model of the fine-tune's class) built from the artifact, which is written to a
    temporary directory first and copied by `save_pretrained`.

    With `resume_dir`, finished layers are cached there and reused by a re-run of the same inputs
    and config; `save_pretrained` deletes the cache once the artifact is written. ``mode="anneal"``
    runs on `calibration` prompts (a list, dataset or file; keep them disjoint from evaluation prompts;
    default: the config's, else a built-in set). `device_map` / `max_memory` / `offload_folder` / `dtype`
    are as in `DecomposedModel.from_pretrained`. To write an artifact without building the model, use
    `decompose_to_disk`.

    Example::

        model = decompose("my-finetune", base_model="my-base", config=DecomposedConfig(mode="criterion"))
        model.save_pretrained("out")
    """
    owned = tempfile.TemporaryDirectory(prefix="hf_decompose-")
    path = decompose_to_disk(
        finetuned, base_model, config, output_dir=Path(owned.name) / "artifact", revision=revision, progress=progress,
        resume_dir=resume_dir, keep_cache=True, calibration=calibration, **hub_kwargs,
    )
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = DecomposedModel.from_pretrained(path, device_map=device_map, max_memory=max_memory, offload_folder=offload_folder, **hub_kwargs, **kwargs)
    model.decomposition.owned = owned
    model.decomposition.resume_dir = Path(resume_dir) if resume_dir is not None else None
    return model


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
    keep_cache: bool = False,
    max_shard_size: int | str = artifact.MAX_SHARD_SIZE,
    calibration=None,
    **hub_kwargs,
) -> Path:
    """Write the artifact of a decomposition to `output_dir` without building the decomposed model;
    return the artifact's directory. Weights above `max_shard_size` (as in ``save_pretrained``: 50 GB, the
    Hub's largest file) are sharded. `calibration` and `hub_kwargs` (``token``, ``cache_dir``,
    ``local_files_only``) as in `decompose`.

    Modes ``lossless`` and ``criterion`` stream: each layer's deltas are written as soon as they are
    computed and then dropped, so memory stays near one layer of each checkpoint (the largest: the
    embedding). ``anneal`` streams too: the exact deltas and every level built go to a scratch store on
    disk, the guard runs the model one decoder layer at a time (`layerwise`), so it holds the resident
    modules (embeddings, head), one layer, the calibration set's hidden states per layer and its
    reference logits. With `resume_dir`, finished layers are cached there for a re-run of the same inputs and
    config, and deleted once the artifact is written (unless `keep_cache`).
    """
    if unknown := sorted(set(hub_kwargs) - set(HUB_OPTIONS)):  # a local directory reads none of them: one misspelt was dropped silently
        raise TypeError(f"decompose_to_disk() got an unexpected keyword argument {unknown[0]!r}")
    config = config or DecomposedConfig()
    if calibration is not None:
        config = dataclasses.replace(config, calibration=calibration)
    shard_limit = artifact.shard_bytes(max_shard_size)  # a bad size fails before any work
    with locks.owning(output_dir):  # one run per output, from the first check to the published artifact
        return _decompose_to_disk(finetuned, base_model, config, output_dir, overwrite, revision, progress, resume_dir, keep_cache, shard_limit, hub_kwargs)


def _decompose_to_disk(
    finetuned, base_model, config: DecomposedConfig, output_dir, overwrite: bool, revision, progress: bool, resume_dir, keep_cache: bool,
    shard_limit: int, hub_kwargs: dict,
) -> Path:
    artifact.check_target(output_dir, overwrite)  # before any work; a refused target keeps the layer cache
    calibration = config.calibration_prompts() if config.mode == "anneal" else None  # bad prompts fail before any read
    inputs = _open_inputs(finetuned, base_model or config.base_model, config, revision, resume_dir, hub_kwargs)
    try:
        if config.mode == "anneal":
            tokenizer = _tokenizer(inputs.ft_dir, inputs.base_dir, calibration[0])  # before any layer's work
            target = _anneal_to_disk(inputs, config, calibration, tokenizer, output_dir, overwrite, progress, shard_limit)
        else:
            target = _stream_to_disk(inputs, config, output_dir, overwrite, progress, shard_limit)
    except DecomposeError:  # a bad input: nothing to resume
        if resume_dir is not None:
            resume.clear(resume_dir)
        raise
    finally:
        if inputs.cache is not None:
            inputs.cache.close()
    if resume_dir is not None and not keep_cache:
        resume.clear(resume_dir)
    return target


def _stream_to_disk(inputs: _Inputs, config: DecomposedConfig, output_dir, overwrite: bool, progress: bool, shard_limit: int) -> Path:
    t1 = time.perf_counter()
    layers, names = [], inputs.pair.names()
    skeleton, targets = inputs.skeleton, inputs.targets
    with artifact.writing(output_dir, names, overwrite, shard_limit) as writer:
        for layer_deltas, stats in iter_layers(inputs.pair, config, progress, inputs.cache):
            for name, delta in layer_deltas.items():  # what loading would refuse, refused before it is written
                if not delta.is_empty():
                    target_parameter(name, names, skeleton, targets)
            writer.add(layer_deltas)
            layers.append(stats)
            del layer_deltas
        timings = {"criterion_and_substructures_s": time.perf_counter() - t1, "build_model_s": 0.0, "annealing_s": 0.0}
        writer.finish(inputs.record(), _report(inputs, config, layers, timings), inputs.ft_dir)
    _log_resumed(inputs, len(layers), inputs.cache)
    return writer.target


def _anneal_to_disk(inputs: _Inputs, config: DecomposedConfig, calibration: tuple[list[str], str], tokenizer, output_dir, overwrite: bool,
                    progress: bool, shard_limit: int) -> Path:
    """Anneal layer by layer (`annealing.anneal_streaming`): the exact deltas stream to a scratch store on
    disk, the guard runs one decoder layer at a time, the artifact is written a layer at a time."""
    t1 = time.perf_counter()
    pair, prompts, source = inputs.pair, *calibration
    with tempfile.TemporaryDirectory(prefix="hf_decompose-anneal-") as scratch:
        store = DeltaStore(scratch)
        groups, exact_key, annealable, transposed = [], {}, [], set()
        for i, (layer_deltas, _) in enumerate(iter_layers(pair, config, progress, inputs.cache)):
            store.put(str(i), layer_deltas)
            groups.append(str(i))
            exact_key.update(dict.fromkeys(layer_deltas, str(i)))
            annealable += [n for n, d in layer_deltas.items() if d.get("dense") is not None and len(d.shape) == 2]
            transposed |= {n for n, d in layer_deltas.items() if d.transposed}
            del layer_deltas
        _log_resumed(inputs, len(groups), inputs.cache)
        t2 = time.perf_counter()
        hf_config = _plain_config(inputs.ft_dir)
        device = config.torch_device()  # the guard's forward passes run there (the candidates are made on CPU)
        lw = Layerwise(hf_config, pair.dtype, pair.names(), pair.base_tensor, pair.base.raw.get, execution=config.execution, device=device)
        module_names, gram_names = lw.split_modules(annealable, frozenset(transposed))
        resident = lw.by_layer.get(None, [])
        lw.set_resident({n: d for g in groups for n, d in store.get(g, [n for n in store.names(g) if n in resident]).items()})
        annealed: dict[str, list[str]] = defaultdict(list)
        for n in module_names:
            annealed[_layer_of(module_names[n])].append(n)

        def reference(dtype: torch.dtype) -> Layerwise:  # the fine-tune itself, read layer by layer
            return Layerwise(hf_config, dtype, pair.names(), pair.finetuned.get, pair.finetuned.raw.get, device=device)

        t3 = time.perf_counter()
        kept, annealing_report = anneal_streaming(lw, dict(annealed), store, exact_key, module_names, gram_names, tokenizer, prompts, config,
                                                  progress, reference)
        del lw
        annealing_report["calibration"] = source
        t4 = time.perf_counter()
        with artifact.writing(output_dir, pair.names(), overwrite, shard_limit) as writer:
            layers = []
            for g in groups:
                group = kept(g)
                writer.add(group)
                layers += summarize_layers(group, pair.finetuned.config)
                del group
            report = _report(inputs, config, layers, {"criterion_and_substructures_s": t2 - t1, "build_model_s": t3 - t2, "annealing_s": t4 - t3})
            report["annealing"] = annealing_report
            writer.finish(inputs.record(), report, inputs.ft_dir)
    return writer.target
