"""`evaluate` metric modules shipped with hf_decompose, loadable offline with `evaluate.load(path)`."""

from __future__ import annotations

from pathlib import Path

GENERATION_EQUIVALENCE = Path(__file__).resolve().parent / "generation_equivalence"


def load_generation_equivalence():
    """The generation-equivalence metric, loaded through `evaluate` from its local folder."""
    import evaluate

    return evaluate.load(str(GENERATION_EQUIVALENCE))
