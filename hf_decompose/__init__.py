"""hf_decompose: a fine-tune as its base plus independent, statistically supported substructures."""

from .config import DecomposedConfig
from .equivalence import EquivalenceResult, load_prompts, verify_equivalence
from .errors import ArtifactError, CheckpointError, ConfigError, DecomposeError, PromptError
from .model import DecomposedModel, decompose

__all__ = [
    "ArtifactError",
    "CheckpointError",
    "ConfigError",
    "DecomposeError",
    "DecomposedConfig",
    "DecomposedModel",
    "EquivalenceResult",
    "PromptError",
    "decompose",
    "load_prompts",
    "verify_equivalence",
]
__version__ = "0.1.0"
