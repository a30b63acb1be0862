"""`DecomposedModel`: the one type of a decomposed model, whatever made it.

`decompose()`, `DecomposedModel.from_pretrained`, `AutoDecomposedModelForCausalLM`, and plain
``AutoModelForCausalLM.from_pretrained`` after ``import hf_decompose`` (an artifact, or a fine-tune with
``quantization_config=DecomposedConfig(...)``) all return the transformers model of the fine-tune's
architecture with this mixin in front of its class (``DecomposedLlamaForCausalLM``). Its modules are
the base's with the deltas put in (`hf_decompose.inject`); ``model.decomposition`` says where they come
from. It saves and pushes the artifact, not full weights, and switches between merged and split execution.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import artifact, hub, inject, resume
from .checkpoints import CheckpointReader
from .config import QUANT_METHOD, DecomposedConfig
from .errors import ArtifactError, CheckpointError, ConfigError
from .multi import MultiTenant, Tenancy, routed
from .names import Target, TensorTargets
from .parts import TensorDelta

PUSH_KEYS = ("token", "private", "revision", "commit_message", "commit_description", "create_pr", "tags")


@dataclass
class Decomposition:
    """What a decomposed model carries besides its modules (``model.decomposition``)."""

    artifact_dir: Path | None  # the artifact the modules were built from (checked, never modified); None: fine-tunes by name
    base_dir: Path  # the base checkpoint it was built on
    config: DecomposedConfig
    index: dict
    report: dict
    resume_dir: Path | None = None  # `decompose`'s layer cache, deleted once the artifact is saved
    versions: dict[str, int] = field(default_factory=dict)  # parameter -> version counter after loading
    owned: Any = None  # a temporary directory holding `artifact_dir`, removed with the model


class DecomposedModel(MultiTenant):
    """Mixed into the class of every decomposed transformers model (see the module docstring)."""

    decomposition: Decomposition

    # -- what it is -----------------------------------------------------------------------------
    @property
    def report(self) -> dict:
        """The decomposition report (`decomposition.json`); verification adds its equivalence here."""
        return self.decomposition.report

    @property
    def decomposed_config(self) -> DecomposedConfig:
        return self.decomposition.config

    @property
    def deltas(self) -> dict[str, TensorDelta]:
        """The artifact's deltas, read from disk on each access (the model does not keep them beside its weights)."""
        return artifact.load(self._own_artifact())[1]

    @property
    def execution(self) -> str:
        return self.decomposition.config.execution

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        base_model: str | Path | None = None,
        base_revision: str | None = None,
        execution: str | None = None,
        device_map: Any = None,
        max_memory: dict | None = None,
        offload_folder: str | Path | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        **kwargs: Any,
    ):
        """Load an artifact (a directory or a Hub repo): the base is pulled at its pinned revision and
        checked against the recorded SHA-256, then the deltas are put in.

        Args:
            base_model / base_revision: rebuild against this copy of the base instead of the recorded one
                (a local copy, a mirror: its weights must still match the recorded SHA-256).
            execution: ``"merged"`` or ``"split"`` (default: as saved).
            device_map / max_memory / offload_folder: placement as in transformers (``"auto"``,
                ``"balanced"``, ``"sequential"``, or ``{module: device}`` with GPU indices, ``"cpu"`` and
                ``"disk"``); substructures are placed too (`hf_decompose.placement.place`).
            revision / token / cache_dir / local_files_only: as in transformers, for the artifact and its base.
            kwargs: passed to `AutoModelForCausalLM.from_pretrained` (``dtype``, ``attn_implementation``, ...).
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        if isinstance(pretrained_model_name_or_path, dict):  # several fine-tunes by name, over their base
            return cls._from_artifacts(pretrained_model_name_or_path, base_model, base_revision, revision=revision, token=token,
                                       cache_dir=cache_dir, local_files_only=local_files_only)  # fmt: skip
        hub_options = {"token": token, "cache_dir": str(cache_dir) if cache_dir else None, "local_files_only": local_files_only}
        hub_options = {k: v for k, v in hub_options.items() if v is not None}
        try:
            directory = hub.resolve(pretrained_model_name_or_path, revision, allow_patterns=hub.ARTIFACT_PATTERNS, **hub_options)
        except CheckpointError as err:
            raise ArtifactError(f"cannot read the config of {str(pretrained_model_name_or_path)!r}: {err}") from err
        if (directory / artifact.INDEX).is_file():
            artifact.read_index(directory)  # every file's checksum, before any is parsed
        try:
            config = AutoConfig.from_pretrained(directory)
        except (OSError, ValueError) as err:
            raise ArtifactError(f"cannot read the config of {str(pretrained_model_name_or_path)!r} (revision {revision!r}): {err}") from err
        quantization = check_artifact_config(getattr(config, "quantization_config", None), pretrained_model_name_or_path).to_dict()
        if base_model is not None:
            quantization.update(base_model=str(base_model), base_revision=base_revision)
        elif base_revision is not None:
            quantization.update(base_revision=base_revision)
        if execution is not None:
            quantization.update(execution=execution)
        # transformers reads a pre-quantized config as a dict; run-time options travel in it, never saved
        config.quantization_config = DecomposedConfig.from_dict(dict(quantization, hub_options=hub_options)).to_dict() | {"hub_options": hub_options}
        placed = device_map is not None and not _one_device(device_map)
        model = AutoModelForCausalLM.from_pretrained(directory, config=config, device_map=None if placed else device_map, **kwargs)
        if placed:
            model.dispatch(device_map, max_memory=max_memory, offload_folder=offload_folder)
        return model

    @classmethod
    def from_base(cls, base_model: str | Path, revision: str | None = None, **hub_kwargs: Any):
        """The base alone (float32), serving fine-tunes by name: add them with `load_decomposed` / `add_decomposed`."""
        from transformers import AutoModelForCausalLM

        from .checkpoints import sha256_files

        base_dir = hub.resolve(base_model, revision, **hub_kwargs)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        return serving(model, sha256_files(CheckpointReader(base_dir).files), base_dir)

    @classmethod
    def _from_artifacts(cls, artifacts: dict[str, str | Path], base_model: str | Path | None, base_revision: str | None, revision: str | None = None, **hub_kwargs: Any):
        """`from_pretrained` of ``{name: artifact}``: the base (the first artifact's unless given), then each fine-tune."""
        if not artifacts:
            raise ConfigError("from_pretrained({}): give at least one {name: artifact}")
        dirs = {n: hub.resolve(a, revision, allow_patterns=hub.ARTIFACT_PATTERNS, **hub_kwargs) for n, a in artifacts.items()}
        first = artifact.read_index(next(iter(dirs.values())))["base_model"]
        model = cls.from_base(base_model or first["id"], base_revision if base_model else first.get("revision"), **hub_kwargs)
        for name, directory in dirs.items():
            model.load_decomposed(name, directory)
        return model

    # -- running ----------------------------------------------------------------------------------
    def set_execution(self, execution: str):
        """Run ``"merged"`` (one dense weight per module, the fine-tune's memory and kernels) or ``"split"``
        (the base plus substructures). Switching to split reads the base's changed tensors and the
        deltas again; switching to merged folds the substructures in and drops them."""
        if execution not in ("merged", "split"):
            raise ConfigError(f"execution={execution!r} is not one of ('merged', 'split')")
        if execution == self.execution:
            return self
        self._own_artifact()
        if getattr(self, "hf_device_map", None) is not None and len(set(map(str, self.hf_device_map.values()))) > 1:
            raise ConfigError("the model is placed on several devices: load it again with execution=... to change how it runs")
        deltas = self.deltas
        if execution == "merged":
            wrappers = inject.unwrap(self)
            for module in wrappers.values():
                if module._tied is None:
                    inject.merge_into(module.base.weight, module.delta)
        else:
            split = _split_targets(self, deltas)
            self._restore_base({n: deltas[n] for n in split}, split)
            inject.apply_deltas(self, {n: deltas[n] for n in split}, "split")
        self.decomposition.config.execution = execution
        self._record_versions()
        return self

    def _restore_base(self, deltas: dict[str, TensorDelta], targets: dict[str, Target]) -> None:
        """Read back the base values of the matrices the merge changed (`targets`: where each delta went)."""
        reader = CheckpointReader(self.decomposition.base_dir)
        params = dict(self.named_parameters(remove_duplicate=False))
        seen = set()
        for name, target in targets.items():
            if target.parameter in seen:  # a tied head stored beside its embedding
                continue
            seen.add(target.parameter)
            param = params[target.parameter]
            base = reader.get(name) if name in reader.names() else None
            if base is None or base.shape != param.shape:  # a tied head, or a vocabulary the fine-tune grew
                base = param.detach().float() - _stored_layout(deltas[name], param)
            with torch.no_grad():
                param.data = base.to(param.device, param.dtype)

    def dispatch(self, device_map: Any = "auto", max_memory: dict | None = None, offload_folder: str | Path | None = None, strategy: str = "spread"):
        """Place base layers and substructures on devices through Accelerate (`hf_decompose.placement.place`)."""
        from .placement import place

        if device_map is not None:
            place(self, device_map, max_memory=max_memory, offload_folder=offload_folder, strategy=strategy)
            self.restack()  # offloaded tenants' parts leave the stacks
        return self

    # -- saving -----------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, overwrite: bool = False, push_to_hub: bool = False,
                        max_shard_size: int | str | None = None, **kwargs: Any) -> Path:
        """Write the artifact (what differs from the base, and the report) atomically; refuse to replace one
        unless `overwrite`. With `max_shard_size` ("5GB", an int of bytes) its weights are sharded anew (else as
        the artifact has them: above 50 GB). With `push_to_hub`, upload it too (``repo_id`` defaults to the
        directory's name). Other transformers keywords are ignored: the weights are the artifact's, never full ones."""
        self._check_unchanged()
        d = self.decomposition
        path = artifact.copy(self._own_artifact(), save_directory, d.report, overwrite=overwrite, max_shard_size=max_shard_size)
        d.report = artifact.read_report(path)
        if d.resume_dir is not None:
            resume.clear(d.resume_dir)
            d.resume_dir = None
        if push_to_hub:
            hub.push_artifact(path, kwargs.pop("repo_id", Path(path).name), **{k: v for k, v in kwargs.items() if k in PUSH_KEYS})
        return path

    def push_to_hub(self, repo_id: str, max_shard_size: int | str | None = None, **kwargs: Any):
        """Upload the artifact and its model card (keywords of `hub.push_artifact`; `max_shard_size` as in
        `save_pretrained`); returns the `CommitInfo`."""
        with tempfile.TemporaryDirectory() as tmp:
            path = self.save_pretrained(Path(tmp) / "artifact", max_shard_size=max_shard_size)
            return hub.push_artifact(path, repo_id, **{k: v for k, v in kwargs.items() if k in PUSH_KEYS})

    def _own_artifact(self) -> Path:
        """The artifact this model was built from; `ConfigError` for a model serving fine-tunes by name."""
        if self.decomposition.artifact_dir is None:
            raise ConfigError(f"this model serves fine-tunes by name ({self.decomposed_names}) over its base, it has no artifact "
                              "of its own: save, merge or split each fine-tune from DecomposedModel.from_pretrained(artifact)")
        return self.decomposition.artifact_dir

    def _record_versions(self) -> None:
        self.decomposition.versions = {n: p._version for n, p in self.named_parameters()}

    def _check_unchanged(self) -> None:
        """Refuse to save an artifact that no longer describes the weights (after training, say)."""
        changed = [n for n, p in self.named_parameters() if self.decomposition.versions.get(n) not in (None, p._version)]
        if changed:
            raise ArtifactError(
                f"{len(changed)} parameter(s) changed since loading (e.g. {changed[0]}): the artifact no longer describes this model. "
                "Save the trained model with model.dequantize().save_pretrained(...), or decompose it against the base again."
            )


