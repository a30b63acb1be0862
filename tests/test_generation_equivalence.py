"""The `evaluate` generation-equivalence metric, `verify_equivalence` through it, and prompts via `datasets`."""

import json

import evaluate
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
