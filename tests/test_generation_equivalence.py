"""The `evaluate` generation-equivalence metric, `verify_equivalence` through it, and prompts via `datasets`."""

import json

import evaluate
import torch
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_decompose import PromptError, load_prompts, verify_equivalence
from hf_decompose.metrics import GENERATION_EQUIVALENCE
from tests.synthetic import perturb, random_model

WORDS = ["[UNK]", "[PAD]"] + [f"w{i}" for i in range(126)]


@pytest.fixture(scope="module")
def metric():
    return evaluate.load(str(GENERATION_EQUIVALENCE))


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[PAD]")


def test_metric_tokens(metric):
    out = metric.compute(predictions=[[1, 2, 3], [4, 5, 6], [7, 8]], references=[[1, 2, 3], [4, 9, 6], [7, 8, 9]])
    assert out["first_divergence"] == [None, 1, 2]
    assert out["exact_match_rate"] == pytest.approx(1 / 3)
    assert out["token_agreement"] == pytest.approx(7 / 9)
    assert "mean_kl" not in out  # no logits given, no logit metrics invented


def test_metric_logits(metric):
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(4, 10)), rng.normal(size=(3, 10))]
    same = metric.compute(predictions=[[1] * 4, [2] * 3], references=[[1] * 4, [2] * 3], reference_logits=ref, candidate_logits=ref)
    assert same["mean_kl"] == pytest.approx(0, abs=1e-12) and same["top1_agreement"] == 1 and same["max_abs_logit_diff"] == 0
    shifted = [r.copy() for r in ref]
    shifted[1][0] = -shifted[1][0]  # one position's distribution flipped
    out = metric.compute(predictions=[[1] * 4, [2] * 3], references=[[1] * 4, [2] * 3], reference_logits=ref, candidate_logits=shifted)
    p = np.exp(ref[1][0] - np.logaddexp.reduce(ref[1][0]))
    kl = float((p * (np.log(p) - (shifted[1][0] - np.logaddexp.reduce(shifted[1][0])))).sum())
    assert out["mean_kl"] == pytest.approx(kl / 7)
    assert out["top1_agreement"] == pytest.approx(6 / 7)
    assert out["per_prompt_max_abs_logit_diff"][0] == 0 and out["per_prompt_max_abs_logit_diff"][1] == pytest.approx(2 * np.abs(ref[1][0]).max())


def test_verify_equivalence_goes_through_the_metric():
    tokenizer = _tokenizer()
    prompts = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"]
    reference = random_model("llama")
    same = verify_equivalence(reference, random_model("llama"), tokenizer, prompts, max_new_tokens=8, progress=False)
    assert same.exact_match_rate == 1 and same.first_divergence == [None] * 4
    assert same.max_abs_logit_diff == 0 and same.per_prompt_max_abs_logit_diff == [0.0] * 4 and same.top1_agreement == 1
    changed = verify_equivalence(reference, perturb(random_model("llama"), 0.5), tokenizer, prompts, max_new_tokens=8, progress=False)
    assert changed.mean_kl > 0 and len(changed.per_prompt_max_abs_logit_diff) == 4
    assert changed.max_abs_logit_diff == max(changed.per_prompt_max_abs_logit_diff) > 0
    assert changed.exact_match_rate == sum(d is None for d in changed.first_divergence) / 4


