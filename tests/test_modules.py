"""Decomposed modules on every supported family: lossless is bit-exact, split matches merged."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_decompose import DecomposedConfig, decompose
from hf_decompose.modules import DecomposedModule

from .synthetic import CONFIGS, save_pair

ARCHS = sorted(CONFIGS)


def _ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHS)
def test_lossless_rebuilds_finetune_bit_for_bit(tmp_path, arch):
    base, ft = save_pair(tmp_path, arch)
    model = decompose(ft, base, DecomposedConfig(mode="lossless"), progress=False)
    reference = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32).eval()
    ref_params = dict(reference.named_parameters())
    wrapped = [(n, m) for n, m in model.model.named_modules() if isinstance(m, DecomposedModule)]
    assert wrapped, "every matrix moved, so every matrix module is decomposed"
    for name, module in wrapped:
        expected = ref_params.get(f"{name}.weight")
        if expected is None:  # a tied head shares the embedding's weight
            assert name == "lm_head" and reference.config.tie_word_embeddings, name
            continue
        merged = module.merged_module().weight
        assert torch.equal(merged.view(torch.int32), expected.detach().view(torch.int32)), name
    x = _ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, reference(input_ids=x).logits)
        merged_logits = model(input_ids=x).logits
        model.set_execution("split")
        split_logits = model(input_ids=x).logits
    torch.testing.assert_close(split_logits, merged_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_criterion_merged_equals_dense_model_with_same_weights(tmp_path, arch):
    base, ft = save_pair(tmp_path, arch, scale=1e-3)
    model = decompose(ft, base, DecomposedConfig(mode="criterion", q=0.2), progress=False)
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    state = dense.state_dict()
    for name, module in model.model.named_modules():
        if isinstance(module, DecomposedModule):
            state[f"{name}.weight"] = module.merged_module().weight.detach()
    for name, param in model.model.named_parameters():  # vectors (norms, biases) merged in place
        key = name.replace(".base.", ".")
        if not key.endswith(".weight") or param.dim() == 1:
            state[key] = param.detach()
    dense.load_state_dict(state)
    x = _ids()
    with torch.no_grad():
        merged = model(input_ids=x).logits
        assert torch.equal(merged, dense(input_ids=x).logits)
        model.set_execution("split")
        torch.testing.assert_close(model(input_ids=x).logits, merged, rtol=1e-4, atol=1e-4)


def test_untouched_modules_stay_the_shared_base(tmp_path):
    base, ft = save_pair(tmp_path, "llama", frozen=("layers.0.", "embed_tokens", "norm"))
    model = decompose(ft, base, DecomposedConfig(mode="lossless"), progress=False)
    layer0 = model.model.model.layers[0]
    assert not any(isinstance(m, DecomposedModule) for m in layer0.modules())
    assert isinstance(model.model.model.layers[1].mlp.up_proj, DecomposedModule)
    assert model.report["layers"][1]["kept_fraction"] == 0.0
