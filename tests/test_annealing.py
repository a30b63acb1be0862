"""Annealing on the tiny trained pair: the guard rolls back, compensation helps, sets stay disjoint."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_decompose import DecomposedConfig, PromptError, decompose
from hf_decompose.annealing import GramCollector, calibrate, guard, weighted_lowrank
from hf_decompose.modules import DecomposedModule


@pytest.fixture(scope="module")
def exact(tiny_pair):
    model = decompose(tiny_pair.finetuned, tiny_pair.base, DecomposedConfig(mode="lossless", execution="split"), progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_pair.finetuned)
    return model, tok, calibrate(model, tok, tiny_pair.calib_prompts[:8], 16)


def _module(model, suffix):
    return next(m for n, m in model.named_modules() if n.endswith(suffix) and isinstance(m, DecomposedModule))


def test_guard_rejects_a_planted_breaking_step(exact):
    model, _, calib = exact
    assert guard(model, calib)[0]
    module = _module(model, "layers.0.mlp.down_proj")
    full = module.delta
    broken = type(full)(full.name, full.shape, full.transposed, dense=full.dense * -20)
    module.set_delta(broken)
    ok, stats = guard(model, calib)
    module.set_delta(full)
    assert not ok and stats["top1_agreement"] < 1.0
    assert guard(model, calib)[0]


def test_annealing_rolls_back_levels_that_break_equivalence(tiny_pair, exact):
    # level 1.0 drops every direction (rank 0): generation must change, so every layer rolls back
    config = DecomposedConfig(mode="anneal", annealing={"levels": [1.0], "calibration_prompts": 8, "calibration_tokens": 16, "precision": False})
    model = decompose(tiny_pair.finetuned, tiny_pair.base, config, calibration=tiny_pair.calib_prompts, progress=False)
    annealing = model.report["annealing"]
    assert {layer["layer"] for layer in annealing["levels"]} >= {"model.layers.0", "model.layers.1"}
    assert all(layer["level"] is None for layer in annealing["levels"])
    assert annealing["trace"] and not any(step["accepted"] for step in annealing["trace"])
    assert model.report["kept_fraction"] > 0.99  # everything rolled back to the exact delta
    ids = exact[2].input_ids[:4]
    finetuned = AutoModelForCausalLM.from_pretrained(tiny_pair.finetuned)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, finetuned(input_ids=ids).logits)  # the exact delta, restored: the fine-tune


def _layer_grams(exact, names: dict[str, str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(exact delta, calibration Gram of its inputs) of real modules of the tiny fine-tune."""
    model, _, calib = exact
    modules = {k: _module(model, v) for k, v in names.items()}
    grams = GramCollector(modules).run(model, calib)
    return {k: (m.delta.to_dense(), grams[k]) for k, m in modules.items()}


