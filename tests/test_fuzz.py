"""Fuzzing the artifact loader and the config parser: random corruptions fail with the project's own
error types (`DecomposeError` subclasses), never with anything else, and never load silently; what
does load keeps every promise of a successful load (`_loads_or_refuses`)."""

from __future__ import annotations

import copy
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hf_decompose import ConfigError, DecomposedConfig, DecomposedModel, DecomposeError, decompose
from hf_decompose.artifact import CARD, INDEX, WEIGHTS, _digest, load
from hf_decompose.checkpoints import sha256_files

from .synthetic import save_pair

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IDS = torch.tensor([[1, 5, 9, 2, 77, 3]])
VOCAB = 128  # tests.synthetic's models


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    """A tiny artifact with every kind of part (dense, blocks, sparse, low-rank, overrides), made once."""
    root = tmp_path_factory.mktemp("fuzz")
    base, ft = save_pair(root, "llama", scale=2e-3)
    decompose(ft, base, DecomposedConfig(mode="criterion", q=0.3), progress=False).save_pretrained(root / "artifact")
    return root / "artifact"


@pytest.fixture(scope="module")
def workdir(original, tmp_path_factory) -> Path:
    """A copy of the artifact that each example spoils and `_restore` repairs."""
    return Path(shutil.copytree(original, tmp_path_factory.mktemp("work") / "artifact"))


def _restore(work: Path, original: Path, *names: str) -> None:
    for name in names:
        shutil.copy2(original / name, work / name)


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for pos, byte in edits:
        out[pos % len(out)] = byte
    return bytes(out[: cut % len(out)] if cut is not None else out)


EDITS = st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=4)
CUT = st.none() | st.integers(0, 2**31)


def _loads_or_refuses(directory: Path) -> bool:
    """Load the artifact as a user does: refused with a project error (False), or loaded (True)
    keeping every promise of a load: one delta per index entry, of the recorded shape, finite, and
    a model whose forward pass gives finite logits over the vocabulary."""
    try:
        index, deltas = load(directory)
        model = DecomposedModel.from_pretrained(directory)
    except DecomposeError:
        return False
    assert deltas.keys() == index["tensors"].keys() and len(deltas) > 0
    for name, delta in deltas.items():
        dense = delta.to_dense()
        assert list(dense.shape) == index["tensors"][name]["shape"] and torch.isfinite(dense).all(), name
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    assert logits.shape == (*IDS.shape, VOCAB) and torch.isfinite(logits).all()
    return True


def _resign(work: Path, index: dict) -> None:
    """Make the index agree with the weights as they now are: a consistent but forged artifact."""
    index["files"] |= sha256_files([work / WEIGHTS])
    index["index_sha256"] = _digest(index)
    (work / INDEX).write_text(json.dumps(index))


def test_any_corrupted_byte_is_detected(original, workdir):
    names = sorted(p.name for p in original.iterdir() if p.name != CARD)  # the model card is not checksummed
    assert WEIGHTS in names and INDEX in names and "config.json" in names

    @FUZZ
    @given(name=st.sampled_from(names), edits=EDITS, cut=CUT)
    def check(name, edits, cut):
        data = (original / name).read_bytes()
        spoiled = _mutate(data, edits, cut)
        if name == INDEX:  # a change the JSON parser cannot see (whitespace) is no corruption
            try:
                assume(json.loads(spoiled) != json.loads(data))
            except ValueError:
                pass
        assume(spoiled != data)
        (workdir / name).write_bytes(spoiled)
        try:
            with pytest.raises(DecomposeError):
                DecomposedModel.from_pretrained(workdir)
        finally:
            _restore(workdir, original, name)

    check()


