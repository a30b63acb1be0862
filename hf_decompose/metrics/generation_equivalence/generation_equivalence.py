"""Generation equivalence: does a candidate model generate, token for token, what a reference generates?"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Compares greedy continuations of a candidate model (`predictions`) with those of a reference
model (`references`), one token-id sequence per prompt: the exact-match rate and, per prompt, the
position of the first differing token (None when identical). Given teacher-forced logits of both
models on the reference continuations (or per-position KL / top-1 values computed elsewhere), it
also reports the mean KL(reference || candidate), the top-1 agreement and the max |logit diff|.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of token-id lists, the candidate's continuations.
    references: list of token-id lists, the reference's continuations.
    reference_logits, candidate_logits: optional, per prompt an array (positions, vocab) of logits
        of each model predicting the reference continuation.
    position_kl, position_top1: optional, per prompt the per-position KL(reference || candidate)
        and top-1 agreement (0/1), when the logits are too large to pass.
    prompt_max_abs_logit_diff: optional, per prompt the max |logit diff| (with the two above).
Returns:
    exact_match_rate, num_prompts, first_divergence, token_agreement; with logits or per-position
    values also mean_kl, top1_agreement, max_abs_logit_diff, per_prompt_max_abs_logit_diff.
Example:
    >>> metric = evaluate.load("hf_decompose/metrics/generation_equivalence")
    >>> metric.compute(predictions=[[1, 2, 3], [4, 5]], references=[[1, 2, 3], [4, 6]])["first_divergence"]
    [None, 1]
"""


def first_divergence(prediction: list[int], reference: list[int]) -> int | None:
    """Index of the first differing token; None when both sequences are identical."""
    for i, (p, r) in enumerate(zip(prediction, reference)):
        if p != r:
            return i
    return None if len(prediction) == len(reference) else min(len(prediction), len(reference))


def position_stats(reference_logits, candidate_logits) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-position KL(reference || candidate) and top-1 agreement, and the max |logit diff|."""
    ref, cand = np.asarray(reference_logits, dtype=np.float64), np.asarray(candidate_logits, dtype=np.float64)
    log_ref = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    log_cand = cand - np.logaddexp.reduce(cand, axis=-1, keepdims=True)
    kl = (np.exp(log_ref) * (log_ref - log_cand)).sum(-1)
    top1 = (ref.argmax(-1) == cand.argmax(-1)).astype(np.float64)
    return kl, top1, float(np.abs(ref - cand).max(initial=0.0))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GenerationEquivalence(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Sequence(datasets.Value("int64"))}
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        reference_logits=None,
        candidate_logits=None,
        position_kl=None,
        position_top1=None,
        prompt_max_abs_logit_diff=None,
    ) -> dict:
        divergence = [first_divergence(list(p), list(r)) for p, r in zip(predictions, references)]
        same = sum(int(np.sum(np.asarray(p[: len(r)]) == np.asarray(r[: len(p)]))) for p, r in zip(predictions, references))
        out = {
            "exact_match_rate": sum(d is None for d in divergence) / max(len(divergence), 1),
            "num_prompts": len(divergence),
            "first_divergence": divergence,
            "token_agreement": same / max(sum(len(r) for r in references), 1),
        }
        if reference_logits is not None and candidate_logits is not None:
            stats = [position_stats(r, c) for r, c in zip(reference_logits, candidate_logits)]
            position_kl, position_top1, prompt_max_abs_logit_diff = zip(*stats) if stats else ([], [], [])
        if position_kl is not None and position_top1 is not None:
            kl, top1 = np.concatenate([np.ravel(k) for k in position_kl]), np.concatenate([np.ravel(t) for t in position_top1])
            per_prompt = [float(d) for d in prompt_max_abs_logit_diff] if prompt_max_abs_logit_diff is not None else []
            out |= {
                "mean_kl": float(kl.mean()) if kl.size else 0.0,
                "top1_agreement": float(top1.mean()) if top1.size else 1.0,
                "max_abs_logit_diff": max(per_prompt, default=0.0),
                "per_prompt_max_abs_logit_diff": per_prompt,
            }
        return out