def _one_device(device_map: Any) -> bool:
    """A device map that puts the whole model on one device (transformers loads it there directly)."""
    if isinstance(device_map, dict):
        return len({str(v) for v in device_map.values()}) == 1 and "disk" not in {str(v) for v in device_map.values()}
    return isinstance(device_map, (int, torch.device)) or device_map in ("cpu", "cuda", "mps") or str(device_map).startswith("cuda:")


def _split_targets(model: nn.Module, deltas: dict[str, TensorDelta]) -> dict[str, Target]:
    """The deltas split execution runs as substructures (whole weights of wrappable modules), with their targets;
    the others (vectors, entries of fused parameters, modules with a forward of their own) stay merged."""
    targets, names, out = TensorTargets(model), list(deltas), {}
    for name, delta in deltas.items():
        if delta.is_empty():
            continue
        target = inject.target_parameter(name, names, model, targets)
        if inject.runs_split(target, model.get_submodule(target.parameter.rpartition(".")[0])):
            out[name] = target
    return out


def _stored_layout(delta: TensorDelta, param: torch.Tensor) -> torch.Tensor:
    dense = delta.to_dense().to(param.device)
    return dense.t() if delta.transposed else dense


def check_artifact_config(quantization_config: Any, where: str | Path) -> DecomposedConfig:
    """The `DecomposedConfig` of an artifact's config.json; `ArtifactError` unless it is hf_decompose's."""
    if quantization_config is None:
        raise ArtifactError(f"{where}: not a decomposed artifact (its config.json has no quantization_config)")
    if isinstance(quantization_config, DecomposedConfig):
        return quantization_config
    method = quantization_config.get("quant_method") if isinstance(quantization_config, dict) else getattr(quantization_config, "quant_method", None)
    if method != QUANT_METHOD:
        raise ArtifactError(f"{where}: its config.json has quant_method {method!r}, not {QUANT_METHOD!r}: not a decomposed artifact")
    try:
        return DecomposedConfig.from_dict(dict(quantization_config))
    except ConfigError as e:  # named by its artifact: a field another version of hf_decompose wrote, or an edited file
        raise ConfigError(f"{where}: its config.json's quantization_config: {e}") from e


