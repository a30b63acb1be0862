"""The guard's screened head: the same verdicts and statistics as the whole head, or no screen at all."""

import copy
from dataclasses import replace

import pytest
import torch
from transformers import AutoTokenizer

from hf_decompose import DecomposedConfig, decompose
from hf_decompose.annealing import _ModelEngine, guard
from hf_decompose.modules import DecomposedModule
from hf_decompose.parts import DensePart
from hf_decompose.screening import HeadScreen, head_linear


@pytest.fixture(scope="module")
def engine(tiny_pair):
    model = decompose(tiny_pair.finetuned, tiny_pair.base, DecomposedConfig(mode="lossless", execution="split"), progress=False)
    engine = _ModelEngine(model, {}, {}, {})
    calib = engine.calibrate(AutoTokenizer.from_pretrained(tiny_pair.finetuned), tiny_pair.calib_prompts[:8], 16)
    return engine, calib


def _scaled(model, suffix: str, factor: float) -> tuple[DecomposedModule, object]:
    module = next(m for n, m in model.named_modules() if n.endswith(suffix) and isinstance(m, DecomposedModule))
    full = module.delta
    module.set_delta(type(full)(full.name, full.shape, full.transposed, [DensePart(full.to_dense() * factor)]))
    return module, full


@pytest.mark.parametrize("candidates", [64, 2])
@pytest.mark.parametrize(("suffix", "factor"), [("layers.0.mlp.down_proj", 1.02), ("layers.1.self_attn.o_proj", -20.0), ("embed_tokens", 1.05)])
def test_screened_guard_judges_as_the_whole_head(engine, suffix, factor, candidates):
    """A small change (certified from 64 candidates), a breaking one and a change of the tied head itself: the
    screened statistics are the whole head's; with 2 candidates some positions fall back to their whole rows."""
    engine, calib = engine
    screen = HeadScreen(calib, engine.screen(calib).ref_inputs, engine.head(), k=candidates)
    module, full = _scaled(engine.model, suffix, factor)
    try:
        for target in ("tie", "identical"):
            ok, whole = guard(engine, calib, target=target, positions=128)
            screened_ok, screened = guard(engine, calib, target=target, positions=128, screen=screen)
            assert screened_ok == ok
            assert screened["top1_agreement"] == whole["top1_agreement"] and screened["tie_agreement"] == whole["tie_agreement"]
            for key in ("expected_flips", "expected_flips_above_tolerance"):
                assert screened[key] == pytest.approx(whole[key], rel=1e-3, abs=1e-9)
            assert "mean_kl" not in screened and "mean_kl" in whole
        rows = calib.top1.numel()
        if candidates == 2:
            assert screened["whole_head_positions"] > 0
        elif abs(factor) < 2:
            assert screened["whole_head_positions"] < rows // 10
        if factor < 0:
            assert not ok and whole["top1_agreement"] < 0.9
    finally:
        module.set_delta(full)
    assert guard(engine, calib, screen=screen)[1]["expected_flips"] == 0.0  # the exact model: the reference, in the same arithmetic


def test_heads_whose_outputs_are_not_the_logits_are_not_screened(engine):
    """Scaled logits (Cohere's logit_scale, Granite's logits_scaling) or a bfloat16 head: the whole head runs."""
    engine, calib = engine
    inputs = engine.screen(calib).ref_inputs
    assert HeadScreen.of(replace(calib, logits=calib.logits * 0.5), inputs, engine.model) is None  # a model that scales its head's outputs
    assert HeadScreen.of(calib, inputs, engine.model) is not None
    bf16 = copy.deepcopy(engine.model).to(torch.bfloat16)  # a copy: a round trip through bfloat16 would change the fixture's weights
    assert head_linear(bf16) is None and HeadScreen.of(calib, inputs, bf16) is None


def test_the_bound_is_reused_for_a_head_merged_again_to_the_same_values(engine):
    """A refused head level rolled back merges the same weight into a new tensor: its bound is not computed again;
    a head whose values changed gets its own."""
    engine, calib = engine
    head = engine.head()
    screen = HeadScreen(calib, engine.screen(calib).ref_inputs, head)
    outside = screen._bound(head)[0]

    def linear(weight: torch.Tensor) -> torch.nn.Linear:
        out = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False).requires_grad_(False)
        out.weight.copy_(weight)
        return out

    assert screen._bound(linear(head.weight))[0] is outside
    assert not torch.equal(screen._bound(linear(head.weight * 1.5))[0], outside)
