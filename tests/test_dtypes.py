"""Checkpoints as they ship: a bf16 or fp16 fine-tune is rebuilt in its own dtype by every loader,
parameters and buffers bit-identical to loading the fine-tune itself, and its lossless artifact is no
larger than the fine-tune."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_decompose  # noqa: F401  (registers the from_pretrained hook)
from hf_decompose import AutoDecomposedModelForCausalLM, DecomposedConfig, DecomposedModel, decompose, decompose_to_disk
from hf_decompose.equivalence import verify_equivalence
from hf_decompose.modules import DecomposedModule

from .synthetic import random_model

IDS = torch.arange(0, 24).reshape(2, 12)


def effective_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as the model runs it (a decomposed module: its merged weights)."""
    state, inner = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, DecomposedModule):
            inner |= {f"{name}.{n}" for n, _ in [*module.named_parameters(), *module.named_buffers()]}
            state |= {f"{name}.{n}": t for n, t in [*module.merged_module().named_parameters(), *module.merged_module().named_buffers()]}
    return state | {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if n not in inner}


def assert_same_model(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    got, want = effective_state(model), effective_state(reference)
    assert set(want) <= set(got), sorted(set(want) - set(got))[:5]
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, (name, got[name].dtype, tensor.dtype)
        assert torch.equal(got[name], tensor), name
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, reference(input_ids=IDS).logits)
        kwargs = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(IDS), pad_token_id=0)
        assert torch.equal(model.generate(IDS, **kwargs), reference.generate(IDS, **kwargs))


def pair_16bit(root: Path, dtype: torch.dtype, scale: float = 1e-2, shard: str | None = None) -> tuple[Path, Path]:
    """A random base stored in `dtype` and a fine-tune of it: every parameter moved (sign crossings included)."""
    base = random_model("llama").to(dtype)
    base.save_pretrained(root / "base", **({"max_shard_size": shard} if shard else {}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in base.parameters():
            p.add_((torch.randn(p.shape, generator=gen) * scale).to(dtype))
    base.save_pretrained(root / "ft", **({"max_shard_size": shard} if shard else {}))
    return root / "base", root / "ft"


def _data_bytes(directory: Path) -> int:
    total = 0
    for path in directory.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            total += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    return total


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def saved(request, tmp_path_factory) -> tuple[Path, Path, Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp(str(request.param).removeprefix("torch."))
    base, ft = pair_16bit(root, request.param, shard="20KB")
    assert len(list(ft.glob("*.safetensors"))) > 1  # sharded, as large checkpoints ship
    reference = AutoModelForCausalLM.from_pretrained(ft).eval()  # as people run it: its own dtype
    assert reference.dtype == request.param
    decompose_to_disk(ft, base, DecomposedConfig(mode="lossless"), output_dir=root / "artifact", progress=False)
    return base, ft, root / "artifact", reference


def test_decompose_rebuilds_the_finetune_in_its_dtype(saved):
    base, ft, _, reference = saved
    assert_same_model(decompose(ft, base, DecomposedConfig(mode="lossless"), progress=False), reference)


def test_from_pretrained_rebuilds_the_finetune_in_its_dtype(saved):
    _, _, artifact, reference = saved
    assert_same_model(DecomposedModel.from_pretrained(artifact), reference)


@pytest.mark.parametrize("loader", [AutoModelForCausalLM, AutoDecomposedModelForCausalLM])
def test_transformers_loaders_rebuild_the_finetune_in_its_dtype(saved, loader):
    _, _, artifact, reference = saved
    assert_same_model(loader.from_pretrained(artifact), reference)


def test_lossless_artifact_is_no_larger_than_the_finetune(saved):
    _, ft, artifact, _ = saved
    assert _data_bytes(artifact) <= _data_bytes(ft)


def test_lossless_artifact_of_a_sharded_bf16_checkpoint_is_no_larger_on_disk(tmp_path):
    """Files on disk: the tensor data is no larger; the file adds only its header's reservation (written
    before the parts are known, under 1 KiB per tensor), 0.5% of this checkpoint."""
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base", max_shard_size="1MB")
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape) * 1e-3).to(p.dtype))
    model.save_pretrained(tmp_path / "ft", max_shard_size="1MB")
    out = decompose_to_disk(tmp_path / "ft", tmp_path / "base", DecomposedConfig(mode="lossless"), output_dir=tmp_path / "out", progress=False)
    ft_bytes = sum(p.stat().st_size for p in (tmp_path / "ft").glob("*.safetensors"))
    assert len(list((tmp_path / "ft").glob("*.safetensors"))) > 1
    assert _data_bytes(out) <= _data_bytes(tmp_path / "ft")
    assert (out / "decomposition.safetensors").stat().st_size <= 1.01 * ft_bytes
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ft").eval()
    assert_same_model(DecomposedModel.from_pretrained(out), reference)


