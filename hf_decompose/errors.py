"""The project's error types: every failure a user can cause is one of these."""


class DecomposeError(Exception):
    """Base class of all hf_decompose errors."""


class ConfigError(DecomposeError, ValueError):
    """A configuration value is missing or out of range."""


class CheckpointError(DecomposeError):
    """A checkpoint cannot be read, or base and fine-tune do not pair up."""


class ArtifactError(DecomposeError):
    """A decomposed artifact is missing, corrupted, or does not match its base."""


class PromptError(DecomposeError, ValueError):
    """A prompt set is empty, unreadable, or overlaps another that must stay disjoint."""
