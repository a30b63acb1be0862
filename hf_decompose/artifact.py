"""The decomposed artifact on disk: substructures (safetensors), an index with checksums, the report.

Layout of an artifact directory::

    decomposed_config.json      format version, DecomposedConfig, base (id, revision, SHA-256 of
                                its weight files), per-tensor shapes, SHA-256 of every file here
    decomposition.safetensors   the kept deltas: <tensor>.dense | .block.<i>.* | .sparse.* |
                                .lowrank.u/.v | .override.*
    decomposition.json          the report (kept fraction, sizes, equivalence, layers, timings)
    config.json, tokenizer ...  the fine-tune's config and tokenizer (small), so the artifact loads alone

Writes are atomic: everything goes to a temporary sibling directory renamed into place at the end.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoints import sha256_files
from .errors import ArtifactError
from .substructures import TensorDelta

FORMAT_VERSION = 1
INDEX = "decomposed_config.json"
WEIGHTS = "decomposition.safetensors"
REPORT = "decomposition.json"
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def save(
    directory: str | Path,
    deltas: dict[str, TensorDelta],
    index: dict,
    report: dict,
    side_files_from: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an artifact atomically; refuse to replace a non-empty directory unless `overwrite`."""
    target = Path(directory)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ArtifactError(f"{target} already exists and is not empty (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tensors: dict[str, torch.Tensor] = {}
        for delta in deltas.values():
            tensors.update(delta.state())
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt", "hf_decompose_format": str(FORMAT_VERSION)})
        report = dict(report, size_bytes=dict(report.get("size_bytes", {}), artifact=(tmp / WEIGHTS).stat().st_size))
        if side_files_from is not None:
            for name in SIDE_FILES:
                if (side_files_from / name).exists():
                    shutil.copy2(side_files_from / name, tmp / name)
        (tmp / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True, default=_jsonable))
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        index = dict(index, format_version=FORMAT_VERSION, files=sha256_files(files))
        index["tensors"] = {n: {"shape": list(d.shape), "transposed": d.transposed} for n, d in deltas.items()}
        (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_index(directory: str | Path) -> dict:
    """Read and validate the index: format version and the checksum of every listed file."""
    directory = Path(directory)
    path = directory / INDEX
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ArtifactError(f"{directory}: not a decomposed artifact (no {INDEX})") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(index, dict) or not isinstance(index.get("files"), dict) or not isinstance(index.get("tensors"), dict):
        raise ArtifactError(f"{path}: missing 'files' or 'tensors'")
    version = index.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {version!r} is newer than this hf_decompose reads ({FORMAT_VERSION}); upgrade hf-decompose")
    for name, digest in index["files"].items():
        file = directory / name
        if not file.is_file():
            raise ArtifactError(f"{directory}: file {name} listed in {INDEX} is missing")
        if sha256_files([file])[name] != digest:
            raise ArtifactError(f"{file}: checksum mismatch (corrupted or modified file)")
    return index


def load(directory: str | Path) -> tuple[dict, dict[str, TensorDelta]]:
    """Read an artifact: its index and the per-tensor deltas, checksums verified."""
    directory = Path(directory)
    index = read_index(directory)
    try:
        tensors = load_file(directory / WEIGHTS)
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"{directory / WEIGHTS}: unreadable ({err})") from err
    deltas = {}
    for name, meta in index["tensors"].items():
        try:
            deltas[name] = TensorDelta.from_state(name, tuple(meta["shape"]), bool(meta["transposed"]), tensors)
        except (KeyError, TypeError, AttributeError) as err:
            raise ArtifactError(f"{directory}: entry for tensor {name!r} is malformed ({err})") from err
    return index, deltas


def read_report(directory: str | Path) -> dict:
    return json.loads((Path(directory) / REPORT).read_text())


def update_report(directory: str | Path, report: dict) -> None:
    """Rewrite the report and its checksum in the index (the weights are untouched)."""
    directory = Path(directory)
    index = read_index(directory)
    (directory / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True, default=_jsonable))
    index["files"][REPORT] = sha256_files([directory / REPORT])[REPORT]
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
