"""Generation equivalence: does a candidate model generate, token for token, what a reference generates?"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from hf_decompose.metrics import TIE_TOLERANCE, TOP_K

_DESCRIPTION = """
Compares greedy continuations of a candidate model (`predictions`) with those of a reference
model (`references`), one token-id sequence per prompt: the exact-match rate and, per prompt, the
position of the first differing token (None when identical). Given teacher-forced logits of both
models on the reference continuations (or per-position KL / top-1 values computed elsewhere), it
also reports the mean KL(reference || candidate), the top-1 agreement and the max |logit diff|.

Given each model's top-k tokens (k >= 2) and the reference's top-1/top-2 margin at every position
of the reference continuation (teacher-forced: up to the first divergence both models saw the same
prefix), it grades each prompt three ways:

- *exact*: the two sequences are identical;
- *tie-equivalent*: exact, or at the first divergence the reference's top-1/top-2 logit margin is
  below `tie_tolerance`, the candidate's token is the reference's runner-up there and the
  reference's token is the candidate's runner-up (a near-tie resolved the other way);
- *logprobs-close* (vLLM's ``check_logprobs_close``): exact, or at the first divergence each
  model's token is among the other's top `close_top_k` (5) tokens.
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
    reference_top, candidate_top: optional, per prompt an array (positions, k >= 2) of each model's
        top-k token ids, best first; with reference_margin (per prompt, per position top-1 minus
        top-2 logit of the reference) they grade the prompts (derived from logits when given).
    tie_tolerance: the margin (logits) below which a position is a tie; default 1e-3.
    close_top_k: vLLM's rule looks this deep into the other model's ranking; default 5.
Returns:
    exact_match_rate, num_prompts, first_divergence, token_agreement; with logits or per-position
    values also mean_kl, top1_agreement, max_abs_logit_diff, per_prompt_max_abs_logit_diff; with
    top-k tokens and margins also tie_equivalent / logprobs_close (per prompt), their rates,
    divergence_margins (the reference's margin at each first divergence) and tie_tolerance.
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


def top_tokens(logits, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """Per position the top-k token ids (best first) and the top-1 minus top-2 margin."""
    x = np.asarray(logits, dtype=np.float64)
    top = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    values = np.take_along_axis(x, top[..., :2], -1)
    return top, values[..., 0] - values[..., 1]


def grade(divergence: int | None, reference_top, candidate_top, reference_margin, tie_tolerance: float = TIE_TOLERANCE,
          close_top_k: int = TOP_K) -> tuple[bool, bool]:
    """(tie-equivalent, logprobs-close) of one prompt diverging at `divergence` (None: identical).

    At the divergence the reference emitted its top-1 and the candidate its own top-1 on the same
    prefix. A divergence past the recorded positions (a length mismatch) passes neither grade.
    """
    if divergence is None:
        return True, True
    ref, cand = np.asarray(reference_top), np.asarray(candidate_top)
    if divergence >= len(ref) or divergence >= len(cand):
        return False, False
    r, c = ref[divergence], cand[divergence]
    tie = bool(reference_margin[divergence] < tie_tolerance and c[0] == r[1] and r[0] == c[1])
    close = bool(c[0] in r[:close_top_k] and r[0] in c[:close_top_k])
    return tie, close


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
        reference_top=None,
        candidate_top=None,
        reference_margin=None,
        tie_tolerance: float = TIE_TOLERANCE,
        close_top_k: int = TOP_K,
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
            reference_top, reference_margin = zip(*(top_tokens(r, close_top_k) for r in reference_logits)) if stats else ([], [])
            candidate_top = [top_tokens(c, close_top_k)[0] for c in candidate_logits]
        if position_kl is not None and position_top1 is not None:
            kl, top1 = np.concatenate([np.ravel(k) for k in position_kl]), np.concatenate([np.ravel(t) for t in position_top1])
            per_prompt = [float(d) for d in prompt_max_abs_logit_diff] if prompt_max_abs_logit_diff is not None else []
            out |= {
                "mean_kl": float(kl.mean()) if kl.size else 0.0,
                "top1_agreement": float(top1.mean()) if top1.size else 1.0,
                "max_abs_logit_diff": max(per_prompt, default=0.0),
                "per_prompt_max_abs_logit_diff": per_prompt,
            }
        if reference_top is not None and candidate_top is not None and reference_margin is not None:
            grades = [grade(d, r, c, m, tie_tolerance, close_top_k) for d, r, c, m in zip(divergence, reference_top, candidate_top, reference_margin)]
            tie, close = ([g[0] for g in grades], [g[1] for g in grades])
            n = max(len(grades), 1)
            out |= {
                "tie_equivalent": tie, "tie_equivalent_rate": sum(tie) / n, "tie_tolerance": float(tie_tolerance),
                "logprobs_close": close, "logprobs_close_rate": sum(close) / n, "close_top_k": int(close_top_k),
                "divergence_margins": [None if d is None or d >= len(m) else float(m[d]) for d, m in zip(divergence, reference_margin)],
            }
        return out
