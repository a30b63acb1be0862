"""`AutoDecomposedModelForCausalLM`: load a decomposed artifact (Hub repo or directory) in one call.

The shape of PEFT's ``AutoPeftModelForCausalLM``: the artifact names its base (id, pinned revision,
SHA-256 of the weight files); the base is pulled and checked, and the fine-tuned model rebuilt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import hub
from .config import QUANT_METHOD
from .errors import ArtifactError


class AutoDecomposedModelForCausalLM:
    """Factory for decomposed causal LMs; never instantiated."""

    def __init__(self) -> None:
        raise OSError("use AutoDecomposedModelForCausalLM.from_pretrained(repo_or_dir)")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        base_model: str | Path | None = None,
        base_revision: str | None = None,
        execution: str | None = None,
        **kwargs: Any,
    ):
        """The transformers model of an artifact, its modules the base plus the kept substructures.

        Args:
            pretrained_model_name_or_path: Hub repo id or local directory of the artifact.
            revision / token / cache_dir / local_files_only: as in transformers, for the artifact and its base.
            base_model / base_revision: rebuild against this base instead of the recorded one (its
                weights must still match the recorded SHA-256; a local copy, a mirror).
            execution: ``"merged"`` or ``"split"`` (default: as saved).
            kwargs: passed to `AutoModelForCausalLM.from_pretrained` (``device_map``, ``dtype``, ...).
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        from . import quantizer  # noqa: F401  (registers quant_method "hf_decompose")

        hub_kwargs = {"token": token, "cache_dir": str(cache_dir) if cache_dir else None, "local_files_only": local_files_only}
        try:
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, revision=revision, **hub_kwargs)
        except (OSError, ValueError) as err:
            raise ArtifactError(f"cannot read the config of {pretrained_model_name_or_path!r} (revision {revision!r}): {err}") from err
        check_artifact_config(getattr(config, "quantization_config", None), pretrained_model_name_or_path)
        with hub.loading_options(**hub_kwargs, base_model=str(base_model) if base_model else None, base_revision=base_revision):
            model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, revision=revision, **hub_kwargs, **kwargs)
        if execution:
            model.set_execution(execution)
        return model


def check_artifact_config(quantization_config: Any, where: str | Path) -> None:
    """Raise `ArtifactError` unless a config.json's ``quantization_config`` is hf_decompose's."""
    if quantization_config is None:
        raise ArtifactError(f"{where}: not a decomposed artifact (its config.json has no quantization_config)")
    method = quantization_config.get("quant_method") if isinstance(quantization_config, dict) else getattr(quantization_config, "quant_method", None)
    if method != QUANT_METHOD:
        raise ArtifactError(f"{where}: its config.json has quant_method {method!r}, not {QUANT_METHOD!r}: not a decomposed artifact")
