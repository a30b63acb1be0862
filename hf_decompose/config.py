"""`DecomposedConfig`: every knob of a decomposition, validated, readable from YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

MODES = ("lossless", "criterion")
NULLS = ("reference", "init")
CORRECTIONS = ("bh", "bonferroni")
EXECUTIONS = ("merged", "split")


@dataclass
class DecomposedConfig:
    """How to decompose a fine-tune against its base.

    Args:
        base_model: Hub id or local directory of the checkpoint training started from.
        base_revision: Hub revision of the base (ignored for local directories).
        mode: ``"lossless"`` removes only exactly-zero deltas (rebuilds the fine-tune bit for bit);
            ``"criterion"`` removes every dependency the statistical criterion calls unsupported.
        null: ``"reference"`` tests deltas against the base with a noise scale estimated from the
            data; ``"init"`` tests weights against N(0, initializer_range^2) (the paper's literal form).
        q: significance level (FDR level for ``"bh"``, family-wise level for ``"bonferroni"``).
        correction: multiple-testing control, ``"bh"`` (Benjamini-Hochberg) or ``"bonferroni"``.
        entry_test / group_test / spectral_test: which tests contribute to the support.
        max_rank: at most this many spectral directions are tested per matrix.
        execution: ``"merged"`` (one dense weight per module) or ``"split"`` (base plus substructures).
        dense_block_density: components at least this dense are stored as dense blocks.
        seed: seed for anything random (prompt sampling, randomized solvers).
    """

    base_model: str | None = None
    base_revision: str | None = None
    mode: str = "lossless"
    null: str = "reference"
    q: float = 0.05
    correction: str = "bh"
    entry_test: bool = True
    group_test: bool = True
    spectral_test: bool = True
    max_rank: int = 64
    execution: str = "merged"
    dense_block_density: float = 0.5
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the first out-of-range field."""
        for name, allowed in (("mode", MODES), ("null", NULLS), ("correction", CORRECTIONS), ("execution", EXECUTIONS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} is not one of {allowed}")
        if not isinstance(self.q, (int, float)) or not 0.0 < float(self.q) < 1.0:
            raise ConfigError(f"q={self.q!r} must lie strictly between 0 and 1")
        if not isinstance(self.max_rank, int) or self.max_rank < 0:
            raise ConfigError(f"max_rank={self.max_rank!r} must be a non-negative integer")
        if not 0.0 <= float(self.dense_block_density) <= 1.0:
            raise ConfigError(f"dense_block_density={self.dense_block_density!r} must lie in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecomposedConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a decomposition config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as err:
            raise ConfigError(str(err)) from err

    @classmethod
    def from_yaml(cls, path: str | Path) -> DecomposedConfig:
        """Read a recipe; its ``decomposition:`` section if present, else the whole file."""
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read config {path}: {err}") from err
        if isinstance(data, dict) and "decomposition" in data:
            data = data["decomposition"]
        return cls.from_dict(data or {})

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump({"decomposition": self.to_dict()}, sort_keys=False))
