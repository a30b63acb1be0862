"""Bad pairs fail early with an error that names the culprit."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_decompose import CheckpointError, DecomposedConfig, decompose

from .synthetic import random_model, save_pair


def _edit_weights(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _decompose(base, ft):
    return decompose(ft, base, DecomposedConfig(), progress=False)


def test_different_architectures(tmp_path):
    base, _ = save_pair(tmp_path, "llama")
    random_model("gpt2").save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CheckpointError, match="architectures differ.*llama.*gpt2"):
        _decompose(base, tmp_path / "gpt2")


def test_shape_mismatch_names_tensor(tmp_path):
    base, ft = save_pair(tmp_path)
    _edit_weights(ft, lambda t: t.__setitem__("model.layers.1.mlp.up_proj.weight", torch.zeros(65, 32)))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(64, 32\).*\(65, 32\)"):
        _decompose(base, ft)


def test_missing_tensor_names_it(tmp_path):
    base, ft = save_pair(tmp_path)
    _edit_weights(ft, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing from the fine-tune: model\.layers\.0\.self_attn\.k_proj\.weight"):
        _decompose(base, ft)


def test_extra_tensor_names_it(tmp_path):
    base, ft = save_pair(tmp_path)
    _edit_weights(ft, lambda t: t.__setitem__("model.extra.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"not in the base: model\.extra\.weight"):
        _decompose(base, ft)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_names_tensor(tmp_path, bad):
    base, ft = save_pair(tmp_path)

    def poison(t):
        t["model.layers.1.self_attn.o_proj.weight"][3, 4] = bad

    _edit_weights(ft, poison)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight.*1 NaN/Inf"):
        _decompose(base, ft)


def test_truncated_safetensors_names_file(tmp_path):
    base, ft = save_pair(tmp_path)
    data = (ft / "model.safetensors").read_bytes()
    (ft / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        _decompose(base, ft)


def test_missing_weights_and_config(tmp_path):
    base, ft = save_pair(tmp_path)
    (ft / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        _decompose(base, ft)
    (base / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: invalid JSON"):
        _decompose(base, base)


def test_tied_untied_mismatch(tmp_path):
    base, ft = save_pair(tmp_path)
    cfg = json.loads((ft / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (ft / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="tie_word_embeddings"):
        _decompose(base, ft)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_finite_reads_the_exponent_bits(monkeypatch, dtype):
    """NaN and +-Inf anywhere (past the first block too) are found from the bits; the largest finite values,
    subnormals and an empty tensor pass."""
    from hf_decompose import checkpoints

    monkeypatch.setattr(checkpoints, "FINITE_BLOCK", 1000)
    values = torch.randn(5000).to(dtype)
    values[:3] = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max, torch.finfo(dtype).tiny / 4], dtype=dtype)
    assert checkpoints.all_finite(values) and checkpoints.all_finite(values[:0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = values.clone()
        broken[4321] = bad
        assert not checkpoints.all_finite(broken), bad


def test_a_narrowing_read_that_overflows_is_refused(tmp_path):
    from safetensors.torch import save_file

    from hf_decompose.checkpoints import CheckpointReader

    (tmp_path / "config.json").write_text("{}")
    save_file({"w": torch.tensor([1.0, 1e6])}, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    assert torch.equal(reader.get("w"), torch.tensor([1.0, 1e6]))
    with pytest.raises(CheckpointError, match="NaN/Inf"):
        reader.get("w", dtype=torch.float16)


def test_a_tensor_of_matrices_reads_as_one_name_a_matrix(tmp_path):
    """A 3-D tensor of matrices (experts fused in one tensor) is read one matrix at a time, ``<name>@<i>`` (its rows
    too), by the checked reader and the raw one alike; a 3-D tensor whose matrices are single rows (a depthwise
    convolution's) stays whole. The target of a matrix is its view of the tensor's target, whole or itself a view."""
    from hf_decompose.checkpoints import CheckpointReader
    from hf_decompose.checkpoints import RawTensors
    from hf_decompose.names import Target

    experts, conv = torch.randn(3, 5, 4).bfloat16(), torch.randn(6, 1, 4).bfloat16()
    save_file({"mlp.experts.gate_up_proj": experts, "conv.weight": conv}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    reader, raw = CheckpointReader(tmp_path), RawTensors([tmp_path / "model.safetensors"])
    assert sorted(reader.names()) == ["conv.weight"] + [f"mlp.experts.gate_up_proj@{i}" for i in range(3)]
    assert reader.shape("mlp.experts.gate_up_proj@2") == (5, 4) and reader.dtype("mlp.experts.gate_up_proj@2") == "BF16"
    for i in range(3):
        assert torch.equal(reader.get(f"mlp.experts.gate_up_proj@{i}", dtype=None), experts[i])
        assert torch.equal(reader.get(f"mlp.experts.gate_up_proj@{i}", rows=slice(1, 3), dtype=None), experts[i, 1:3])
        assert torch.equal(raw.get(f"mlp.experts.gate_up_proj@{i}"), experts[i])
    assert torch.equal(reader.get("conv.weight", dtype=None), conv)

    param = torch.arange(2 * 6 * 4).reshape(2, 6, 4)  # two experts of [gate | up] rows
    assert torch.equal(Target("p").matrix(1, (2, 6, 4)).view(param), param[1])
    up = Target("p", (2, 3, 4), (24, 4, 1), 12)  # the up rows of both experts: a view
    assert torch.equal(up.view(param), param[:, 3:])
    assert torch.equal(up.matrix(1, (2, 6, 4)).view(param), param[1, 3:])
