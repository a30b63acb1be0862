"""Atomic, resumable, deterministic writes: an interrupted run leaves its output absent or complete,
a re-run resumes from finished layers, and the same inputs give byte-identical artifacts."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_decompose import ArtifactError, DecomposedConfig, DecomposedModel, artifact, decompose, resume
from hf_decompose.parts import DensePart, TensorDelta

from .synthetic import perturb, save_pair

ROOT = Path(__file__).resolve().parent.parent


def artifact_files(directory: Path) -> dict[str, object]:
    """Every file's bytes; the report without its timings, the index without the report's checksum."""
    files: dict[str, object] = {p.name: p.read_bytes() for p in sorted(directory.iterdir())}
    report = json.loads(files.pop(artifact.REPORT))
    report.pop("timings")
    index = json.loads(files.pop(artifact.INDEX))
    index["files"].pop(artifact.REPORT)
    index.pop("index_sha256")
    return files | {artifact.REPORT: report, artifact.INDEX: index}


def hidden_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    return save_pair(tmp_path_factory.mktemp("pair"), "llama")


@pytest.mark.parametrize("mode", ["lossless", "criterion"])
def test_same_inputs_give_byte_identical_artifacts(tmp_path, pair, mode):
    base, ft = pair
    for run in ("a", "b"):
        decompose(ft, base, DecomposedConfig(mode=mode, q=0.2), progress=False).save_pretrained(tmp_path / run)
    assert artifact_files(tmp_path / "a") == artifact_files(tmp_path / "b")
    assert (tmp_path / "a" / artifact.WEIGHTS).read_bytes() == (tmp_path / "b" / artifact.WEIGHTS).read_bytes()


def test_resumed_run_reuses_finished_layers_and_matches_a_fresh_run(tmp_path, pair, caplog):
    caplog.set_level(logging.INFO, logger="hf_decompose")
    base, ft = pair
    config = DecomposedConfig(mode="criterion", q=0.2)
    cache = tmp_path / ".out.partial"
    layers = len(decompose(ft, base, config, progress=False, resume_dir=cache).report["layers"])  # not saved: the cache stays
    assert len(list(cache.glob("0*.json"))) == layers == 4
    (cache / "00001.json").unlink()  # as if killed before this layer finished
    (cache / "00002.safetensors").write_bytes(b"damaged")  # a damaged entry is recomputed
    model = decompose(ft, base, config, progress=False, resume_dir=cache)
    assert f"resumed 2 of 4 layers from {cache}" in caplog.text
    model.save_pretrained(tmp_path / "resumed")
    assert not cache.exists(), "the cache is deleted once the artifact is saved"
    decompose(ft, base, config, progress=False).save_pretrained(tmp_path / "fresh")
    assert artifact_files(tmp_path / "resumed") == artifact_files(tmp_path / "fresh")


def test_cache_of_another_config_is_not_reused(tmp_path, pair, caplog):
    caplog.set_level(logging.INFO, logger="hf_decompose")
    base, ft = pair
    cache = tmp_path / "cache"
    decompose(ft, base, DecomposedConfig(mode="criterion", q=0.2), progress=False, resume_dir=cache)
    key = (cache / "manifest.json").read_text()
    model = decompose(ft, base, DecomposedConfig(mode="criterion", q=0.1), progress=False, resume_dir=cache)
    assert (cache / "manifest.json").read_text() != key and "resumed" not in caplog.text
    model.save_pretrained(tmp_path / "out")
    decompose(ft, base, DecomposedConfig(mode="criterion", q=0.1), progress=False).save_pretrained(tmp_path / "fresh")
    assert artifact_files(tmp_path / "out") == artifact_files(tmp_path / "fresh")


class _SigtermWhileSaving(TensorDelta):
    def state(self) -> dict[str, torch.Tensor]:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted by the handler's SystemExit
        raise AssertionError("SIGTERM did not interrupt the write")


def test_sigterm_during_save_removes_the_temporary_directory(tmp_path):
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("SIGTERM is handled by the test runner")
    deltas = {"w": TensorDelta("w", (2, 2), parts=[DensePart(torch.ones(2, 2))]), "x": _SigtermWhileSaving("x", (2,))}
    with pytest.raises(SystemExit), resume.sigterm_as_exit():
        artifact.save(tmp_path / "out", deltas, {"config": {}, "base_model": {"id": "b", "sha256": {}}}, {})
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert list(tmp_path.iterdir()) == []


def test_leftover_of_a_killed_write_never_loads_and_is_cleaned_up(tmp_path, pair):
    base, ft = pair
    model = decompose(ft, base, DecomposedConfig(), progress=False)
    model.save_pretrained(tmp_path / "complete")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / f".out.tmp-{dead.pid}-1a2b3c4d"  # what a SIGKILL during a save leaves
    shutil.copytree(tmp_path / "complete", leftover)
    (leftover / artifact.INCOMPLETE).touch()
    with pytest.raises(ArtifactError, match="incomplete artifact"):
        DecomposedModel.from_pretrained(leftover)
    model.save_pretrained(tmp_path / "out")
    assert hidden_leftovers(tmp_path) == []
    model.save_pretrained(tmp_path / "out", overwrite=True)  # replacing moves the old artifact aside, then deletes it
    assert hidden_leftovers(tmp_path) == [] and artifact_files(tmp_path / "out") == artifact_files(tmp_path / "complete")


def test_update_report_swaps_in_a_complete_artifact(tmp_path, pair):
    base, ft = pair
    decompose(ft, base, DecomposedConfig(), progress=False).save_pretrained(tmp_path / "out")
    before = (tmp_path / "out" / artifact.WEIGHTS).stat().st_ino
    artifact.update_report(tmp_path / "out", artifact.read_report(tmp_path / "out") | {"note": "verified"})
    assert artifact.read_report(tmp_path / "out")["note"] == "verified"
    assert (tmp_path / "out" / artifact.WEIGHTS).stat().st_ino == before  # hard-linked, not copied
    artifact.load(tmp_path / "out")
    assert hidden_leftovers(tmp_path) == []


def _long_pair(root: Path) -> tuple[Path, Path]:
    """A pair with many layers, so that a run can be killed between two of them."""
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=24,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "base")
    perturb(model).save_pretrained(root / "ft")
    return root / "base", root / "ft"


LONG_PAIR_LAYERS = 26  # 24 decoder layers, the embedding and the final norm


def _kill_mid_run(command: list[str], out: Path, cache: Path, attempts: int = 5) -> int:
    """Run the CLI and SIGKILL it once two layers are cached; return how many were. A run that ends
    before the kill must have left a complete artifact; it is deleted and the run retried."""
    for _ in range(attempts):
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not (cache / "00001.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        running = proc.poll() is None
        proc.kill()
        proc.wait()
        if running:
            assert proc.returncode == -signal.SIGKILL
            finished = len(list(cache.glob("0*.json")))
            assert not out.exists() and (cache / "manifest.json").exists(), "a killed run left a partial output"
            assert 2 <= finished < LONG_PAIR_LAYERS, f"killed after {finished} layers: not mid-run"
            return finished
        assert proc.returncode == 0 and not cache.exists(), f"the run ended on its own with {proc.returncode}"
        artifact.load(out)  # faster than the poll: the output must be complete
        shutil.rmtree(out)
    pytest.fail(f"the run finished before it could be killed, {attempts} times")


def test_killed_cli_run_leaves_output_absent_or_complete_and_resumes(tmp_path):
    base, ft = _long_pair(tmp_path)
    out, cache = tmp_path / "out", tmp_path / ".out.partial"
    command = [sys.executable, "-m", "hf_decompose", "decompose", str(base), str(ft), "--output", str(out)]
    finished = _kill_mid_run(command, out, cache)
    rerun = subprocess.run(command + ["--overwrite"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed {finished} of {LONG_PAIR_LAYERS} layers" in rerun.stderr
    DecomposedModel.from_pretrained(out)
    assert hidden_leftovers(tmp_path) == []
    decompose(ft, base, DecomposedConfig(), progress=False).save_pretrained(tmp_path / "fresh")
    assert artifact_files(out) == artifact_files(tmp_path / "fresh")