def test_mixed_dtypes_fp32_base_bf16_finetune(tmp_path):
    """The base is held in the fine-tune's dtype: the delta is exact against the base as loaded."""
    base = random_model("llama")
    base.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn(p.shape) * 1e-3)
    base.to(torch.bfloat16).save_pretrained(tmp_path / "ft")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ft").eval()
    model = decompose(tmp_path / "ft", tmp_path / "base", DecomposedConfig(mode="lossless"), progress=False)
    assert_same_model(model, reference)
    model.save_pretrained(tmp_path / "out")
    assert_same_model(DecomposedModel.from_pretrained(tmp_path / "out"), reference)


def test_verify_compares_in_the_finetunes_dtype_and_reports_it(saved):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    _, _, artifact, reference = saved
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<eos>", "<unk>", "to", "be", "or", "not"])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>")
    result = verify_equivalence(reference, DecomposedModel.from_pretrained(artifact), tokenizer, ["to be or not", "not to be"],
                                max_new_tokens=8, progress=False)  # fmt: skip
    assert result.dtype == str(reference.dtype).removeprefix("torch.") and result.exact_match_rate == 1.0 and result.max_abs_logit_diff == 0


@pytest.mark.parametrize("moved, rounded", [(1.0, False), (0.1, False), (1.0, True)], ids=["every-entry", "a-tenth", "fixable"])
def test_lossless_decides_a_costlier_delta_before_nudging_with_the_same_artifact(tmp_path, monkeypatch, moved, rounded):
    """A matrix whose exact delta is surely a dense block plus an override (a full bf16 fine-tune) is stored as the
    fine-tune's own values without nudging every mismatched entry: the same artifact tensors, bit for bit, as the
    full path; where the delta is not surely costlier (few entries moved, or every mismatch fixed by a nudge: steps
    added in bf16) nothing changes."""
    import hf_decompose.deltas as deltas

    model = random_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # each fine-tuned value rounded once from float32, as a bf16 training step leaves it
        for p in model.parameters():
            step = torch.randn(p.shape, generator=gen) * 1e-2 * (torch.rand(p.shape, generator=gen) < moved)
            p.add_(step.to(p.dtype)) if rounded else p.copy_(p.float() + step)
    model.save_pretrained(tmp_path / "ft")
    base, ft = tmp_path / "base", tmp_path / "ft"
    decided, costlier = [], deltas._costlier
    monkeypatch.setattr(deltas, "_costlier", lambda *a, **k: decided.append(costlier(*a, **k)) or decided[-1])
    decompose_to_disk(ft, base, DecomposedConfig(mode="lossless"), output_dir=tmp_path / "short", progress=False)
    monkeypatch.setattr(deltas, "_costlier", lambda *a, **k: False)
    decompose_to_disk(ft, base, DecomposedConfig(mode="lossless"), output_dir=tmp_path / "full", progress=False)
    short, full = (load_file(tmp_path / d / "decomposition.safetensors") for d in ("short", "full"))
    assert short.keys() == full.keys() and all(torch.equal(short[k], full[k]) for k in full)
    assert any(decided) == (moved == 1.0 and not rounded) and (decided or not rounded)  # the fixable case was asked
