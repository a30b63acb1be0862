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
    expected = reference.state_dict()
    state = model.state_dict()
    assert state.keys() == expected.keys() and state  # merged: the fine-tune's own modules, parameters and buffers
    for key, value in expected.items():
        assert torch.equal(state[key].view(torch.int32), value.view(torch.int32)), key
    x = _ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, reference(input_ids=x).logits)
        merged_logits = model(input_ids=x).logits
        model.set_execution("split")
        assert any(isinstance(m, DecomposedModule) for m in model.modules()), "every matrix moved, so split wraps them"
        split_logits = model(input_ids=x).logits
        model.set_execution("merged")  # folds the parts back in: bit for bit again
        assert torch.equal(model(input_ids=x).logits, merged_logits)
    torch.testing.assert_close(split_logits, merged_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_criterion_merged_equals_dense_model_with_same_weights(tmp_path, arch):
    base, ft = save_pair(tmp_path, arch, scale=1e-3)
    model = decompose(ft, base, DecomposedConfig(mode="criterion", q=0.2), progress=False)
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    assert not any(isinstance(m, DecomposedModule) for m in model.modules())
    dense.load_state_dict(model.state_dict())  # merged holds plain weights: base + kept delta
    x = _ids()
    with torch.no_grad():
        merged = model(input_ids=x).logits
        assert torch.equal(merged, dense(input_ids=x).logits)
        assert not torch.equal(merged, AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(input_ids=x).logits)
        model.set_execution("split")
        torch.testing.assert_close(model(input_ids=x).logits, merged, rtol=1e-4, atol=1e-4)


def test_untouched_modules_stay_the_shared_base(tmp_path):
    base, ft = save_pair(tmp_path, "llama", frozen=("layers.0.", "embed_tokens", "norm"))
    model = decompose(ft, base, DecomposedConfig(mode="lossless", execution="split"), progress=False)
    layer0 = model.model.layers[0]
    assert not any(isinstance(m, DecomposedModule) for m in layer0.modules())
    assert isinstance(model.model.layers[1].mlp.up_proj, DecomposedModule)
    assert model.report["layers"][1]["kept_fraction"] == 0.0
    base_state = AutoModelForCausalLM.from_pretrained(base).state_dict()
    for key, value in model.set_execution("merged").state_dict().items():
        if key.startswith("model.layers.0."):
            assert torch.equal(value, base_state[key]), key


def test_split_low_rank_and_low_bit_parts_never_build_the_float_matrix(monkeypatch):
    import hf_decompose.parts.quant as quant
    from hf_decompose.parts import LowRankPart, QuantPart, TensorDelta
    from hf_decompose.quantize import quantize

    gen = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(128, 96, bias=False)
    codes, scales = quantize(torch.randn(96, 128, generator=gen) * 1e-2, 3, 64)
    lowrank = LowRankPart(torch.randn(96, 4, generator=gen), torch.randn(4, 128, generator=gen) * 0.1)
    delta = TensorDelta("weight", (96, 128), parts=[lowrank, QuantPart.from_packed(codes, scales, (96, 128))])
    module = DecomposedModule(base, delta)
    x = torch.randn(3, 5, 128, generator=gen)
    with torch.no_grad():
        merged = module(x)
        module.execution = "split"
        monkeypatch.setattr(quant, "dequantize", None)  # the fused kernel reads the packed codes only
        split = module(x)
    torch.testing.assert_close(split, merged, rtol=0, atol=1e-2 * float((merged - base(x)).abs().max()))


def test_split_runs_hooks_of_the_base_and_its_parts():
    """Split calls forwards directly only where nothing is hooked: a hook on the base or a part still runs."""
    from hf_decompose.parts import LowRankPart, TensorDelta

    gen = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(32, 24)
    part = LowRankPart(torch.randn(24, 2, generator=gen), torch.randn(2, 32, generator=gen))
    module = DecomposedModule(base, TensorDelta("weight", (24, 32), parts=[part]), execution="split")
    x = torch.randn(3, 32, generator=gen)
    with torch.no_grad():
        direct = module(x)
        for hooked in (module.base, module.ops.lowrank):
            seen = []
            handle = hooked.register_forward_hook(lambda m, args, out: seen.append(out.shape) or out * 2)
            doubled = module(x)
            handle.remove()
            assert seen, type(hooked).__name__
            contribution = base(x) if hooked is module.base else direct - base(x)
            torch.testing.assert_close(doubled, direct + contribution)


def test_a_lazy_weight_gives_its_shape_dtype_and_device_and_builds_its_values_only_for_an_operation():
    from hf_decompose.parts.ops import LazyWeight

    like, values, built = torch.zeros(4, 3, dtype=torch.bfloat16), torch.arange(12.0).view(4, 3).bfloat16(), []
    weight = LazyWeight(like, lambda: built.append(1) or values)
    assert (weight.shape, weight.dtype, weight.device, weight.dim(), weight.numel()) == (like.shape, torch.bfloat16, like.device, 2, 12)
    assert not built
    assert torch.equal(weight @ torch.ones(3, dtype=torch.bfloat16), values.sum(1)) and built
    assert torch.equal(weight.detach(), values) and type(weight.detach()) is torch.Tensor
    assert weight.tolist() == values.tolist() and (weight.float().numpy() == values.float().numpy()).all()