def _header_span(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def test_forged_safetensors_headers_fail_cleanly(original, workdir):
    """Header corruptions with the checksums recomputed: the parser and the structure checks must
    reject them with an `ArtifactError` (or load parts that fit their shapes)."""
    data = (original / WEIGHTS).read_bytes()
    span = _header_span(data)
    index = json.loads((original / INDEX).read_text())

    @FUZZ
    @given(edits=st.lists(st.tuples(st.integers(0, span - 1), st.integers(0, 255)), min_size=1, max_size=4), cut=st.none() | st.integers(0, span))
    def check(edits, cut):
        spoiled = _mutate(data, edits, None)
        spoiled = spoiled[:cut] + spoiled[span:] if cut is not None else spoiled  # also: header cut short
        (workdir / WEIGHTS).write_bytes(spoiled)
        _resign(workdir, copy.deepcopy(index))
        try:
            _loads_or_refuses(workdir)
        finally:
            _restore(workdir, original, WEIGHTS, INDEX)

    check()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


def _paths(tree, prefix=()):
    """Every (path, node) of a JSON tree."""
    yield prefix, tree
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, child in items:
        yield from _paths(child, prefix + (key,))


def test_index_edits_are_rejected_or_harmless(original, workdir):
    """Structural edits of the index: without re-signing always rejected; re-signed, rejected with
    a project error or loaded consistently."""
    index = json.loads((original / INDEX).read_text())
    paths = [p for p, _ in _paths(index) if p and p[0] != "index_sha256"]

    @FUZZ
    @given(path=st.sampled_from(paths), value=JSON, delete=st.booleans(), resign=st.booleans())
    def check(path, value, delete, resign):
        edited = copy.deepcopy(index)
        parent = edited
        for key in path[:-1]:
            parent = parent[key]
        if delete and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        assume(edited != index)
        if resign:
            edited["index_sha256"] = _digest(edited)
        (workdir / INDEX).write_text(json.dumps(edited))
        try:
            if not resign:
                with pytest.raises(DecomposeError):
                    load(workdir)
            else:
                if _loads_or_refuses(workdir):
                    assert _valid(DecomposedConfig.from_dict(edited["config"]))
        finally:
            _restore(workdir, original, INDEX)

    check()


@pytest.mark.parametrize("edit", ["shape", "transposed"])
def test_forged_tensor_geometry_is_refused_when_the_model_is_built(original, workdir, edit):
    """A re-signed index whose tensor fits its stored parts but not the model: refused on load, not
    a RuntimeError at the first forward pass (found by the fuzzer above)."""
    index = json.loads((original / INDEX).read_text())
    name = "model.layers.0.self_attn.v_proj.weight"  # (16, 32)
    if edit == "shape":
        index["tensors"][name]["shape"][0] = 13
    else:
        index["tensors"][name]["transposed"] = True
    index["index_sha256"] = _digest(index)
    (workdir / INDEX).write_text(json.dumps(index))
    try:
        assert not _loads_or_refuses(workdir)
    finally:
        _restore(workdir, original, INDEX)


FIELDS = [f for f in DecomposedConfig().to_dict()]
VALUES = JSON | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(["lossless", "criterion", "reference", "init", "bh", "merged", "split"])


def _valid(config: DecomposedConfig) -> bool:
    c = config
    return (
        type(c.q) in (int, float) and 0 < c.q < 1 and type(c.max_rank) is int and c.max_rank >= 0 and type(c.seed) is int
        and type(c.dense_block_density) in (int, float) and 0 <= c.dense_block_density <= 1 and isinstance(c.annealing, dict)
        and all(type(v) is bool for v in (c.entry_test, c.group_test, c.spectral_test))
        and c.mode in ("lossless", "criterion", "anneal") and c.execution in ("merged", "split")
    )  # fmt: skip


@FUZZ
@given(data=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), VALUES, max_size=6))
def test_config_from_dict_accepts_valid_or_raises_config_error(data):
    try:
        config = DecomposedConfig.from_dict(data)
    except ConfigError:
        return
    assert _valid(config)
    assert json.dumps(DecomposedConfig.from_dict(config.to_dict()).to_dict()) == json.dumps(config.to_dict())


@FUZZ
@given(
    data=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=5),
    edits=st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), max_size=3),
    wrap=st.booleans(),
)
def test_config_from_yaml_accepts_valid_or_raises_config_error(tmp_path_factory, data, edits, wrap):
    text = yaml.safe_dump({"decomposition": data} if wrap else data).encode()
    path = tmp_path_factory.getbasetemp() / "fuzz_recipe.yaml"
    path.write_bytes(_mutate(text, edits, None) if edits else text)
    try:
        config = DecomposedConfig.from_yaml(path)
    except ConfigError:
        return
    assert _valid(config)
