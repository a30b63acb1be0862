"""transformers integration from local directories: `quantization_config=DecomposedConfig(...)`, artifacts
loading through `AutoModelForCausalLM` / `AutoDecomposedModelForCausalLM`, and the errors of both."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AutoQuantizationConfig

from hf_decompose import artifact
from hf_decompose.checkpoints import sha256_files
from hf_decompose import (
    ArtifactError,
    AutoDecomposedModelForCausalLM,
    CheckpointError,
    ConfigError,
    DecomposedConfig,
    DecomposedHfQuantizer,
    DecomposedModel,
)
from hf_decompose.equivalence import greedy_generate
from hf_decompose.modules import DecomposedModule

from .synthetic import random_model, save_pair

NEW_TOKENS = 12


def _generate(model, tokenizer, prompts: list[str]) -> list[list[int]]:
    return [t.tolist() for t in greedy_generate(model, tokenizer, prompts, NEW_TOKENS)]


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def _load(ft, base, device_map=None, **config):
    return AutoModelForCausalLM.from_pretrained(ft, quantization_config=DecomposedConfig(base_model=str(base), **config), device_map=device_map)


def test_registered_with_transformers():
    config = AutoQuantizationConfig.from_dict({"quant_method": "hf_decompose", "base_model": "org/base", "mode": "criterion"})
    assert isinstance(config, DecomposedConfig) and config.mode == "criterion" and config.base_model == "org/base"
    assert AUTO_QUANTIZER_MAPPING["hf_decompose"] is DecomposedHfQuantizer
    assert DecomposedConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown quant_method 'gptq'"):
        DecomposedConfig.from_dict({"quant_method": "gptq"})


def test_local_round_trip_generates_like_the_finetune(tiny_pair, tmp_path):
    """from_pretrained(ft, quantization_config) -> save_pretrained -> both loaders: greedy generate() unchanged."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair.finetuned)
    prompts = tiny_pair.eval_prompts[:4]
    expected = _generate(AutoModelForCausalLM.from_pretrained(tiny_pair.finetuned, dtype=torch.float32), tokenizer, prompts)
    assert _generate(AutoModelForCausalLM.from_pretrained(tiny_pair.base, dtype=torch.float32), tokenizer, prompts) != expected

    model = _load(tiny_pair.finetuned, tiny_pair.base)
    assert type(model).__name__ == "DecomposedLlamaForCausalLM" and isinstance(model, DecomposedModel)
    assert not any(isinstance(m, DecomposedModule) for m in model.modules())  # merged: the fine-tune's own modules
    assert _generate(model, tokenizer, prompts) == expected
    assert sum(isinstance(m, DecomposedModule) for m in model.set_execution("split").modules()) > 10
    assert _generate(model, tokenizer, prompts) == expected
    model.set_execution("merged")

    out = model.save_pretrained(tmp_path / "artifact")
    config = json.loads((out / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "hf_decompose" and quant["base_model"] == str(tiny_pair.base)
    assert config["transformers_weights"] == artifact.WEIGHTS_WITHOUT_PLUGIN and not (out / "model.safetensors").exists()
    for loaded in (AutoDecomposedModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)):
        assert type(loaded).__name__ == "DecomposedLlamaForCausalLM"
        assert _generate(loaded, tokenizer, prompts) == expected


@pytest.mark.parametrize("hook", ["update_attn_implementation", "update_tp_plan"])
def test_either_config_hook_points_an_artifact_at_its_weights(hook):
    """transformers 5.25 resolves the checkpoint files right after `update_attn_implementation`, 5.17 after
    `update_tp_plan` (where an artifact stopped at "neither a safetensors file" with the first alone): both point back."""
    quantizer = DecomposedHfQuantizer(DecomposedConfig(), pre_quantized=True)
    for sentence, weights in artifact.WEIGHTS_OF.items():
        config = PretrainedConfig(transformers_weights=sentence)
        assert getattr(quantizer, hook)(config).transformers_weights == weights
    assert getattr(quantizer, hook)(PretrainedConfig(transformers_weights="model.safetensors")).transformers_weights == "model.safetensors"


def test_without_the_plugin_loading_fails_and_says_what_to_do(tmp_path):
    """transformers alone must not load an artifact as random weights: it stops, naming the plugin."""
    base, ft = save_pair(tmp_path)
    out = _load(ft, base).save_pretrained(tmp_path / "artifact")
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(out)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "pip install hf-decompose" in done.stderr and "import hf_decompose" in done.stderr
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "DecomposedLlamaForCausalLM"  # with the plugin: loads


def test_dtype_device_map_and_options_pass_through(tmp_path):
    base, ft = save_pair(tmp_path, scale=0.05)
    model = _load(ft, base, mode="criterion", q=0.2, execution="split", device_map="cpu")
    assert model.config.quantization_config.mode == "criterion"
    decomposed = [m for m in model.modules() if isinstance(m, DecomposedModule)]
    assert decomposed and all(m.execution == "split" for m in decomposed)
    out = model.save_pretrained(tmp_path / "artifact")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["mode"] == "criterion"

    half = AutoDecomposedModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, device_map="cpu", execution="merged")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16} and half.device.type == "cpu"
    full = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(half(_ids()).logits.float(), full(_ids()).logits, atol=0.1, rtol=0.05)


