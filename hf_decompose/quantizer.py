"""transformers integration: ``quant_method="hf_decompose"`` in transformers' quantization registry.

After ``import hf_decompose``::

    AutoModelForCausalLM.from_pretrained(FINETUNED, quantization_config=DecomposedConfig(base_model=BASE))
    AutoModelForCausalLM.from_pretrained(ARTIFACT)  # config.json holds the quantization_config

How the hook runs in ``PreTrainedModel.from_pretrained`` (transformers 5.24):

1. ``get_hf_quantizer`` builds a `DecomposedHfQuantizer`: ``pre_quantized=False`` when the config comes
   from ``quantization_config=`` (a fine-tune to decompose), ``True`` when it comes from config.json (an
   artifact, whose ``transformers_weights`` names ``decomposition.safetensors`` as the checkpoint).
2. ``validate_environment`` checks the request before anything is downloaded.
3. ``preprocess_model`` sees the empty skeleton and the checkpoint files: for an artifact, its other
   files are pulled and their checksums verified before any weight is read.
4. transformers loads the checkpoint into the skeleton (device_map, dtype as requested).
5. ``postprocess_model`` runs the engine, since the loader only reads the one checkpoint and a
   decomposition reads two, tensor by tensor: `hf_decompose.decompose` (a fine-tune, per-layer progress
   bar) or `DecomposedModel.from_pretrained` (an artifact: base pulled at its pinned revision,
   SHA-256 checked). Their module tree (base modules + `DecomposedModule` wrappers) replaces the loaded
   one, placed on the loaded model's devices and dtype; the loaded weights are dropped. The model's
   class becomes a subclass with `DecomposedMixin`, whose ``save_pretrained`` / ``push_to_hub`` write
   the artifact (transformers' own would write full weights).

The base's downloads use the ``token`` / ``cache_dir`` / ``local_files_only`` given to
``from_pretrained`` (read from its frame, best effort), else those of `hub.loading_options`, else
the Hub cache the loaded checkpoint lives in and huggingface_hub's defaults (``HF_TOKEN``, ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import inspect
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer

from . import artifact, hub
from .config import QUANT_METHOD, DecomposedConfig
from .errors import ArtifactError, ConfigError
from .modules import DecomposedModule
from .substructures import TensorDelta

_HUB_KEYS = ("token", "cache_dir", "local_files_only")
_PUSH_KEYS = ("token", "private", "revision", "commit_message", "commit_description", "create_pr", "tags")


@dataclass
class Decomposition:
    """What a decomposed transformers model carries besides its modules (``model.decomposition``)."""

    deltas: dict[str, TensorDelta]
    config: DecomposedConfig
    index: dict
    report: dict
    source_dir: Path  # config.json, tokenizer and card come from here


class DecomposedMixin:
    """Mixed into the class of a model loaded through hf_decompose: the artifact is what it saves and pushes."""

    decomposition: Decomposition

    def save_pretrained(self, save_directory: str | Path, overwrite: bool = False, push_to_hub: bool = False, **kwargs: Any) -> Path:
        """Write the artifact atomically (refusing to replace one unless `overwrite`); with `push_to_hub`,
        upload it too (``repo_id`` defaults to the directory's name). transformers-only keywords are ignored."""
        d = self.decomposition
        path = artifact.save(save_directory, d.deltas, d.index, d.report, d.source_dir, overwrite=overwrite)
        d.report = artifact.read_report(path)
        if push_to_hub:
            hub.push_artifact(path, kwargs.pop("repo_id", Path(path).name), **{k: v for k, v in kwargs.items() if k in _PUSH_KEYS})
        return path

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Upload the artifact and its model card (keywords of `hub.push_artifact`); returns the `CommitInfo`."""
        with tempfile.TemporaryDirectory() as tmp:
            path = self.save_pretrained(Path(tmp) / "artifact")
            return hub.push_artifact(path, repo_id, **{k: v for k, v in kwargs.items() if k in _PUSH_KEYS})

    def set_execution(self, execution: str):
        """Run every decomposed module ``"merged"`` or ``"split"``."""
        if execution not in ("merged", "split"):
            raise ConfigError(f"execution={execution!r} is not one of ('merged', 'split')")
        for module in self.modules():
            if isinstance(module, DecomposedModule):
                module.execution = execution
        self.decomposition.config.execution = execution
        return self


class DecomposedHfQuantizer(HfQuantizer):
    """Decomposes a fine-tune while loading it, or rebuilds one from its artifact (see the module docstring)."""

    requires_calibration = False
    quantization_config: DecomposedConfig

    def __init__(self, quantization_config: DecomposedConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.hub_kwargs: dict[str, Any] = {}
        self.checkpoint_files: list[Path] = []
        self.artifact_dir: Path | None = None
        self._tied_weights_keys: dict = {}

    def validate_environment(self, device_map=None, **kwargs: Any) -> None:
        config = self.quantization_config
        if not self.pre_quantized and not config.base_model:
            raise ConfigError("DecomposedConfig.base_model is not set: name the base checkpoint the fine-tune was trained from")
        if not self.pre_quantized and config.null == "init":
            raise ConfigError("null='init' cannot build a model; use null='reference'")
        if isinstance(device_map, dict) and "disk" in {str(v) for v in device_map.values()}:
            raise ConfigError("hf_decompose cannot offload decomposed modules to disk (device_map holds 'disk')")
        self.hub_kwargs = {**_from_pretrained_download_kwargs(), **hub.current_loading_options()}

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any):
        self.checkpoint_files = [Path(f) for f in checkpoint_files or []]
        if not self.checkpoint_files:
            raise ArtifactError(f"{model.config.name_or_path}: hf_decompose needs checkpoint files (a state_dict or GGUF file cannot be decomposed)")
        if self.pre_quantized:
            self.artifact_dir = self._pull_artifact()
            artifact.read_index(self.artifact_dir)  # checksums, before any weight is read
            # The artifact's tensors are no parameters and every parameter is rebuilt afterwards: nothing to
            # report, nothing to tie (the tying is restored once the rebuilt modules are in place).
            model._keys_to_ignore_on_load_unexpected = {".*"}
            model._keys_to_ignore_on_load_missing = {".*"}
            self._tied_weights_keys, model.all_tied_weights_keys = model.all_tied_weights_keys, {}
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        from .model import DecomposedModel, decompose

        options = self.hub_kwargs
        hub_kwargs = {k: options[k] for k in _HUB_KEYS if options.get(k) is not None}
        snapshot = hub.snapshot_of(self.checkpoint_files[0])
        if snapshot is not None:
            hub_kwargs.setdefault("cache_dir", str(snapshot.cache_dir))
        if self.pre_quantized:
            decomposed = DecomposedModel.from_pretrained(
                self.artifact_dir, base_model=options.get("base_model"), base_revision=options.get("base_revision"), **hub_kwargs
            )
        else:
            finetuned, revision = (snapshot.repo_id, snapshot.commit) if snapshot else (str(self.checkpoint_files[0].parent), None)
            decomposed = decompose(finetuned, self.quantization_config.base_model, self.quantization_config, revision=revision, **hub_kwargs)
        _adopt(model, decomposed.model)
        if self.pre_quantized:
            model.all_tied_weights_keys = self._tied_weights_keys
        config = DecomposedConfig.from_dict(dict(decomposed.index["config"]))
        config.base_model, config.base_revision = decomposed.index["base_model"]["id"], decomposed.index["base_model"]["revision"]
        config.execution = decomposed.decomposed_config.execution
        self.quantization_config = model.config.quantization_config = config
        model.decomposition = Decomposition(decomposed.deltas, config, decomposed.index, decomposed.report, decomposed.source_dir)
        model.__class__ = decomposed_class(type(model))
        return model

    def _pull_artifact(self) -> Path:
        snapshot = hub.snapshot_of(self.checkpoint_files[0])
        if snapshot is None:
            return self.checkpoint_files[0].parent
        kwargs = {k: self.hub_kwargs[k] for k in _HUB_KEYS if self.hub_kwargs.get(k) is not None}
        kwargs.setdefault("cache_dir", str(snapshot.cache_dir))
        return hub.pull_artifact(snapshot.repo_id, snapshot.commit, **kwargs)

    def is_serializable(self) -> bool:
        return True  # as an artifact, by `DecomposedMixin.save_pretrained`

    def _dequantize(self, model, dtype=None):
        """`model.dequantize()`: every decomposed module becomes its merged dense module (a plain fine-tune)."""
        for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, DecomposedModule)]:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.merged_module())
        if isinstance(model, DecomposedMixin):
            model.__class__ = type(model).__bases__[1]
            del model.decomposition
        return model

    @property
    def is_trainable(self) -> bool:
        return False


def _adopt(model, source: torch.nn.Module) -> None:
    """Move `source`'s module tree into `model` (same class), on `model`'s devices and dtype."""
    if type(source).__name__ != type(model).__name__:
        raise ConfigError(f"hf_decompose builds {type(source).__name__}; load it with AutoModelForCausalLM, not {type(model).__name__}")
    dtype = model.dtype
    devices = {str(p.device) for p in model.parameters()} - {"meta"}
    device_map = getattr(model, "hf_device_map", None)
    for registry in ("_modules", "_parameters", "_buffers"):
        getattr(model, registry).clear()
        getattr(model, registry).update(getattr(source, registry))
    if dtype != torch.float32:
        model.to(dtype)
    if device_map and len(set(device_map.values())) > 1:
        from accelerate import dispatch_model

        dispatch_model(model, device_map=device_map)
    elif devices and devices != {"cpu"}:
        model.to(next(iter(devices)))
    model.eval()


_CLASSES: dict[type, type] = {}


def decomposed_class(cls: type) -> type:
    """``Decomposed<cls>``: `cls` with `DecomposedMixin` in front (made once per class)."""
    if issubclass(cls, DecomposedMixin):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Decomposed{cls.__name__}", (DecomposedMixin, cls), {"__module__": __name__})
    return _CLASSES[cls]


def _from_pretrained_download_kwargs() -> dict[str, Any]:
    """token / cache_dir / local_files_only of the `from_pretrained` call running this hook (best effort)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_name == "from_pretrained" and isinstance(found := frame.f_locals.get("download_kwargs"), dict):
                return {k: found.get(k) for k in _HUB_KEYS if found.get(k) is not None}
            frame = frame.f_back
    finally:
        del frame
    return {}


def register() -> None:
    """Register `DecomposedConfig` and `DecomposedHfQuantizer` under ``quant_method="hf_decompose"`` (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(DecomposedConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(DecomposedHfQuantizer)


register()
