"""Pieces of benchmarks/seed_claims.py whose mistakes would silently change the measured claims."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_decompose import DecomposedConfig
from hf_decompose.criterion import spectral_test

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _ground_truth  # noqa: E402


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=300), 1)  # ties on purpose
    truth = rng.random(300) < 0.3
    pos, neg = scores[truth], scores[~truth]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert _ground_truth.auc(scores, truth) == pytest.approx(pairwise)
    assert _ground_truth.auc(np.arange(4.0), np.array([False, False, True, True])) == 1.0


def test_spectral_test_finds_an_exactly_low_rank_delta():
    """A merged LoRA delta is exactly rank r: the noise scale must not collapse to zero."""
    torch.manual_seed(0)
    base = torch.randn(192, 64) * 0.02
    merged = base + torch.randn(192, 4) @ torch.randn(4, 64) * 1e-3
    assert spectral_test(merged - base, DecomposedConfig(mode="criterion")).rank == 4
    assert spectral_test(torch.zeros(192, 64), DecomposedConfig(mode="criterion")).rank == 0


def test_ground_truth_training_records_gradient_support():
    """Frozen modules and never-seen tokens get no gradient; every trained matrix entry does."""
    model = _ground_truth.new_model()
    ids = torch.tensor(list(b"abcab cabca " * 40))
    state, ever = _ground_truth.train(model, ids, 3, lr=1e-3, frozen=("layers.0.mlp.",), seq=16, batch=4)[3]
    assert not ever["model.layers.0.mlp.up_proj.weight"].any()
    seen = sorted(set(ids.tolist()))
    rows = ever["model.embed_tokens.weight"].any(1)
    assert rows[seen].all() and rows.sum() == len(seen)
    assert ever["model.layers.1.mlp.up_proj.weight"].all()
    init = _ground_truth.new_model().state_dict()
    assert torch.equal(state["model.layers.0.mlp.up_proj.weight"], init["model.layers.0.mlp.up_proj.weight"])
