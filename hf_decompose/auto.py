"""`AutoDecomposedModelForCausalLM`: load a decomposed artifact (Hub repo or directory) in one call.

The shape of PEFT's ``AutoPeftModelForCausalLM``: the artifact names its base (id, pinned revision,
SHA-256 of the weight files); the base is pulled and checked, and the fine-tuned model rebuilt. The
same as `DecomposedModel.from_pretrained`, and as ``AutoModelForCausalLM.from_pretrained`` after
``import hf_decompose``, with the base's download options and placement taken as arguments.
"""

from __future__ import annotations

from .decomposed import DecomposedModel


class AutoDecomposedModelForCausalLM:
    """Factory for decomposed causal LMs; never instantiated."""

    def __init__(self) -> None:
        raise OSError("use AutoDecomposedModelForCausalLM.from_pretrained(repo_or_dir)")

    from_pretrained = DecomposedModel.from_pretrained
