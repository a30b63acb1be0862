"""transformers integration: ``quant_method="hf_decompose"`` in transformers' quantization registry.

After ``import hf_decompose``::

    AutoModelForCausalLM.from_pretrained(ARTIFACT)  # its config.json holds the quantization_config
    AutoModelForCausalLM.from_pretrained(FINETUNED, quantization_config=DecomposedConfig(base_model=BASE))

How the hook runs in ``PreTrainedModel.from_pretrained`` (transformers 5.24), each checkpoint read once
into the model (the base; the fine-tune only to compute its deltas):

1. ``validate_environment``: the request is checked before anything is downloaded (a base to decompose
   against, calibration prompts for ``mode="anneal"``). A device map over several devices or with disk
   offload is loaded on the CPU and placed once the substructures exist (step 5), since Accelerate places
   modules by name and the substructures are modules too.
2. ``update_attn_implementation`` (``update_tp_plan`` in transformers 5.17) sees the config: an artifact's
   ``transformers_weights`` (a sentence that stops transformers without this plugin) is pointed back at
   ``decomposition.safetensors`` (a sharded artifact: at its index, so that transformers downloads every shard).
3. ``preprocess_model`` sees the empty skeleton and the checkpoint files. An artifact's other files are
   pulled and checksummed, its base pulled at the pinned revision and its SHA-256 checked; a fine-tune
   and its base are paired (shapes, dtypes, architecture). Then the checkpoint files transformers is about
   to read become the base's: transformers loads the base into the skeleton with the requested dtype
   and devices, its own weight conversions and tying.
4. ``postprocess_model``: a fine-tune is decomposed into an artifact in a temporary directory
   (`hf_decompose.model.decompose_to_disk`); the artifact's deltas go into the loaded base
   (`hf_decompose.inject`), and the model's class gains `DecomposedModel`.

Downloads of the base use ``DecomposedConfig.hub_options`` (``token``, ``cache_dir``, ``local_files_only``),
the Hub cache the loaded files live in, and huggingface_hub's defaults (``HF_TOKEN``, ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer

from . import artifact, hub, inject
from .checkpoints import CheckpointPair, CheckpointReader, read_config, sha256_files
from .config import QUANT_METHOD, DecomposedConfig
from .decomposed import DecomposedModel, Decomposition, decomposed_class
from .errors import ArtifactError, ConfigError
from .heap import release_free_memory
from .model import decompose_to_disk
from .modules import DecomposedModule


class DecomposedHfQuantizer(HfQuantizer):
    """Decomposes a fine-tune while loading it, or rebuilds one from its artifact (see the module docstring)."""

    requires_calibration = False
    quantization_config: DecomposedConfig

    def __init__(self, quantization_config: DecomposedConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.artifact_dir: Path | None = None
        self.base_dir: Path | None = None
        self.finetuned: tuple[str, str | None] = ("", None)  # (id or directory, commit) of a fine-tune to decompose
        self.finetuned_dir: Path | None = None
        self.placement: dict | None = None  # a device map to apply once the substructures exist
        self.vocab: tuple[int, int] | None = None  # (base, fine-tune) vocabulary sizes where they differ
        self.owned: tempfile.TemporaryDirectory | None = None

    def validate_environment(self, device_map=None, **kwargs: Any) -> None:
        config = self.quantization_config
        if not self.pre_quantized:
            if not config.base_model:
                raise ConfigError("DecomposedConfig.base_model is not set: name the base checkpoint the fine-tune was trained from")
            if config.null == "init":
                raise ConfigError("null='init' cannot build a model; use null='reference'")
            if config.mode == "anneal":
                config.calibration_prompts()  # a bad calibration source fails before any checkpoint is read
        if isinstance(device_map, dict) and _needs_hooks(device_map):
            self.placement = dict(device_map)
            device_map.update(dict.fromkeys(device_map, "cpu"))  # loaded on the CPU, placed after the deltas are in

    def update_attn_implementation(self, config):
        """Point an artifact's ``transformers_weights`` back at its weights: transformers 5.25 calls this hook just
        before it resolves the checkpoint files, 5.17 calls `update_tp_plan` there (the same method)."""
        if self.pre_quantized and getattr(config, "transformers_weights", None) in artifact.WEIGHTS_OF:
            config.transformers_weights = artifact.WEIGHTS_OF[config.transformers_weights]
        return config

    update_tp_plan = update_attn_implementation

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any):
        if not checkpoint_files:
            raise ArtifactError(f"{model.config.name_or_path}: hf_decompose needs checkpoint files (a state_dict or GGUF file cannot be decomposed)")
        config = self.quantization_config
        first = Path(checkpoint_files[0])
        if self.pre_quantized:
            self.artifact_dir = self._pull_artifact(first)
            index = artifact.read_index(self.artifact_dir)  # checksums, before any weight is read
            self.base_dir = self._base_of(index)
        else:
            snapshot = hub.snapshot_of(first)
            self.finetuned = (snapshot.repo_id, snapshot.commit) if snapshot else (str(first.parent), None)
            self.finetuned_dir = hub.resolve(*self.finetuned, **self._hub_options(first))  # its tokenizer and card too
            self.base_dir = hub.resolve(config.base_model, config.base_revision, **self._hub_options(first))
            CheckpointPair(CheckpointReader(self.base_dir), CheckpointReader(self.finetuned_dir))  # pairs up, before any load
        base_files = CheckpointReader(self.base_dir).files
        base_vocab, vocab = read_config(self.base_dir).get("vocab_size"), getattr(model.config, "vocab_size", None)
        if base_vocab is not None and vocab is not None and base_vocab != vocab:  # the fine-tune added tokens
            self.vocab = (base_vocab, vocab)
            model.resize_token_embeddings(base_vocab, mean_resizing=False)
        checkpoint_files[:] = [str(f) for f in base_files]  # transformers now loads the base
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        config = self.quantization_config
        if not self.pre_quantized:
            self.owned = tempfile.TemporaryDirectory(prefix="hf_decompose-")
            finetuned, revision = self.finetuned
            self.artifact_dir = decompose_to_disk(
                finetuned, config.base_model, config, revision=revision, output_dir=Path(self.owned.name) / "artifact",
                **self._hub_options(self.finetuned_dir),
            )
        index = artifact.read_index(self.artifact_dir)
        deltas = artifact.DeltaReader(self.artifact_dir, index)  # one tensor at a time: merged, never held beside the weights
        if self.vocab is not None:
            _grow_vocabulary(model, *self.vocab)
        saved = DecomposedConfig.from_dict(dict(index["config"]))
        saved.execution = config.execution
        saved.base_model, saved.base_revision = index["base_model"]["id"], index["base_model"].get("revision")
        inject.apply_deltas(model, deltas, saved.execution)
        deltas.check_all_used()
        del deltas
        release_free_memory()
        model.__class__ = decomposed_class(type(model))
        _not_quantized(model)
        report = artifact.read_report(self.artifact_dir) if (self.artifact_dir / artifact.REPORT).is_file() else {}
        model.decomposition = Decomposition(self.artifact_dir, self.base_dir, saved, index, report, owned=self.owned)
        self.quantization_config = model.config.quantization_config = saved
        model._record_versions()
        if self.placement is not None:
            folder = tempfile.mkdtemp(prefix="hf_decompose-offload-") if "disk" in map(str, self.placement.values()) else None
            model.dispatch(self.placement, offload_folder=folder)
        return model

    def _hub_options(self, near: Path) -> dict[str, Any]:
        """Download options for the base: the config's, and the Hub cache `near` lives in."""
        options = dict(self.quantization_config.hub_options)
        snapshot = hub.snapshot_of(near)
        if snapshot is not None:
            options.setdefault("cache_dir", str(snapshot.cache_dir))
        return options

    def _pull_artifact(self, weights: Path) -> Path:
        snapshot = hub.snapshot_of(weights)
        if snapshot is None:
            return weights.parent
        return hub.pull_artifact(snapshot.repo_id, snapshot.commit, **self._hub_options(weights))

    def _base_of(self, index: dict) -> Path:
        """The base an artifact was decomposed against (or the copy the config names), its SHA-256 checked."""
        config, recorded = self.quantization_config, index["base_model"]
        other = config.base_model not in (None, recorded["id"])
        revision = config.base_revision if other or config.base_revision else recorded.get("revision")
        base_dir = hub.resolve(config.base_model if other else recorded["id"], revision, **self._hub_options(self.artifact_dir))
        actual = sha256_files(CheckpointReader(base_dir).files)
        if actual != recorded["sha256"]:
            raise ArtifactError(
                f"base mismatch: {self.artifact_dir} was decomposed against {recorded['id']} (revision {recorded.get('revision')}, "
                f"sha256 {sorted(recorded['sha256'].values())[0][:12]}...) but {base_dir} has sha256 {sorted(actual.values())[0][:12]}..."
            )
        return base_dir

    def is_serializable(self) -> bool:
        return True  # as an artifact, by `DecomposedModel.save_pretrained`

    def _dequantize(self, model, dtype=None):
        """`model.dequantize()`: the plain fine-tune (split modules merged, the class and the record dropped)."""
        if isinstance(model, DecomposedModel):
            model.set_execution("merged")
            model.__class__ = type(model).__bases__[1]
            del model.decomposition
        return model

    @property
    def is_trainable(self) -> bool:
        return True  # merged modules are the fine-tune's own; adapters (PEFT) train on them


def _not_quantized(model: nn.Module) -> None:
    """Take off transformers' mark of quantized weights (``config._is_quantized``, set for any quantizer), which some
    architectures compute around (Mamba's ``dt_proj(x) - dt_proj.bias`` for ``dt_proj.weight @ x``: in bfloat16 not the
    fine-tune's bits). A decomposed module's weight is a tensor (merged, or built where an operation reads it)."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and hasattr(module.config, "_is_quantized"):
            del module.config._is_quantized


def _needs_hooks(device_map: dict) -> bool:
    devices = {str(v) for v in device_map.values()}
    return len(devices) > 1 or "disk" in devices


def _grow_vocabulary(model, base_vocab: int, vocab: int) -> None:
    """Back to the fine-tune's vocabulary: the rows of the tokens it added start at zero (their delta is the row)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the new rows' random init is overwritten
        model.resize_token_embeddings(vocab, mean_resizing=False)
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None and not isinstance(module, DecomposedModule):
                module.weight[base_vocab:] = 0


def register() -> None:
    """Register `DecomposedConfig` and `DecomposedHfQuantizer` under ``quant_method="hf_decompose"`` (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(DecomposedConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(DecomposedHfQuantizer)


register()
