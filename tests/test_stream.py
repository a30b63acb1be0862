"""`decompose_to_disk` (layer by layer, no model built) writes what `decompose(...).save_pretrained` writes."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_decompose.criterion as criterion
import hf_decompose.model as model_module
from hf_decompose import ArtifactError, AutoDecomposedModelForCausalLM, DecomposedConfig, PromptError, DecomposedModel, artifact, decompose, decompose_to_disk
from hf_decompose.cli import main
from hf_decompose.equivalence import greedy_generate
from hf_decompose.tensorfile import SafetensorsWriter

from .synthetic import CONFIGS, save_pair
from .test_reliability import artifact_files, hidden_leftovers

MODES = ["lossless", "criterion"]


def _tensors(directory) -> dict[str, torch.Tensor]:
    return load_file(directory / artifact.WEIGHTS)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tied", [True, False])
def test_streamed_artifact_equals_the_in_memory_one(tiny_pair_builder, single_thread, tmp_path, mode, tied):
    pair = tiny_pair_builder(tie_word_embeddings=tied)
    config = DecomposedConfig(mode=mode)
    decompose(pair.finetuned, pair.base, config, progress=False).save_pretrained(tmp_path / "memory")
    assert decompose_to_disk(pair.finetuned, pair.base, config, output_dir=tmp_path / "stream", progress=False) == tmp_path / "stream"
    assert artifact_files(tmp_path / "stream") == artifact_files(tmp_path / "memory")  # weights byte for byte, index, report
    assert set(json.loads((tmp_path / "stream" / artifact.REPORT).read_text())["timings"]) == {
        "read_and_validate_s", "criterion_and_substructures_s", "build_model_s", "annealing_s"}
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("mode", MODES)
def test_streamed_artifact_loads_everywhere_and_generates_like_the_in_memory_model(tiny_pair, single_thread, tmp_path, mode):
    config = DecomposedConfig(mode=mode)
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair.finetuned)
    prompts = tiny_pair.eval_prompts[:6]
    expected = greedy_generate(decompose(tiny_pair.finetuned, tiny_pair.base, config, progress=False), tokenizer, prompts, 16)
    out = decompose_to_disk(tiny_pair.finetuned, tiny_pair.base, config, output_dir=tmp_path / "stream", progress=False)
    assert len(expected) == len(prompts) == 6
    for loaded in (DecomposedModel.from_pretrained(out), AutoDecomposedModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)):
        generated = greedy_generate(loaded, tokenizer, prompts, 16)
        assert len(generated) == len(expected) and all(torch.equal(a, b) for a, b in zip(generated, expected))
    if mode == "lossless":
        reference = AutoModelForCausalLM.from_pretrained(tiny_pair.finetuned).state_dict()
        merged = AutoModelForCausalLM.from_pretrained(out).dequantize().state_dict()
        assert merged.keys() == reference.keys() and all(torch.equal(merged[k], v) for k, v in reference.items())


@pytest.mark.parametrize("mode", MODES)
def test_large_tensors_read_in_row_blocks_give_the_same_artifact(tiny_pair, single_thread, tmp_path, monkeypatch, mode):
    """The embedding (512 x 64 float32) cut into 2 KiB row blocks, as the default pair's 113 MB embedding is cut into 16 MiB."""
    config = DecomposedConfig(mode=mode)
    decompose_to_disk(tiny_pair.finetuned, tiny_pair.base, config, output_dir=tmp_path / "whole", progress=False)
    monkeypatch.setattr(model_module, "CHUNK_BYTES", 2048)
    monkeypatch.setattr(criterion, "CHUNK_BYTES", 2048)
    assert len(criterion.row_chunks(torch.zeros(512, 64))) == 64
    decompose_to_disk(tiny_pair.finetuned, tiny_pair.base, config, output_dir=tmp_path / "blocks", progress=False)
    whole, blocks = _tensors(tmp_path / "whole"), _tensors(tmp_path / "blocks")
    assert whole.keys() == blocks.keys() and any(k.startswith("model.embed_tokens.weight.") for k in whole)
    assert all(torch.equal(whole[k], blocks[k]) for k in whole)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_every_architecture_streams_in_row_blocks_to_the_in_memory_artifact(tmp_path, monkeypatch, model_type):
    """GPT-2's transposed Conv1D weights, untied heads, frozen MLPs (exact zeros, partial masks)."""
    base, ft = save_pair(tmp_path / "pair", model_type, frozen=("mlp",))
    for mode in MODES:
        config = DecomposedConfig(mode=mode, q=0.2)
        decompose(ft, base, config, progress=False).save_pretrained(tmp_path / f"memory-{mode}")
        with monkeypatch.context() as m:
            m.setattr(model_module, "CHUNK_BYTES", 1024)
            m.setattr(criterion, "CHUNK_BYTES", 1024)
            decompose_to_disk(ft, base, config, output_dir=tmp_path / f"stream-{mode}", progress=False)
        assert artifact_files(tmp_path / f"stream-{mode}") == artifact_files(tmp_path / f"memory-{mode}")


