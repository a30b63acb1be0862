"""Sharded artifacts: weights above `max_shard_size` in several files, loaded, saved and pushed like one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hf_decompose import ArtifactError, ConfigError, artifact, decompose_to_disk
from hf_decompose.checkpoints import sha256_files
from hf_decompose.cli import main as cli_main

from .hub_server import local_hub  # noqa: F401  (session fixture: the server, this process pointed at it)
from .synthetic import save_pair

LIMIT = 10_000  # bytes: the tiny pair's lossless deltas take ~60 kB, its embedding's 16 kB alone


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(fine-tune, one-file artifact, sharded artifact) of the same pair."""
    root = tmp_path_factory.mktemp("shards")
    base, ft = save_pair(root)
    one = decompose_to_disk(ft, base, output_dir=root / "one", progress=False)
    sharded = decompose_to_disk(ft, base, output_dir=root / "sharded", progress=False, max_shard_size=LIMIT)
    return ft, one, sharded


def _states(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: delta.state() for name, delta in artifact.load(directory)[1].items()}


def test_sharded_artifact_holds_the_same_deltas_in_files_under_the_limit(artifacts):
    _, one, sharded = artifacts
    index = artifact.read_index(sharded)
    names = index["weights"]
    assert len(names) >= 3 and index["format_version"] == 3 and artifact.read_index(one)["format_version"] == 2
    assert names == [f"decomposition-{i:05d}-of-{len(names):05d}.safetensors" for i in range(1, len(names) + 1)]
    assert not (sharded / artifact.WEIGHTS).exists() and set(names) <= set(index["files"])
    weight_map = json.loads((sharded / artifact.WEIGHTS_INDEX).read_text())["weight_map"]
    stored = {}
    for name in names:
        with safe_open(sharded / name, framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        stored |= dict.fromkeys(tensors, name)
        entries = {entry for entry in index["tensors"] if any(key.startswith(entry + ".") for key in tensors)}
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= LIMIT or len(entries) == 1  # a larger entry alone
    assert weight_map == stored
    first, second = _states(one), _states(sharded)
    assert first.keys() == second.keys()
    for name, state in first.items():
        assert state.keys() == second[name].keys() and all(torch.equal(state[k], second[name][k]) for k in state), name
    report = artifact.read_report(sharded)
    assert report["size_bytes"]["artifact"] == sum((sharded / n).stat().st_size for n in names)


def test_sharded_artifact_loads_with_transformers_and_saves_in_one_file_again(artifacts, tmp_path):
    ft, one, sharded = artifacts
    assert json.loads((sharded / "config.json").read_text())["transformers_weights"] == artifact.SHARDS_WITHOUT_PLUGIN
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(sharded)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, AutoModelForCausalLM.from_pretrained(ft)(ids).logits)
    again = model.save_pretrained(tmp_path / "again", max_shard_size="50GB")
    assert artifact.read_index(again)["weights"] == [artifact.WEIGHTS] and not (again / artifact.WEIGHTS_INDEX).exists()
    assert json.loads((again / "config.json").read_text())["transformers_weights"] == artifact.WEIGHTS_WITHOUT_PLUGIN
    assert _states(again).keys() == _states(one).keys()
    resharded = AutoModelForCausalLM.from_pretrained(one).save_pretrained(tmp_path / "resharded", max_shard_size=LIMIT)
    assert artifact.read_index(resharded)["weights"] == artifact.read_index(sharded)["weights"]


def _rewrite_index(directory: Path, change) -> None:
    index = json.loads((directory / artifact.INDEX).read_text())
    change(index)
    artifact._write_index(directory, index)


def test_a_shard_missing_or_stored_twice_is_refused(artifacts, tmp_path):
    _, _, sharded = artifacts
    names = artifact.read_index(sharded)["weights"]

    def copy(name: str) -> Path:
        target = tmp_path / name
        target.mkdir()
        for file in sharded.iterdir():
            (target / file.name).write_bytes(file.read_bytes())
        return target

    missing = copy("missing")
    (missing / names[1]).unlink()
    with pytest.raises(ArtifactError, match=f"file {names[1]} listed in .* is missing"):
        artifact.load(missing)

    dropped = copy("dropped")  # a shard left out of `weights` (checksums redone): its entries lack their parts
    _rewrite_index(dropped, lambda index: index["weights"].remove(names[1]))
    with pytest.raises(ArtifactError, match=f"the shards do not hold the tensors {re.escape(artifact.WEIGHTS_INDEX)} maps"):
        artifact.load(dropped)

    twice = copy("twice")  # a shard listed twice under two names: every key of it stored twice
    (twice / "decomposition-extra.safetensors").write_bytes((twice / names[0]).read_bytes())

    def add(index: dict) -> None:
        index["weights"].append("decomposition-extra.safetensors")
        index["files"] |= sha256_files([twice / "decomposition-extra.safetensors"])

    _rewrite_index(twice, add)
    with pytest.raises(ArtifactError, match=rf"decomposition-extra.safetensors: tensor .* is stored in {re.escape(names[0])} too"):
        artifact.load(twice)

    older = copy("older")  # shards under format 2, which has none: refused, not read as one file
    _rewrite_index(older, lambda index: index.update(format_version=2))
    with pytest.raises(ArtifactError, match="field 'weights' is malformed"):
        artifact.read_index(older)


def test_bad_shard_sizes_fail_before_anything_is_written(artifacts, tmp_path):
    ft, _, _ = artifacts
    for size in ("5 potatoes", 0, -3, "GB"):
        with pytest.raises(ConfigError, match="max_shard_size=.* is no size"):
            decompose_to_disk(ft, ft.parent / "base", output_dir=tmp_path / "out", progress=False, max_shard_size=size)
    assert cli_main(["decompose", str(ft.parent / "base"), str(ft), "--output", str(tmp_path / "cli"), "--max-shard-size", "lots"]) != 0
    assert not (tmp_path / "out").exists() and not (tmp_path / "cli").exists()


def test_sharded_push_and_load_through_the_hub(artifacts, local_hub, tmp_path):  # noqa: F811
    ft, one, _ = artifacts
    model = AutoModelForCausalLM.from_pretrained(one)
    model.push_to_hub("acme/sharded-dec", max_shard_size=LIMIT)
    files = HfApi().list_repo_files("acme/sharded-dec")
    assert artifact.WEIGHTS_INDEX in files and artifact.WEIGHTS not in files
    assert sum(bool(re.fullmatch(r"decomposition-\d{5}-of-\d{5}\.safetensors", f)) for f in files) >= 3
    loaded = AutoModelForCausalLM.from_pretrained("acme/sharded-dec", cache_dir=tmp_path / "fresh")
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, AutoModelForCausalLM.from_pretrained(ft)(ids).logits)
