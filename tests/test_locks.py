"""One run per output: a second run at an output (or layer cache) in use fails at once naming the
holder, a finished output is never replaced without --overwrite, and a layer cache entry is reused
only by a run of the same configuration and inputs. Whatever the interleaving, the output is one run's
artifact, never a mix."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_decompose import ArtifactError, DecomposedConfig, decompose, locks

from .test_reliability import ROOT, _long_pair, artifact_files, hidden_leftovers


@pytest.fixture(scope="module")
def long_pair(tmp_path_factory) -> tuple[Path, Path]:
    return _long_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def fresh(long_pair, tmp_path_factory) -> dict[str, Path]:
    """Artifacts of each mode written alone, to compare with."""
    base, ft = long_pair
    root = tmp_path_factory.mktemp("fresh")
    for mode in ("lossless", "criterion"):
        decompose(ft, base, DecomposedConfig(mode=mode), progress=False).save_pretrained(root / mode)
    return {mode: root / mode for mode in ("lossless", "criterion")}


def _command(long_pair, out: Path, mode: str, *extra: str) -> list[str]:
    base, ft = long_pair
    return [sys.executable, "-m", "hf_decompose", "decompose", str(base), str(ft), "--output", str(out), "--mode", mode, *extra]


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the first run ended before the second started"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("first, second", [("lossless", "criterion"), ("criterion", "lossless"), ("lossless", "lossless")])
def test_second_run_at_an_output_in_use_fails_at_once_and_the_first_wins(tmp_path, long_pair, fresh, first, second):
    out, cache = tmp_path / "out", tmp_path / ".out.partial"
    proc = subprocess.Popen(_command(long_pair, out, first), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (cache / "00001.json").exists() and locks.holder(out).get("pid") == proc.pid, proc)
        os.kill(proc.pid, signal.SIGSTOP)  # the first run is held mid-way (it owns the output and its cache)
        held = sorted(p.name for p in cache.iterdir())
        t0 = time.monotonic()
        rival = subprocess.run(_command(long_pair, out, second, "--overwrite"), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert rival.returncode == 2, rival.stdout + rival.stderr
        assert f"this output is in use by another run (pid {proc.pid} on " in rival.stdout, rival.stdout
        assert "decompose" in rival.stdout.split("started", 1)[1]  # the holder's command line
        assert "decomposing" not in rival.stderr and time.monotonic() - t0 < 60  # refused before any work
        assert sorted(p.name for p in cache.iterdir()) == held and not out.exists()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert artifact_files(out) == artifact_files(fresh[first])
    assert hidden_leftovers(tmp_path) == []


def test_identical_run_without_overwrite_never_replaces_a_finished_output(tmp_path, long_pair, fresh):
    out = tmp_path / "out"
    subprocess.run(_command(long_pair, out, "lossless"), cwd=ROOT, check=True, capture_output=True, timeout=300)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = subprocess.run(_command(long_pair, out, "lossless"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds an artifact" in again.stdout, again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert artifact_files(out) == artifact_files(fresh["lossless"]) and hidden_leftovers(tmp_path) == []


def test_an_output_published_meanwhile_is_not_replaced(tmp_path, long_pair, fresh):
    """The target is checked again at publication: an artifact that appeared during the run stays."""
    base, ft = long_pair
    model = decompose(ft, base, DecomposedConfig(mode="criterion"), progress=False)
    from hf_decompose import artifact

    with pytest.raises(ArtifactError, match="already holds an artifact"):
        deltas = model.deltas
        with artifact.writing(tmp_path / "out", list(deltas)) as writer:
            writer.add(deltas)
            writer.finish(model.decomposition.index, model.report, model.decomposition.artifact_dir)
            model.save_pretrained(tmp_path / "out")  # another writer of this process finishes first
    assert artifact_files(tmp_path / "out") == artifact_files(fresh["criterion"]) and hidden_leftovers(tmp_path) == []


HOLD = """
import sys, time
from hf_decompose import locks
with locks.owning(sys.argv[1], "layer cache"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_layer_cache_in_use_is_refused_naming_its_holder_and_freed_when_it_dies(tmp_path, long_pair):
    base, ft = long_pair
    cache = tmp_path / "cache"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(cache)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ArtifactError, match=rf"cache: this layer cache is in use by another run \(pid {holder.pid} on .*-c"):
            decompose(ft, base, DecomposedConfig(mode="lossless"), progress=False, resume_dir=cache)
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        holder.wait()
    assert locks.holder(cache)["pid"] == holder.pid  # its lock file is left behind, and does not block
    decompose(ft, base, DecomposedConfig(mode="lossless"), progress=False, resume_dir=cache)
    assert not locks.lock_file(cache).exists()  # released and removed by the run that took it over


def test_cache_entries_of_another_configuration_are_never_reused(tmp_path, long_pair, fresh, caplog):
    """What poisoned a lossless run: a criterion run's entries under a lossless run's manifest."""
    caplog.set_level(logging.INFO, logger="hf_decompose")
    base, ft = long_pair
    cache = tmp_path / "cache"
    decompose(ft, base, DecomposedConfig(mode="lossless"), progress=False, resume_dir=cache)  # writes the lossless manifest
    manifest = (cache / "manifest.json").read_text()
    decompose(ft, base, DecomposedConfig(mode="criterion"), progress=False, resume_dir=cache)  # its entries, ...
    (cache / "manifest.json").write_text(manifest)  # ... under the lossless key, as a concurrent run left them
    assert json.loads(manifest)["record"]["config"]["mode"] == "lossless"
    model = decompose(ft, base, DecomposedConfig(mode="lossless"), progress=False, resume_dir=cache)
    assert "resumed" not in caplog.text
    model.save_pretrained(tmp_path / "out")
    assert artifact_files(tmp_path / "out") == artifact_files(fresh["lossless"])
