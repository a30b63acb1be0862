"""`DecomposedConfig.device`: where the per-layer work runs, validated, never saved, same results."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import hf_decompose.model as model_module
from hf_decompose import ConfigError, DecomposedConfig, artifact, decompose_to_disk
from hf_decompose.criterion import randomized_svd
from hf_decompose.quantize import quantize

from .emulated_device import emulated_device

CUDA = torch.cuda.is_available()


def test_device_defaults_to_auto_and_is_a_run_time_option(tmp_path):
    config = DecomposedConfig(device="cpu")
    assert DecomposedConfig().device == "auto" and DecomposedConfig().torch_device() == torch.device("cuda" if CUDA else "cpu")
    assert config.torch_device() == torch.device("cpu")
    assert "device" not in config.to_dict() and config.to_dict() == DecomposedConfig().to_dict()
    config.to_yaml(tmp_path / "recipe.yaml")
    assert "device" not in (tmp_path / "recipe.yaml").read_text()
    assert DecomposedConfig.from_dict({"mode": "criterion", "device": "cpu"}).device == "cpu"


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "", 0, "meta"])
def test_unknown_devices_are_refused_by_name(spec):
    with pytest.raises(ConfigError, match=f"device={spec!r}"):
        DecomposedConfig(device=spec)


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_refused_naming_the_value(spec):
    with pytest.raises(ConfigError, match=rf"device='{spec}' is not available: this machine has no CUDA device"):
        DecomposedConfig(mode="criterion", device=spec)


def test_a_missing_cuda_index_is_refused():
    with pytest.raises(ConfigError, match=r"device='cuda:99' is not available"):
        DecomposedConfig(device="cuda:99")


def test_randomized_svd_finds_the_leading_triplets_and_leaves_the_global_rng_alone():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 8, generator=gen) @ torch.randn(8, 200, generator=gen) + 1e-3 * torch.randn(300, 200, generator=gen)
    state = torch.random.get_rng_state()
    u, s, vh = randomized_svd(a, 16, niter=3, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    exact = torch.linalg.svdvals(a)
    assert torch.allclose(s[:8], exact[:8], rtol=1e-5)
    assert torch.allclose((u[:, :8] * s[:8]) @ vh[:8], a, atol=1e-2)
    u2, s2, _ = randomized_svd(a, 16, niter=3, seed=0)
    assert torch.equal(s, s2) and torch.equal(u, u2)


def test_the_randomized_svd_on_an_emulated_accelerator_factors_its_small_matrices_on_the_host(monkeypatch):
    """On an accelerator the randomized SVD's products run there and its k x k factorizations (Cholesky, eigenvalues)
    on the CPU, where LAPACK takes microseconds and cuSOLVER milliseconds: the CPU's triplets bit for bit."""
    import hf_decompose.criterion as criterion

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(600, 8, generator=gen) @ torch.randn(8, 400, generator=gen) + 1e-3 * torch.randn(600, 400, generator=gen)
    monkeypatch.setattr(criterion, "subspace_dtype", lambda device, _dtype=criterion.subspace_dtype(torch.device("cpu")): _dtype)
    cpu = randomized_svd(a, 72, niter=3, seed=0)
    factored = []
    for name in ("eigh", "cholesky_ex"):
        real = getattr(torch.linalg, name)
        monkeypatch.setattr(torch.linalg, name, lambda m, *args, _real=real, **kw: factored.append(m.device) or _real(m, *args, **kw))
    with emulated_device() as device:
        on_device = randomized_svd(a.to(device), 72, niter=3, seed=0)
        assert all(t.device == device for t in on_device)
        on_device = [t.cpu() for t in on_device]
    assert len(factored) == 8 and set(factored) == {torch.device("cpu")}  # 7 bases, 1 small SVD
    assert all(torch.equal(x, y) for x, y in zip(cpu, on_device))


@pytest.mark.parametrize("mode", ["lossless", "criterion"])
def test_explicit_cpu_runs_the_work_there_and_writes_the_default_artifact(tiny_pair, single_thread, tmp_path, monkeypatch, mode):
    decompose_to_disk(tiny_pair.finetuned, tiny_pair.base, DecomposedConfig(mode=mode), output_dir=tmp_path / "default", progress=False)
    seen = _devices_of_the_work(monkeypatch)
    decompose_to_disk(tiny_pair.finetuned, tiny_pair.base, DecomposedConfig(mode=mode, device="cpu"), output_dir=tmp_path / "cpu", progress=False)
    assert seen and all(devices == {torch.device("cpu")} for devices in seen)
    _assert_same_weights(tmp_path / "default", tmp_path / "cpu")
    index = json.loads((tmp_path / "cpu" / artifact.INDEX).read_text())
    assert "device" not in index["config"]