def test_lossless_is_bit_exact_and_tied_embeddings_survive(tmp_path):
    base, ft = save_pair(tmp_path, scale=0.05)
    model = _load(ft, base)
    reference = AutoModelForCausalLM.from_pretrained(ft)
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, reference(_ids()).logits)
    reloaded = AutoModelForCausalLM.from_pretrained(model.save_pretrained(tmp_path / "artifact"))
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # merged: still one tied weight
    with torch.no_grad():
        assert torch.equal(reloaded(_ids()).logits, reference(_ids()).logits)
    reloaded.set_execution("split")
    assert reloaded.lm_head.ops is reloaded.model.embed_tokens.ops  # split: one stored delta for the tied pair
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_ids()).logits, reference(_ids()).logits)


def test_missing_base(tmp_path):
    base, ft = save_pair(tmp_path)
    with pytest.raises(ConfigError, match="base_model is not set"):
        AutoModelForCausalLM.from_pretrained(ft, quantization_config=DecomposedConfig())
    with pytest.raises(CheckpointError, match="nowhere: no such directory"):
        _load(ft, tmp_path / "nowhere")
    out = _load(ft, base).save_pretrained(tmp_path / "artifact")
    base.rename(tmp_path / "moved")
    with pytest.raises(CheckpointError, match=f"{base}: no such directory"):
        AutoModelForCausalLM.from_pretrained(out)
    assert AutoDecomposedModelForCausalLM.from_pretrained(out, base_model=tmp_path / "moved").decomposition.index["base_model"]["id"] == str(base)


def test_wrong_base_names_both(tmp_path):
    base, ft = save_pair(tmp_path)
    out = _load(ft, base).save_pretrained(tmp_path / "artifact")
    random_model("llama", seed=7).save_pretrained(tmp_path / "other")
    with pytest.raises(ArtifactError, match=rf"base mismatch: .*decomposed against {base}.* but {tmp_path / 'other'} has sha256"):
        AutoDecomposedModelForCausalLM.from_pretrained(out, base_model=tmp_path / "other")


def test_corrupted_artifact_file(tmp_path):
    base, ft = save_pair(tmp_path)
    out = _load(ft, base).save_pretrained(tmp_path / "artifact")
    data = bytearray((out / "decomposition.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (out / "decomposition.safetensors").write_bytes(bytes(data))
    for load in (AutoDecomposedModelForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ArtifactError, match="decomposition.safetensors: checksum mismatch"):
            load(out)


def test_unknown_quant_method_and_plain_checkpoints(tmp_path):
    base, ft = save_pair(tmp_path)
    with pytest.raises(ArtifactError, match="no quantization_config"):
        AutoDecomposedModelForCausalLM.from_pretrained(ft)
    out = _load(ft, base).save_pretrained(tmp_path / "artifact")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "mystery"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="config.json: checksum mismatch"):  # a modified file is caught first
        AutoDecomposedModelForCausalLM.from_pretrained(out)

    def signed(config: dict) -> None:  # consistently re-signed: the config itself must be refused
        (out / "config.json").write_text(json.dumps(config))
        index = json.loads((out / artifact.INDEX).read_text())
        index["files"]["config.json"] = sha256_files([out / "config.json"])["config.json"]
        artifact._write_index(out, index)

    signed(config)
    with pytest.raises(ArtifactError, match="quant_method 'mystery', not 'hf_decompose'"):
        AutoDecomposedModelForCausalLM.from_pretrained(out)
    signed(config | {"quantization_config": config["quantization_config"] | {"quant_method": "hf_decompose", "annealing": {"factor_bits": 8}}})  # a field this version does not know
    with pytest.raises(ConfigError, match=f"{re.escape(str(out))}: its config.json's quantization_config: unknown annealing field.s.: factor_bits"):
        AutoDecomposedModelForCausalLM.from_pretrained(out)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    base, ft = save_pair(tmp_path / "pair")
    model = _load(ft, base)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="holds no hf_decompose artifact"):
        model.save_pretrained(tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("hf_decompose.artifact.os.link", disk_full)  # saving links or copies the artifact's files
    monkeypatch.setattr("hf_decompose.artifact.shutil.copy2", disk_full)
    with pytest.raises(ArtifactError, match="No space left"):
        model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair", "taken"]  # no target, no temporary sibling


def test_dequantize_gives_back_a_plain_finetune(tmp_path):
    base, ft = save_pair(tmp_path, scale=0.05)
    model = _load(ft, base).dequantize()
    assert type(model).__name__ == "LlamaForCausalLM" and not any(isinstance(m, DecomposedModule) for m in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "plain")
    reference = AutoModelForCausalLM.from_pretrained(ft)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "plain")(_ids()).logits, reference(_ids()).logits)
