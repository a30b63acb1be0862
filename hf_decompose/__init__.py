"""hf_decompose: a fine-tune as its base plus independent, statistically supported substructures."""

from .auto import AutoDecomposedModelForCausalLM
from .config import DecomposedConfig
from .equivalence import EquivalenceResult, load_prompts, verify_equivalence
from .errors import ArtifactError, CheckpointError, ConfigError, DecomposeError, PromptError
from .decomposed import DecomposedModel
from .model import decompose, decompose_to_disk
from .multi import MultiDecomposedModel
from .placement import place, print_device_map
from .quantizer import DecomposedHfQuantizer  # registers quant_method "hf_decompose" with transformers

__all__ = [
    "ArtifactError",
    "AutoDecomposedModelForCausalLM",
    "CheckpointError",
    "ConfigError",
    "DecomposeError",
    "DecomposedConfig",
    "DecomposedHfQuantizer",
    "DecomposedModel",
    "EquivalenceResult",
    "MultiDecomposedModel",
    "PromptError",
    "decompose",
    "decompose_to_disk",
    "load_prompts",
    "place",
    "print_device_map",
    "verify_equivalence",
]
__version__ = "0.1.0"
