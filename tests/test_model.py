"""End to end on the tiny trained pair: decompose, verify, save, load, CLI."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_decompose import DecomposedConfig, DecomposedModel, decompose, verify_equivalence
from hf_decompose.cli import main
from hf_decompose.equivalence import greedy_generate


@pytest.fixture(scope="module")
def reference(tiny_pair):
    return AutoModelForCausalLM.from_pretrained(tiny_pair.finetuned).eval(), AutoTokenizer.from_pretrained(tiny_pair.finetuned)


def test_lossless_is_exact_on_held_out_prompts(tiny_pair, reference):
    model = decompose(tiny_pair.finetuned, tiny_pair.base, DecomposedConfig(mode="lossless"), progress=False)
    ref, tok = reference
    result = verify_equivalence(ref, model, tok, tiny_pair.eval_prompts, max_new_tokens=24, progress=False)
    assert result.exact_match_rate == 1.0 and result.max_abs_logit_diff == 0.0 and result.num_prompts == 32
    assert model.report["kept_fraction"] > 0.99  # Adam moved (nearly) every parameter
    base = AutoModelForCausalLM.from_pretrained(tiny_pair.base).eval()
    moved = verify_equivalence(ref, base, tok, tiny_pair.eval_prompts[:8], max_new_tokens=24, progress=False)
    assert moved.exact_match_rate < 1.0  # the fine-tune really changed behaviour: the check can fail


def test_criterion_mode_reports_honestly(tiny_pair, reference):
    model = decompose(tiny_pair.finetuned, tiny_pair.base, DecomposedConfig(mode="criterion"), progress=False)
    report = model.report
    assert 0.0 < report["kept_fraction"] < 1.0
    assert sum(layer["kept_params"] for layer in report["layers"]) == report["kept_params"]
    assert [layer["name"] for layer in report["layers"]] == ["model.embed_tokens.weight", "model.layers.0", "model.layers.1", "model.norm.weight"]
    for layer in report["layers"]:
        assert set(layer) >= {"name", "kept_fraction", "num_substructures", "largest_substructure"}


def test_save_load_round_trip_generates_identical_tokens(tiny_pair, reference, tmp_path):
    ref, tok = reference
    model = decompose(tiny_pair.finetuned, tiny_pair.base, DecomposedConfig(mode="criterion"), progress=False)
    out = model.save_pretrained(tmp_path / "artifact")
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in out.iterdir())
    assert (out / "decomposition.safetensors").stat().st_size < (tiny_pair.finetuned / "model.safetensors").stat().st_size
    loaded = DecomposedModel.from_pretrained(out)
    before = greedy_generate(model, tok, tiny_pair.eval_prompts[:8], 24)
    after = greedy_generate(loaded, tok, tiny_pair.eval_prompts[:8], 24)
    assert len(before) == len(after) == 8 and all(torch.equal(a, b) for a, b in zip(before, after))
    loaded.set_execution("split")
    split = greedy_generate(loaded, tok, tiny_pair.eval_prompts[:8], 24)
    assert len(split) == 8 and all(torch.equal(a, b) for a, b in zip(before, split))


def test_cli_decompose_and_verify(tiny_pair, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(tiny_pair.eval_prompts[:6]))
    out = tmp_path / "cli"
    assert main(["decompose", str(tiny_pair.base), str(tiny_pair.finetuned), "--output", str(out), "--prompts", str(prompts), "--max-new-tokens", "16"]) == 0
    report = json.loads((out / "decomposition.json").read_text())
    for key in ("base_model", "finetuned_model", "mode", "kept_fraction", "size_bytes", "equivalence", "layers", "timings"):
        assert key in report
    assert report["equivalence"]["exact_match_rate"] == 1.0 and report["equivalence"]["num_prompts"] == 6
    assert main(["verify", str(out), "--prompts", str(prompts), "--max-new-tokens", "8"]) == 0
    assert json.loads((out / "decomposition.json").read_text())["equivalence"]["max_new_tokens"] == 8
    assert main(["verify", str(tmp_path / "missing"), "--prompts", str(prompts)]) == 2
    assert main(["verify", str(out), "--prompts", str(prompts), "--max-new-tokens", "8", "--floor"]) == 0
    report = json.loads((out / "decomposition.json").read_text())
    assert sorted(report["noise_floor"]) == ["batch_size", "bfloat16", "delta_bfloat16", "threads"]
    assert report["equivalence"]["identical"] == 6 and report["equivalence"]["tie_equivalent_rate"] == 1.0