def test_load_prompts_through_datasets(tmp_path):
    (tmp_path / "p.csv").write_text('prompt,n\n"to be, or not",1\nthat is,2\n')
    assert load_prompts(tmp_path / "p.csv") == ["to be, or not", "that is"]
    (tmp_path / "p.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert load_prompts(str(tmp_path / "p.json")) == ["a", "b"]
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "test.csv").write_text("text\nheld out\n")
    (folder / "train.csv").write_text("text\nseen\n")
    assert load_prompts(folder) == ["held out"]  # a folder of splits: test first
    assert load_prompts(folder, split="train") == ["seen"]
    with pytest.raises(PromptError):
        load_prompts(tmp_path / "missing.csv")
    with pytest.raises(PromptError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")



PROMPT = ["w1 w2 w3"]


def _planted(rank: int, gap: float):
    """The random mistral (untied head) with, at the first new token of PROMPT, the logit of its
    rank-`rank` token moved (along that position's hidden state) to the top-1's logit minus `gap`:
    gap > 0 plants a margin of `gap`, gap < 0 makes that token win by -gap (rank 0: the top-1 is
    raised by `gap`)."""
    model, tokenizer = random_model("mistral"), _tokenizer()
    seen = {}
    handle = model.lm_head.register_forward_pre_hook(lambda m, args: seen.__setitem__("h", args[0][0, -1].detach().clone()))
    with torch.no_grad():
        logits = model(**tokenizer(PROMPT, return_tensors="pt")).logits[0, -1]
        handle.remove()
        order = logits.argsort(descending=True)
        top, other, h = int(order[0]), int(order[rank]), seen["h"]
        shift = gap if rank == 0 else logits[top] - logits[other] - gap
        model.lm_head.weight[other] += shift * h / h.dot(h)
    return model, tokenizer


def test_grades_of_a_planted_near_tie():
    """A near-tie (margin 5e-5) flipped: not exact, tie-equivalent, vLLM-close. A large margin
    (1.0) flipped to the runner-up: neither exact nor tie-equivalent, vLLM-close. The reference's
    rank-20 token made to win: no grade passes."""
    reference, tokenizer = _planted(1, 5e-5)
    candidate, _ = _planted(1, -5e-5)
    tie = verify_equivalence(reference, candidate, tokenizer, PROMPT, max_new_tokens=4, progress=False)
    assert tie.first_divergence == [0] and tie.identical == 0 and tie.exact_match_rate == 0
    assert tie.divergence_margins[0] == pytest.approx(5e-5, abs=2e-5) and tie.divergence_margins[0] < tie.tie_tolerance
    assert tie.tie_equivalent == [True] and tie.tie_equivalent_rate == 1 and tie.logprobs_close == [True] and tie.logprobs_close_rate == 1
    strict = verify_equivalence(reference, candidate, tokenizer, PROMPT, max_new_tokens=4, progress=False, tie_tolerance=1e-5)
    assert strict.tie_equivalent == [False] and strict.logprobs_close == [True]  # the tolerance is the rule's knob

    reference, _ = _planted(0, 1.0)
    candidate, _ = _planted(1, -1.0)
    flip = verify_equivalence(reference, candidate, tokenizer, PROMPT, max_new_tokens=4, progress=False)
    assert flip.first_divergence == [0] and flip.divergence_margins[0] > 1.0
    assert flip.tie_equivalent == [False] and flip.tie_equivalent_rate == 0 and flip.logprobs_close == [True]

    far, _ = _planted(20, -1.0)
    wrong = verify_equivalence(random_model("mistral"), far, tokenizer, PROMPT, max_new_tokens=4, progress=False)
    assert wrong.first_divergence == [0] and wrong.tie_equivalent == [False] and wrong.logprobs_close == [False]
    same = verify_equivalence(reference, reference, tokenizer, PROMPT, max_new_tokens=4, progress=False)
    assert same.identical == 1 and same.tie_equivalent == [True] and same.logprobs_close == [True]


def test_noise_floor_of_a_random_model():
    from hf_decompose.floor import noise_floor

    tokenizer = _tokenizer()
    prompts = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"]
    ft = perturb(random_model("llama"), 0.05)
    floor = noise_floor(ft, tokenizer, prompts, max_new_tokens=8, batch_size=4, base=random_model("llama"))
    assert list(floor) == ["bfloat16", "batch_size", "threads", "delta_bfloat16"]
    for name, row in floor.items():
        assert row["num_prompts"] == 4 and row["setting"] and len(row["tie_equivalent"]) == 4, name
        assert row["identical"] <= round(row["tie_equivalent_rate"] * 4) <= round(row["logprobs_close_rate"] * 4)
    assert floor["bfloat16"]["mean_kl"] > floor["threads"]["mean_kl"]  # bf16 serving moves the logits far more
    assert floor["delta_bfloat16"]["mean_kl"] > 0
    with pytest.raises(PromptError):
        noise_floor(ft, tokenizer, [])
