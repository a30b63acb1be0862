"""`evaluate` metric modules shipped with hf_decompose, loadable offline with `evaluate.load(path)`."""

from __future__ import annotations

from pathlib import Path

GENERATION_EQUIVALENCE = Path(__file__).resolve().parent / "generation_equivalence"
TIE_TOLERANCE = 1e-3  # logits: a top-1/top-2 margin below this is a tie
TOP_K = 5  # vLLM's check_logprobs_close looks at each model's top 5


def load_generation_equivalence():
    """The generation-equivalence metric, loaded through `evaluate` from its local folder."""
    import evaluate

    return evaluate.load(str(GENERATION_EQUIVALENCE))