def _output_error(delta: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """||(delta - approx) X^T||^2 from the Gram X^T X."""
    e = (delta - approx).double()
    return float(torch.trace(e @ gram.double() @ e.t()))


def test_compensation_beats_plain_truncation_on_a_real_layer(exact):
    names = {"up": "layers.1.mlp.up_proj", "down": "layers.1.mlp.down_proj", "q": "layers.1.self_attn.q_proj"}
    for key, (delta, gram) in _layer_grams(exact, names).items():
        r = max(1, min(delta.shape) // 8)
        u, v, _ = weighted_lowrank(delta, gram.double())
        pu, pv, _ = weighted_lowrank(delta, None)
        assert _output_error(delta, u[:, :r] @ v[:r], gram) < 0.9 * _output_error(delta, pu[:, :r] @ pv[:r], gram), key


def test_bad_calibration_is_refused_before_any_checkpoint_is_read(tiny_pair, tmp_path, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError("a checkpoint was read")

    monkeypatch.setattr("hf_decompose.checkpoints.CheckpointReader.__init__", no_reads)
    for calibration, message in (([], "empty"), (tmp_path / "missing.txt", "does not exist"), (42, "not int")):
        with pytest.raises(PromptError, match=message):
            decompose(tiny_pair.finetuned, tiny_pair.base, DecomposedConfig(mode="anneal", calibration=calibration), progress=False)
        with pytest.raises(PromptError, match=message):
            AutoModelForCausalLM.from_pretrained(
                tiny_pair.finetuned, quantization_config=DecomposedConfig(base_model=str(tiny_pair.base), mode="anneal", calibration=calibration)
            )


def test_calibration_from_a_list_a_file_or_a_dataset_column(tmp_path):
    import datasets

    prompts = ["To be, or not to be", "Once upon a time", "The sea was calm"]
    (tmp_path / "calib.txt").write_text("\n".join(prompts))
    dataset = datasets.Dataset.from_dict({"question": prompts, "answer": ["a", "b", "c"]})
    for source, column, described in ((prompts, None, "3 prompts given"), (tmp_path / "calib.txt", None, "file calib.txt"), (dataset, "question", "Dataset (3 rows)")):
        assert DecomposedConfig(calibration=source, calibration_column=column).calibration_prompts() == (prompts, described)
    with pytest.raises(PromptError, match="no 'prompt' column"):
        DecomposedConfig(calibration=dataset, calibration_column="prompt").calibration_prompts()
    assert "calibration" not in DecomposedConfig(calibration=prompts).to_dict()  # run-time input, never saved


def test_anneal_through_the_hook_with_the_default_calibration_set(tiny_pair):
    prompts, source = DecomposedConfig().calibration_prompts()
    assert source == "built-in default set" and len(prompts) == 32 and len(set(prompts)) == 32
    config = DecomposedConfig(base_model=str(tiny_pair.base), mode="anneal", annealing={"levels": ["int8"], "calibration_prompts": 4, "calibration_tokens": 8})
    model = AutoModelForCausalLM.from_pretrained(tiny_pair.finetuned, quantization_config=config)
    assert model.report["mode"] == "anneal" and model.report["annealing"]["calibration"] == "built-in default set"
    assert model.report["annealing"]["trace"]  # the guard ran


def test_calibration_and_evaluation_sets_are_disjoint(tiny_pair):
    from hf_decompose.equivalence import check_disjoint

    check_disjoint(tiny_pair.calib_prompts, tiny_pair.eval_prompts)
    with pytest.raises(PromptError, match="overlap"):
        check_disjoint(tiny_pair.calib_prompts, tiny_pair.eval_prompts[:3] + tiny_pair.calib_prompts[:1])


def test_default_ladder_stores_fewer_bytes_and_keeps_calibration_exact(tiny_pair, exact, tmp_path):
    # the tiny model has many near-ties: a guard budget for 128 unseen positions lets some levels pass
    config = DecomposedConfig(mode="anneal", annealing={"calibration_prompts": 8, "calibration_tokens": 16, "positions": 128})
    model = decompose(tiny_pair.finetuned, tiny_pair.base, config, calibration=tiny_pair.calib_prompts, progress=False)
    report, annealing = model.report, model.report["annealing"]
    assert [layer for layer in annealing["levels"] if layer["level"] is not None]
    assert report["stored_fraction"] < 1.0 and report["size_bytes"]["artifact"] < 4 * report["delta_params"]
    assert any(d.quant_codes is not None for d in model.deltas.values())
    ok, stats = guard(model, exact[2], positions=128)
    assert ok, stats  # what the guard accepted on calibration still holds
    loaded = type(model).from_pretrained(model.save_pretrained(tmp_path / "annealed"))
    ids = exact[2].input_ids[:2]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_error_feedback_beats_plain_rounding_on_a_real_layer(exact):
    from hf_decompose.quantize import codes_of, dequantize, quantize

    names = {"up": "layers.1.mlp.up_proj", "down": "layers.1.mlp.down_proj", "o": "layers.1.self_attn.o_proj"}
    for key, (delta, gram) in _layer_grams(exact, names).items():

        def rounded(packed, scales):
            return dequantize(codes_of(packed, delta.shape), scales)

        fed, plain = rounded(*quantize(delta, 3, 16, gram=gram)), rounded(*quantize(delta, 3, 16))
        assert _output_error(delta, fed, gram) < 0.9 * _output_error(delta, plain, gram), key
