"""Drop-in fidelity: the decomposed model behaves like the fine-tune in the clients people use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils
from transformers import AutoModelForCausalLM

from hf_decompose import ArtifactError, AutoDecomposedModelForCausalLM, DecomposedConfig, DecomposedModel, artifact, decompose
from hf_decompose.cli import main
from hf_decompose.parts import DeltaOps

from .synthetic import save_pair

GEN = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


def _ids() -> torch.Tensor:
    return torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(3))


def _buffer_bytes(modules) -> int:
    return sum(b.numel() * b.element_size() for m in modules for b in m.buffers())


def test_merged_holds_the_finetunes_bytes_and_split_the_base_plus_substructures(tmp_path):
    base, ft = save_pair(tmp_path, "llama", scale=0.05)
    finetuned = AutoModelForCausalLM.from_pretrained(ft)
    model = decompose(ft, base, DecomposedConfig(mode="criterion", q=0.2), progress=False)
    assert model.get_memory_footprint() == finetuned.get_memory_footprint()  # merged: nothing beside the weights
    split = model.set_execution("split")
    parts = _buffer_bytes(m for m in split.modules() if isinstance(m, DeltaOps))
    assert parts > 0
    base_bytes = AutoModelForCausalLM.from_pretrained(base).get_memory_footprint()
    assert split.get_memory_footprint() == base_bytes + parts


def test_the_hook_reads_the_finetune_once_and_loads_only_the_base(tmp_path, monkeypatch):
    """transformers loads the base into the skeleton; the fine-tune is read by the decomposition only."""
    base, ft = save_pair(tmp_path, "llama", scale=0.05)
    opened: list[Path] = []
    real = transformers.modeling_utils.safe_open

    def spy(path, *args, **kwargs):
        opened.append(Path(path).resolve())
        return real(path, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_open", spy)
    AutoModelForCausalLM.from_pretrained(ft, quantization_config=DecomposedConfig(base_model=str(base)))
    assert opened and all(p.parent == base.resolve() for p in opened), opened


def test_verify_and_decompose_prompts_agree_and_compare_with_the_finetune(tiny_pair, tmp_path, single_thread):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(tiny_pair.eval_prompts[:4]))
    out = tmp_path / "out"
    args = ["--max-new-tokens", "12", "--batch-size", "4"]
    assert main(["decompose", str(tiny_pair.base), str(tiny_pair.finetuned), "--output", str(out), "--mode", "criterion", "--prompts", str(prompts), *args]) == 0
    first = artifact.read_report(out)["equivalence"]
    assert main(["verify", str(out), "--prompts", str(prompts), *args]) == 0
    second = artifact.read_report(out)["equivalence"]
    assert first == second
    assert first["max_abs_logit_diff"] > 0  # the criterion removes something: a comparison with itself would say 0
    assert main(["verify", str(out), "--prompts", str(prompts), "--finetuned", str(out), *args]) == 2  # never against an artifact


def test_a_relative_base_path_is_recorded_absolute_and_loads_from_anywhere(tmp_path, monkeypatch):
    save_pair(tmp_path / "work", "llama", scale=0.05)
    monkeypatch.chdir(tmp_path / "work")
    model = decompose("ft", "base", DecomposedConfig(mode="lossless"), progress=False)
    out = model.save_pretrained("artifact")
    index = artifact.read_index(out)
    assert index["base_model"]["id"] == str((tmp_path / "work" / "base").resolve())
    assert index["finetuned_model"]["id"] == str((tmp_path / "work" / "ft").resolve())
    monkeypatch.chdir(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained("work/artifact")
    reference = AutoModelForCausalLM.from_pretrained("work/ft")
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, reference(_ids()).logits)


@pytest.mark.parametrize("loader", ["decomposed_model", "auto_decomposed", "auto_model"])
def test_every_loader_offloads_to_cpu_and_disk_with_identical_generations(tmp_path, loader, single_thread):
    base, ft = save_pair(tmp_path, "llama", scale=2e-2)
    out = decompose(ft, base, DecomposedConfig(mode="criterion", q=0.2), progress=False).save_pretrained(tmp_path / "artifact")
    expected = AutoModelForCausalLM.from_pretrained(out).generate(input_ids=_ids(), **GEN)
    load = {
        "decomposed_model": DecomposedModel.from_pretrained,
        "auto_decomposed": AutoDecomposedModelForCausalLM.from_pretrained,
        "auto_model": AutoModelForCausalLM.from_pretrained,
    }[loader]
    model = load(out, device_map="auto", max_memory={"cpu": 60_000}, offload_folder=tmp_path / "offload")
    assert isinstance(model, DecomposedModel) and {"cpu", "disk"} <= set(map(str, model.hf_device_map.values()))
    assert torch.equal(model.generate(input_ids=_ids(), **GEN), expected)


def test_lora_attaches_trains_and_its_adapter_fits_the_plain_finetune(tmp_path):
    peft = pytest.importorskip("peft")
    base, ft = save_pair(tmp_path, "llama", scale=0.05)
    for targets in (["q_proj", "v_proj"], "all-linear"):
        model = decompose(ft, base, DecomposedConfig(mode="criterion", q=0.2), progress=False)
        lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
        optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
        ids = _ids()
        for _ in range(3):
            loss = lora(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        lora.save_pretrained(tmp_path / "adapter")
        with torch.no_grad():
            trained = lora(input_ids=ids).logits
        # the adapter's keys are the fine-tune's module names: it loads onto the fine-tune the decomposition rebuilds
        plain = peft.PeftModel.from_pretrained(decompose(ft, base, DecomposedConfig(mode="criterion", q=0.2), progress=False).dequantize(), tmp_path / "adapter")
        with torch.no_grad():
            assert torch.equal(plain(input_ids=ids).logits, trained), targets
        lossless_plain = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ft), tmp_path / "adapter")
        assert {n for n, _ in lossless_plain.named_parameters() if "lora_" in n} == {n for n, _ in lora.named_parameters() if "lora_" in n}


def test_full_training_works_and_dequantize_is_the_way_out(tmp_path):
    base, ft = save_pair(tmp_path, "llama", scale=0.05)
    model = decompose(ft, base, DecomposedConfig(mode="lossless"), progress=False)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    with pytest.raises(ArtifactError, match="dequantize"):
        model.save_pretrained(tmp_path / "stale")
    assert not (tmp_path / "stale").exists()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    plain = model.dequantize()
    assert not isinstance(plain, DecomposedModel) and type(plain).__name__ == "LlamaForCausalLM"
    plain.save_pretrained(tmp_path / "plain")
    torch.save(trained, tmp_path / "expected.pt")
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'plain')!r}); "
        f"ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(3)); "
        f"sys.exit(0 if torch.equal(m(input_ids=ids).logits, torch.load({str(tmp_path / 'expected.pt')!r})) else 1)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "hf_decompose" not in (tmp_path / "plain" / "config.json").read_text()


def test_the_command_runs_as_a_module_too():
    """`python -m hf_decompose` (and `python -m hf_decompose.cli`) is the `hf-decompose` command, never a silent no-op."""
    for module in ("hf_decompose", "hf_decompose.cli"):
        done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "usage: hf-decompose" in done.stdout, (module, done.stderr[-500:])


def test_pipelines_take_the_decomposed_model_as_the_finetunes_class(tiny_pair, caplog):
    """``pipeline("text-generation")`` runs a decomposed model without logging it as unsupported, and generates what the
    pipeline gives the fine-tune; no Auto class resolves to the decomposed class."""
    from transformers import AutoConfig, AutoTokenizer, pipeline
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model = decompose(tiny_pair.finetuned, tiny_pair.base, DecomposedConfig(mode="lossless"), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair.finetuned)
    prompt = tiny_pair.eval_prompts[0]
    with caplog.at_level("ERROR"):
        got = pipeline("text-generation", model=model, tokenizer=tokenizer)(prompt, max_new_tokens=6, do_sample=False)
    assert not [r for r in caplog.records if "is not supported" in r.getMessage()]
    finetuned = AutoModelForCausalLM.from_pretrained(tiny_pair.finetuned)
    assert got == pipeline("text-generation", model=finetuned, tokenizer=tokenizer)(prompt, max_new_tokens=6, do_sample=False)
    assert type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    assert type(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_pair.finetuned))) is type(finetuned)
