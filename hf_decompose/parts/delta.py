"""A tensor's delta: its shape plus a list of parts, stored and read through the kind registry."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import PART_KINDS, Part, stored
from .override import OverridePart


@dataclass
class TensorDelta:
    """Everything kept of one tensor's delta, in canonical ``(out, in)`` layout (`transposed`: the stored
    tensor is ``(in, out)``, as GPT-2's Conv1D)."""

    name: str
    shape: tuple[int, ...]
    transposed: bool = False
    parts: list[Part] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.parts = sorted(self.parts, key=lambda p: p.order)  # stable: kinds in their order, parts of a kind as given

    def get(self, kind: str) -> Part | None:
        """The (first) part of `kind`, if any."""
        return next((p for p in self.parts if p.kind == kind), None)

    def of(self, kind: str) -> list[Part]:
        return [p for p in self.parts if p.kind == kind]

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """Singular directions kept (in float or in low-bit factors)."""
        return sum(p.rank for p in self.parts if p.kind in ("lowrank", "qlowrank"))

    @property
    def replaces_all(self) -> bool:
        """Every entry is stored as its absolute value (the exact values of a 16-bit fine-tune, when a
        delta would cost more bytes than they do)."""
        override = self.get("override")
        return override is not None and override.replaces_all

    def is_empty(self) -> bool:
        return self.num_params() == 0 and self.get("override") is None

    def num_params(self) -> int:
        """Stored delta parameters: kept entries plus low-rank factor parameters (an override replaces an
        entry already counted; a whole replaced tensor counts every entry)."""
        if self.replaces_all:
            return self.get("override").num_params()
        return sum(p.num_params() for p in self.parts)

    def nbytes(self) -> int:
        """Bytes of the stored tensors."""
        return sum(p.nbytes() for p in self.parts)

    def num_substructures(self) -> int:
        return sum(p.num_substructures() for p in self.parts)

    # -- dense views ---------------------------------------------------------------------------
    def to_dense(self) -> torch.Tensor:
        """The kept delta as one canonical float32 tensor (overrides excluded; parts may be stored in 16 bits)."""
        additive = [p for p in self.parts if p.additive]
        if len(additive) == 1 and additive[0].kind == "dense":
            return additive[0].weight.to(torch.float32, copy=True)
        out = torch.zeros(self.shape)
        for p in additive:
            p.add_to(out)
        return out

    def support(self) -> torch.Tensor:
        """Entries touched by the kept entry-level delta (low-rank parts excluded)."""
        mask = torch.zeros(self.shape, dtype=torch.bool)
        for p in self.parts:
            p.mark(mask)
        return mask

    def merge(self, weight: torch.Tensor) -> torch.Tensor:
        """base weight (stored layout) + kept delta, with overrides written last."""
        merged = weight.detach().to(torch.float32, copy=True)
        view = merged.t() if self.transposed else merged
        overrides = [p for p in self.parts if isinstance(p, OverridePart)]
        if not self.replaces_all:
            additive = [p for p in self.parts if p.additive]
            if len(additive) == 1 and additive[0].kind == "dense":
                view += additive[0].weight.to(view.device)  # the lossless path: one elementwise float32 add, exact by construction
            elif additive:
                view += self.to_dense().to(view.device)
        for p in overrides:
            p.write(view)
        return merged.to(weight.dtype)

    # -- serialization -------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to store, keyed ``<name>.<kind>[.<i>].<field>``."""
        out: dict[str, torch.Tensor] = {}
        index: dict[str, int] = {}
        for p in self.parts:
            i = None
            if p.numbered:
                i = index[p.kind] = index.get(p.kind, -1) + 1
            for f, t in p.state().items():
                out[f"{self.name}.{p.key(f, i)}"] = t
        return {k: stored(v) for k, v in out.items()}

    @classmethod
    def from_state(cls, name: str, shape: tuple[int, ...], transposed: bool, tensors) -> TensorDelta:
        """Read every registered kind's parts from `tensors` (a mapping, or anything with ``get(key)``), and
        check each against `shape` (ValueError)."""
        shape = tuple(shape)
        parts = [p for kind in PART_KINDS.values() for p in kind.read(shape, lambda key: tensors.get(f"{name}.{key}"))]
        for p in parts:
            p.check()
        return cls(name, shape, transposed, parts)
