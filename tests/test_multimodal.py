"""Multimodal checkpoints that load as a causal LM (Gemma 3 from 4B up, Gemma 4: a vision tower beside the language
model), as they ship: sharded bfloat16, the fine-tune changing every tensor, the vision tower's included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_decompose import ConfigError, DecomposedConfig, DecomposedModel, decompose, decompose_to_disk

from .test_architectures import ARCHITECTURES, CALIBRATION, COMMON, TOKENIZER, _structured_change
from .test_dtypes import effective_state

V = COMMON["vocab_size"]
IMAGE_TOKEN = V - 1
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
CONFIGS = {
    "gemma3": lambda: AutoConfig.for_model("gemma3", text_config=COMMON | {"head_dim": 8}, vision_config=VISION | {"image_size": 28, "patch_size": 14},
                                           mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN, boi_token_index=V - 3, eoi_token_index=V - 2),
    "gemma4": lambda: AutoConfig.for_model("gemma4", text_config=COMMON | ARCHITECTURES["gemma4_text"], audio_config=None,
                                           vision_config=VISION | {"num_key_value_heads": 4, "head_dim": 8, "patch_size": 4, "position_embedding_size": 64,
                                                                   "pooling_kernel_size": 2},
                                           image_token_id=IMAGE_TOKEN, boi_token_id=V - 3, eoi_token_id=V - 2, video_token_id=V - 4,
                                           audio_token_id=V - 5, boa_token_id=V - 6, eoa_token_index=V - 7),
}  # fmt: skip


def _pair(root: Path, arch: str, finetunes: dict[str, int] | None = None, keep: tuple[str, ...] = ()) -> tuple[Path, ...]:
    """The base and its fine-tunes (name: seed of the change; one, "ft", by default; parameters whose names hold `keep`
    unchanged), sharded bfloat16 checkpoints. Parameters initialized to zeros (Gemma 3's image projection) are drawn, so
    that an image changes the logits."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    model = model.to(torch.bfloat16)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for name, seed in {"base": None, **(finetunes or {"ft": 1})}.items():
        model.load_state_dict(base)
        if seed is not None:
            _structured_change(model, seed)
            model.load_state_dict({k: v for k, v in base.items() if any(part in k for part in keep)}, strict=False)
        model.save_pretrained(root / name, max_shard_size="20KB")
        TOKENIZER.save_pretrained(root / name)
    return tuple(root / name for name in ("base", *(finetunes or {"ft": 1})))


def _image_prompt(images: int = 1) -> dict[str, torch.Tensor]:
    """A Gemma 3 prompt holding `images` images (4 tokens each)."""
    pixels = torch.randn(images, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    return {"input_ids": torch.tensor([[2, *[IMAGE_TOKEN] * 4 * images, 5, 7]]), "pixel_values": pixels}


def _logits(model: torch.nn.Module) -> list[torch.Tensor]:
    """Logits of a text prompt and (Gemma 3) of a prompt holding an image."""
    with torch.no_grad():
        logits = [model(input_ids=torch.arange(2, 10)[None]).logits]
        if model.config.model_type == "gemma3":
            image = _image_prompt()
            logits.append(model(input_ids=image["input_ids"], pixel_values=image["pixel_values"].to(model.dtype)).logits)
    return logits


@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_a_multimodal_model_anneals_its_language_model_and_keeps_what_text_never_runs_exact(tmp_path, arch, streaming):
    """Lossless rebuilds the whole fine-tune bit for bit, images included. Annealing's guard runs text prompts, which never
    reach the vision tower or its projector: their deltas stay exact (annealed, they were once changed unseen), while
    the language model's are annealed."""
    base, ft = _pair(tmp_path, arch)
    reference = AutoModelForCausalLM.from_pretrained(ft).eval()
    assert type(reference).__name__.endswith("ForConditionalGeneration")
    want = effective_state(reference)
    unseen = [n for n in want if not n.startswith(("model.language_model.", "lm_head."))]  # the vision tower, its projector
    assert unseen

    lossless = AutoModelForCausalLM.from_pretrained(decompose_to_disk(ft, base, DecomposedConfig(mode="lossless"), output_dir=tmp_path / "lossless",
                                                                      progress=False)).eval()  # fmt: skip
    got = effective_state(lossless)
    assert [n for n in want if not torch.equal(got[n], want[n])] == []
    assert all(torch.equal(a, b) for a, b in zip(_logits(lossless), _logits(reference)))
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(base).eval())
    assert not any(torch.equal(a, b) for a, b in zip(base_logits, _logits(reference)))  # the fine-tune's changes show, an image's too

    config = DecomposedConfig(mode="anneal", annealing={"target": "top1", "calibration_prompts": 4, "calibration_tokens": 4})
    if streaming:
        out = decompose_to_disk(ft, base, config, output_dir=tmp_path / "anneal", calibration=CALIBRATION, progress=False)
        report = json.loads((out / "decomposition.json").read_text())["annealing"]
    else:
        annealed = decompose(ft, base, config, calibration=CALIBRATION, progress=False)
        report = annealed.report["annealing"]
        out = tmp_path / "anneal"
        annealed.save_pretrained(out)
    assert [level["layer"] for level in report["levels"] if level["level"] is not None]  # the language model was annealed
    assert not [level["layer"] for level in report["levels"] if not level["layer"].startswith(("model.language_model.", "~head"))]
    model = DecomposedModel.from_pretrained(out).eval()
    got = effective_state(model)
    assert [n for n in unseen if not torch.equal(got[n], want[n])] == []
    assert [n for n in want if ".language_model." in n and not torch.equal(got[n], want[n])]  # annealed: not the fine-tune's own
    assert all(torch.isfinite(t).all() for t in _logits(model))


def test_fine_tunes_of_a_multimodal_model_served_by_name_refuse_a_batch_mixing_them_on_images(tmp_path):
    """Two Gemma 3 fine-tunes by name: a text batch mixing them and the base gives each row what its fine-tune alone
    gives; so does a batch of one fine-tune holding images. The vision tower's n-th input is the n-th image, whichever row
    holds it (here row 0 holds both): a batch mixing fine-tunes on images is refused by name. It once ran image n with
    row n's fine-tune, silently. (The patch embedding and the pooling head are left as the base's: a change there is refused
    as any weight read outside its module is.)"""
    base, *finetunes = _pair(tmp_path, "gemma3", {"a": 1, "b": 2}, keep=("vision_tower.embeddings.", "vision_tower.head."))
    artifacts = {ft.name: decompose_to_disk(ft, base, DecomposedConfig(mode="lossless"), output_dir=tmp_path / f"lossless-{ft.name}", progress=False)
                 for ft in finetunes}  # fmt: skip
    alone = {ft.name: AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32).eval() for ft in finetunes}
    alone[None] = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    multi = DecomposedModel.from_pretrained(artifacts, dtype=torch.float32).eval()
    text = torch.arange(2, 10)[None].repeat(3, 1)
    image = _image_prompt(images=2)
    images = {"input_ids": torch.cat([image["input_ids"], torch.arange(2, 13)[None]]), "pixel_values": image["pixel_values"]}
    with torch.no_grad():
        mixed = multi(input_ids=text, decomposed_names=["a", "b", None]).logits
        for row, name in enumerate(["a", "b", None]):
            torch.testing.assert_close(mixed[row], alone[name](input_ids=text[:1]).logits[0], rtol=0, atol=1e-4)
        same = multi(**images, decomposed_names=["b", "b"]).logits
        torch.testing.assert_close(same[0], alone["b"](**image).logits[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(same[1], alone["b"](input_ids=images["input_ids"][1:]).logits[0], rtol=0, atol=1e-4)
        assert not torch.allclose(alone["a"](**image).logits, alone["b"](**image).logits, atol=1e-2)  # the fine-tunes' images differ
        for rows in (["a", "b"], ["a", None]):
            with pytest.raises(ConfigError, match=r"model\.vision_tower\..* runs on the batch's images, not on its rows"):
                multi(**images, decomposed_names=rows)