_CLASSES: dict[type, type] = {}


def decomposed_class(cls: type) -> type:
    """``Decomposed<cls>``: `cls` with `DecomposedModel` in front (made once per class)."""
    if issubclass(cls, DecomposedModel):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Decomposed{cls.__name__}", (DecomposedModel, cls), {"__module__": __name__, "forward": routed(cls.forward)})
        _listed_beside(cls, _CLASSES[cls])
    return _CLASSES[cls]


def _listed_beside(cls: type, decomposed: type) -> None:
    """List `decomposed` wherever transformers' task mappings list `cls` by name: pipelines and the Trainer tell a
    model's task by its class name (unlisted, ``pipeline("text-generation", model=...)`` logs an error naming every
    causal LM, and the Trainer's label smoothing would not shift a causal LM's labels). The key is no config's model
    type, so no Auto class resolves to it."""
    from transformers.models.auto import modeling_auto

    for mapping, names in vars(modeling_auto).items():
        if mapping.startswith("MODEL_") and mapping.endswith("_MAPPING_NAMES") and isinstance(names, dict):
            if any(cls.__name__ == v or (isinstance(v, tuple) and cls.__name__ in v) for v in names.values()):
                names[f"{QUANT_METHOD}:{cls.__name__}"] = decomposed.__name__


def serving(model: nn.Module, base_sha256: dict[str, str], base_dir: Path | None = None) -> DecomposedModel:
    """Turn a loaded base model into a `DecomposedModel` serving fine-tunes by name (in place)."""
    if isinstance(model, DecomposedModel):
        raise ConfigError("the model is decomposed already: start from the base model")
    model.__class__ = decomposed_class(type(model))
    model.decomposition = Decomposition(None, base_dir, DecomposedConfig(execution="split"), {}, {})
    model.tenancy = Tenancy(model, base_sha256)
    return model
