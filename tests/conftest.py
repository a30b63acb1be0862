"""Shared fixtures: a tiny Llama base / fine-tune pair, trained for real in seconds and cached on disk."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

import hf_decompose.pair as hp
from hf_decompose import kernels

TINY = {
    "version": 1,  # bump when the build below changes
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    # Plays that are neither the fine-tune's training texts nor held out.
    "pretrain_texts": ["tempest", "twelfth_night", "as_you_like_it", "henry_v", "richard_iii", "taming_of_the_shrew"],
    "pretrain": {"steps": 300, "batch_size": 16, "seq_len": 128, "lr": 3e-3, "weight_decay": 0.0, "seed": 0},
    "finetune": {"steps": 30, "batch_size": 8, "seq_len": 128, "lr": 1e-3, "weight_decay": 0.0, "seed": 1},
}
EOS = "<|endoftext|>"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: needs the real SmolLM2 pair (downloads, minutes of CPU)")


def _tiny_tokenizer(texts: list[str], vocab_size: int, max_len: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained offline on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, model_max_length=max_len)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models train ~10x faster on one thread than on two when the CPUs are shared; a fixed
    thread count also keeps the cached weights bitwise reproducible."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(params=["kernel", "int4"])
def quant_layout(request, monkeypatch) -> str:
    """The run-time layout of 4-bit codes: hf_decompose's compiled kernel (skipped where it is not available) or,
    with it turned off, PyTorch's int4 kernel."""
    if request.param == "kernel" and not kernels.available():
        pytest.skip("hf_decompose's CPU kernel is not available here")
    if request.param == "int4":
        monkeypatch.setattr(kernels, "available", lambda: False)
    return request.param


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """`one_thread` for a whole test module."""
    with one_thread():
        yield


def tiny_finetune(base: Path, corpus: hp.Corpus) -> PreTrainedModel:
    """The tiny pair's fine-tune of `base`, in memory (what `build_tiny_pair` saves)."""
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    with one_thread():
        hp.train_causal_lm(model, tokenizer, corpus.train_texts, desc="tiny fine-tune", **TINY["finetune"])
    return model


def build_tiny_pair(tie_word_embeddings: bool = True) -> hp.ModelPair:
    """Build (once, cached under `cache_dir()/tests/<hash of the settings>`) the tiny base / fine-tune pair."""
    settings = {**TINY, "tie_word_embeddings": tie_word_embeddings}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    root = hp.cache_dir() / "tests" / key
    corpus = hp.load_corpus(hp.cache_dir())
    if not hp._is_complete(root):
        with hp._atomic_dir(root) as tmp:
            pretrain = [corpus.texts[n] for n in TINY["pretrain_texts"]]
            tokenizer = _tiny_tokenizer(pretrain, TINY["vocab_size"], TINY["max_position_embeddings"])
            config = LlamaConfig(
                vocab_size=len(tokenizer), tie_word_embeddings=tie_word_embeddings,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                **{k: TINY[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads", "max_position_embeddings")},
            )  # fmt: skip
            with torch.random.fork_rng(devices=[]), one_thread():
                torch.manual_seed(TINY["pretrain"]["seed"])
                model = LlamaForCausalLM(config)
                hp.train_causal_lm(model, tokenizer, pretrain, desc="tiny pretrain", **TINY["pretrain"])
            model.save_pretrained(tmp / "base")
            tokenizer.save_pretrained(tmp / "base")
            tiny_finetune(tmp / "base", corpus).save_pretrained(tmp / "finetuned")
            tokenizer.save_pretrained(tmp / "finetuned")
    eval_prompts, calib_prompts = hp.prompt_sets(corpus)
    return hp.ModelPair(root / "base", root / "finetuned", eval_prompts, calib_prompts)


@pytest.fixture(scope="session")
def tiny_pair_builder() -> Callable[..., hp.ModelPair]:
    return build_tiny_pair


@pytest.fixture(scope="session")
def tiny_finetuner() -> Callable[[Path, hp.Corpus], PreTrainedModel]:
    return tiny_finetune


@pytest.fixture(scope="session")
def tiny_pair() -> hp.ModelPair:
    """Tiny Llama pair with tied embeddings (2 layers, hidden 64, byte-level BPE of 512 tokens)."""
    return build_tiny_pair(tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_pair_untied() -> hp.ModelPair:
    """The same with separate input embeddings and LM head."""
    return build_tiny_pair(tie_word_embeddings=False)