def test_interrupted_stream_leaves_no_output_and_resumes(tiny_pair, single_thread, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="hf_decompose")
    config, cache, out = DecomposedConfig(mode="criterion"), tmp_path / ".out.partial", tmp_path / "out"
    real = model_module._compute_layer
    calls = []

    def killed_at_third_layer(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(model_module, "_compute_layer", killed_at_third_layer)
    with pytest.raises(KeyboardInterrupt):
        decompose_to_disk(tiny_pair.finetuned, tiny_pair.base, config, output_dir=out, progress=False, resume_dir=cache)
    assert not out.exists() and hidden_leftovers(tmp_path) == [".out.partial"]
    monkeypatch.setattr(model_module, "_compute_layer", real)
    decompose_to_disk(tiny_pair.finetuned, tiny_pair.base, config, output_dir=out, progress=False, resume_dir=cache)
    assert "resumed 2 of" in caplog.text and not cache.exists()
    decompose(tiny_pair.finetuned, tiny_pair.base, config, progress=False).save_pretrained(tmp_path / "fresh")
    assert artifact_files(out) == artifact_files(tmp_path / "fresh")


def test_refusals(tiny_pair, tmp_path):
    with pytest.raises(PromptError, match="empty"):
        decompose_to_disk(tiny_pair.finetuned, tiny_pair.base, DecomposedConfig(mode="anneal", calibration=[]), output_dir=tmp_path / "a")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="holds no hf_decompose artifact"):
        decompose_to_disk(tiny_pair.finetuned, tiny_pair.base, output_dir=tmp_path / "taken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_cli_streams_without_building_a_model(tiny_pair, single_thread, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the CLI built a model for a lossless artifact")

    monkeypatch.setattr("hf_decompose.cli.decompose", no_model)
    out = tmp_path / "cli"
    assert main(["decompose", str(tiny_pair.base), str(tiny_pair.finetuned), "--output", str(out), "--mode", "lossless"]) == 0
    artifact.load(out)
    assert hidden_leftovers(tmp_path) == []


def test_writer_header_overflow_and_alignment(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "h": torch.ones(3, dtype=torch.bfloat16),
               "i": torch.arange(5, dtype=torch.int32), "b": torch.tensor([True, False]), "e": torch.zeros(0)}
    for reserve in (8, 4096):  # too small: the data is moved behind a header of its size
        with SafetensorsWriter(tmp_path / f"{reserve}.safetensors", reserve) as writer:
            for name, t in tensors.items():
                writer.add(name, t)
        loaded = load_file(tmp_path / f"{reserve}.safetensors")
        assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], t) for k, t in tensors.items())
        with safe_open(tmp_path / f"{reserve}.safetensors", "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
        header = json.loads((tmp_path / f"{reserve}.safetensors").read_bytes()[8:][: int.from_bytes((tmp_path / f"{reserve}.safetensors").read_bytes()[:8], "little")])
        assert [header[k]["data_offsets"][0] % 4 for k in ("a", "i")] == [0, 0] and header["h"]["data_offsets"][0] >= header["i"]["data_offsets"][1]


def test_writer_holds_no_tensor_that_keeps_a_mapped_file_resident(tmp_path):
    """A tensor held back to the end (an odd number of bfloat16 values) is held as a copy: one read from a mapped
    safetensors file kept the whole mapping, and every page of it read, resident until `close` (the 1.5B synthetic
    anneal's artifact writing rose by 2.6 GiB of file-backed memory)."""
    import time

    from safetensors.torch import save_file

    def file_rss() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssFile:"))

    save_file({"big": torch.randn(4096, 4096), "odd": torch.ones(7, dtype=torch.bfloat16)}, tmp_path / "source.safetensors")
    before = file_rss()
    with SafetensorsWriter(tmp_path / "out.safetensors", 4096) as writer:
        with safe_open(tmp_path / "source.safetensors", "pt") as handle:
            read = {k: handle.get_tensor(k) for k in handle.keys()}
        assert float(read["big"].sum()) != 0.0  # every page of it read
        for name, tensor in read.items():
            writer.add(name, tensor)
        assert file_rss() - before >= 48 * 2**20  # the big tensor's pages, resident through the mapping
        del read, tensor, handle
        for _ in range(200):  # the writer thread writes the big tensor and lets it go
            if not writer._pending:
                break
            time.sleep(0.01)
        assert file_rss() - before < 16 * 2**20
    assert torch.equal(load_file(tmp_path / "out.safetensors")["odd"], torch.ones(7, dtype=torch.bfloat16))


def test_writer_thread_keeps_order_under_a_small_budget_and_raises_its_errors(tmp_path, monkeypatch):
    """Tensors are written by a thread, at most `PENDING_BYTES` waiting (here less than one tensor): the file
    equals one written with room for all; a write that fails in the thread fails the caller, nothing hangs."""
    from hf_decompose import tensorfile

    tensors = {f"t{i}": torch.randn(64 + i, 32) for i in range(12)}
    files = {}
    for budget in (1, 2**30):
        monkeypatch.setattr(tensorfile, "PENDING_BYTES", budget)
        files[budget] = tmp_path / f"{budget}.safetensors"
        with SafetensorsWriter(files[budget], 4096) as writer:
            for name, t in tensors.items():
                writer.add(name, t)
    assert files[1].read_bytes() == files[2**30].read_bytes()
    assert all(torch.equal(load_file(files[1])[k], t) for k, t in tensors.items())

    writer = SafetensorsWriter(tmp_path / "full.safetensors", 4096)
    real_write, calls = writer.file.write, []

    def full_disk(data):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(28, "No space left on device")
        return real_write(data)

    monkeypatch.setattr(writer.file, "write", full_disk, raising=False)
    with pytest.raises(OSError, match="writing failed .*No space left"):
        for name, t in tensors.items():
            writer.add(name, t)
        writer.close()
    writer.abort()