@pytest.mark.parametrize("mode", ["lossless", "criterion", "anneal"])
def test_an_accelerator_emulated_on_cpu_runs_each_mode_there_and_writes_the_cpus_artifact(tiny_pair, single_thread, tmp_path, monkeypatch, mode):
    """Device placement without a device: on an accelerator emulated on CPU (`emulated_device`: any operation mixing its
    tensors with CPU tensors fails, as on CUDA) each mode runs its per-layer work there (annealing also its guard: every
    decoder layer materialised there, the guard's forward passes and Grams) and writes the CPU's artifact byte for byte."""
    from hf_decompose.layerwise import Layerwise

    annealing = {"calibration_prompts": 8, "calibration_tokens": 16, "positions": 128}
    config = DecomposedConfig(mode=mode, annealing=annealing, calibration=tiny_pair.calib_prompts if mode == "anneal" else None, device="cpu")
    cpu = decompose_to_disk(tiny_pair.finetuned, tiny_pair.base, config, output_dir=tmp_path / "cpu", progress=False)
    materialised, seen = [], _devices_of_the_work(monkeypatch)
    layer = Layerwise.layer
    monkeypatch.setattr(Layerwise, "layer", lambda self, *a, **k: materialised.append(layer(self, *a, **k)) or materialised[-1])
    with emulated_device() as device:
        monkeypatch.setattr(DecomposedConfig, "torch_device", lambda self: device)
        emulated = decompose_to_disk(tiny_pair.finetuned, tiny_pair.base, config, output_dir=tmp_path / "emulated", progress=False)
        placed = {p.device for m in materialised for p in m.parameters()}
    assert seen and all(devices == {device} for devices in seen)
    assert placed == ({device} if mode == "anneal" else set())
    _assert_same_weights(cpu, emulated)


def test_a_bfloat16_pair_crosses_to_an_emulated_accelerator_as_stored(tmp_path, single_thread, monkeypatch):
    """On an accelerator the criterion's deltas of a bfloat16 pair cross in bfloat16 (half float32's bytes) and are
    subtracted there in float32: the artifact is the CPU's byte for byte (the randomized SVD's subspace in the CPU's
    dtype on both: an accelerator may choose another)."""
    import hf_decompose.criterion as criterion

    from .test_dtypes import pair_16bit

    base, ft = pair_16bit(tmp_path, torch.bfloat16)
    config = DecomposedConfig(mode="criterion", device="cpu")
    cpu = decompose_to_disk(ft, base, config, output_dir=tmp_path / "cpu", progress=False)
    monkeypatch.setattr(criterion, "subspace_dtype", lambda device, _dtype=criterion.subspace_dtype(torch.device("cpu")): _dtype)
    crossed = []
    row_blocks = model_module._row_blocks
    monkeypatch.setattr(model_module, "_row_blocks", lambda *a: crossed.append(a[-1]) or row_blocks(*a))
    with emulated_device() as device:
        monkeypatch.setattr(DecomposedConfig, "torch_device", lambda self: device)
        emulated = decompose_to_disk(ft, base, config, output_dir=tmp_path / "emulated", progress=False)
    assert crossed and set(crossed) == {torch.bfloat16}
    _assert_same_weights(cpu, emulated)


def _devices_of_the_work(monkeypatch) -> list[set[torch.device]]:
    """The devices of the tensors `assess_layer` and `exact_delta` are given, a set per call, filled as they run."""
    seen = []
    for name in ("assess_layer", "exact_delta"):
        real = getattr(model_module, name)
        monkeypatch.setattr(model_module, name, lambda *a, _real=real, **k: seen.append({t.device for t in _tensors(a)}) or _real(*a, **k))
    return seen


def _assert_same_weights(a, b) -> None:
    """Two artifacts' weights: the same tensors, bit for bit."""
    ours, theirs = load_file(a / artifact.WEIGHTS), load_file(b / artifact.WEIGHTS)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _tensors(args) -> list[torch.Tensor]:
    """The tensors among `assess_layer`'s or `exact_delta`'s arguments."""
    out = [a for a in args if isinstance(a, torch.Tensor)]
    for a in args:
        if isinstance(a, dict):
            out += [t for _, t in a.values()]
    return out


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["lossless", "criterion"])
def test_cuda_and_cpu_agree(tiny_pair, tmp_path, mode):
    for device in ("cpu", "cuda"):
        decompose_to_disk(tiny_pair.finetuned, tiny_pair.base, DecomposedConfig(mode=mode, device=device), output_dir=tmp_path / device, progress=False)
    cpu, cuda = load_file(tmp_path / "cpu" / artifact.WEIGHTS), load_file(tmp_path / "cuda" / artifact.WEIGHTS)
    assert cpu.keys() == cuda.keys()
    for k in cpu:
        if cpu[k].is_floating_point():
            assert torch.allclose(cpu[k].float(), cuda[k].float(), rtol=1e-3, atol=1e-5), k
        else:
            assert torch.equal(cpu[k], cuda[k]), k


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_error_feedback_rounding_agrees_on_cuda():
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 128, generator=gen), torch.randn(256, 128, generator=gen)
    cpu = quantize(w, 4, 64, gram=x.T @ x)
    cuda = quantize(w.cuda(), 4, 64, gram=(x.T @ x).cuda())
    assert all(t.device.type == "cpu" for t in cuda)
    assert (cpu[0] != cuda[0]).float().mean() < 0.01 and torch.allclose(cpu[1].float(), cuda[1].float(), rtol=1e-2)
