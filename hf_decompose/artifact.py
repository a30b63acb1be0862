"""The decomposed artifact on disk: substructures (safetensors), an index with checksums, the report.

Layout of an artifact directory::

    decomposed_config.json      format version, DecomposedConfig, base (id, revision, SHA-256 of
                                its weight files), per-tensor shapes, SHA-256 of every file here
    decomposition.safetensors   the kept deltas, per tensor its parts (`hf_decompose.parts`): <tensor>.dense |
                                .block.<i>.* | .sparse.* | .override.* | .lowrank.u/.v | .quant.codes (or .codes_huffman)/.scales
    decomposition.json          the report (kept fraction, sizes, equivalence, layers, timings)
    config.json, tokenizer ...  the fine-tune's config and tokenizer (small), so the artifact loads alone;
                                config.json carries the `quantization_config` (quant_method
                                "hf_decompose") that lets transformers load it (`hf_decompose.quantizer`)
    README.md                   the model card (`hf_decompose.card`), not checksummed

Writes are atomic: everything goes to a hidden temporary sibling directory, marked incomplete
until it is renamed into place; the index checksums itself too. The weights file is written tensor by
tensor (`tensorfile`), so deltas can arrive a layer at a time (`writing`) and never be held twice. A temporary directory left by a
killed process never loads and is removed by the next write once its process is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import locks
from .checkpoints import contained, sha256_files
from .errors import ArtifactError
from .parts import TensorDelta
from .tensorfile import SafetensorsWriter, header_reserve

FORMAT_VERSION = 2  # 2: low-bit codes may be Huffman-coded (`.quant.codes_huffman`), unknown to readers of 1; 1 is read too
INDEX = "decomposed_config.json"
WEIGHTS = "decomposition.safetensors"
REPORT = "decomposition.json"
CARD = "README.md"
# config.json's `transformers_weights`: not a file name, so that transformers without the plugin stops
# with this text instead of loading random weights; the plugin's hook puts `WEIGHTS` back before files resolve.
WEIGHTS_WITHOUT_PLUGIN = "decomposition (an hf_decompose artifact: `pip install hf-decompose` and `import hf_decompose` to load it)"
INCOMPLETE = ".incomplete"  # present while a directory is being written
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def save(
    directory: str | Path,
    deltas: dict[str, TensorDelta],
    index: dict,
    report: dict,
    side_files_from: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an artifact atomically; replace an existing artifact only if `overwrite` (see `check_target`)."""
    with writing(directory, list(deltas), overwrite) as writer:
        writer.add(deltas)
        writer.finish(index, report, side_files_from)
    return writer.target


@contextlib.contextmanager
def writing(directory: str | Path, names: list[str], overwrite: bool = False) -> Iterator[ArtifactWriter]:
    """An `ArtifactWriter` into a staged copy of `directory`, published atomically once the block ends
    after `ArtifactWriter.finish`; an exception, or no `finish`, leaves `directory` as it was."""
    with locks.owning(directory):
        target = check_target(directory, overwrite)
        with _staged(target, overwrite) as tmp:
            writer = ArtifactWriter(target, tmp, names)
            try:
                yield writer
            except BaseException:
                writer.weights.abort()
                raise
            if not writer.finished:
                raise ArtifactError(f"{target}: the artifact was not finished")


class ArtifactWriter:
    """Writes the kept deltas of the tensors `names` as they come (a layer at a time), then the rest of the
    artifact. The weights file is the same bytes whether deltas come all at once or layer by layer."""

    def __init__(self, target: Path, tmp: Path, names: list[str]):
        self.target, self.tmp = target, tmp
        self.weights = SafetensorsWriter(tmp / WEIGHTS, header_reserve(names))
        self.tensors: dict[str, dict] = {}
        self.finished = False

    def add(self, deltas: dict[str, TensorDelta]) -> None:
        for name, delta in deltas.items():
            for key, tensor in delta.state().items():
                self.weights.add(key, tensor)
            self.tensors[name] = {"shape": list(delta.shape), "transposed": delta.transposed}

    def finish(self, index: dict, report: dict, side_files_from: Path | None = None) -> None:
        """Complete the weights file; add the report, side files, index (with every file's SHA-256) and card."""
        tmp = self.tmp
        self.weights.close()
        report = dict(report, size_bytes=dict(report.get("size_bytes", {}), artifact=(tmp / WEIGHTS).stat().st_size))
        report = json.loads(json.dumps(report, sort_keys=True, default=_jsonable))  # as read back: the card renders alike
        if side_files_from is not None:  # before the flush below starts: files written during it wait for it
            for name in SIDE_FILES:
                if (side_files_from / name).exists():
                    shutil.copy2(side_files_from / name, tmp / name)
        _add_quantization_config(tmp, index)
        (tmp / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True, default=_jsonable))
        flushed = threading.Thread(target=_fsync, args=(tmp / WEIGHTS,), name="hf_decompose-fsync")
        flushed.start()  # the largest file goes to disk while the files are hashed (publishing flushes all of them)
        files = sorted(p for p in tmp.iterdir() if p.is_file() and p.name != INCOMPLETE)
        index = dict(index, format_version=FORMAT_VERSION, files=sha256_files(files), tensors=self.tensors)
        _write_index(tmp, index)
        _write_card(tmp, index, report, side_files_from)
        flushed.join()
        self.finished = True


def check_target(directory: str | Path, overwrite: bool = False) -> Path:
    """Raise `ArtifactError` unless `directory` is absent, empty, or an artifact and `overwrite` is set,
    and its parent (or the nearest existing ancestor) is a directory this process can write."""
    target = Path(directory)
    try:
        _check_writable(target)
        exists, is_dir = target.exists(), target.is_dir()
        full = is_dir and any(target.iterdir())
    except OSError as err:
        raise ArtifactError(f"cannot write the artifact {target}: {err}") from err
    if exists and not is_dir:
        raise ArtifactError(f"{target} exists and is not a directory")
    if full:
        if not (target / INDEX).is_file():
            raise ArtifactError(f"{target} is not empty and holds no hf_decompose artifact: refusing to write over it")
        if not overwrite:
            raise ArtifactError(f"{target} already holds an artifact (pass overwrite=True or --overwrite to replace it)")
    return target


def _check_writable(target: Path) -> None:
    """Raise `OSError` unless the nearest existing ancestor of `target` is a directory we may write and enter."""
    ancestor = target.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"{ancestor} cannot be entered or written (permission denied)")


@contextlib.contextmanager
def _staged(target: Path, overwrite: bool = True) -> Iterator[Path]:
    """A temporary directory to write `target` into: renamed into place on success (over an existing
    artifact only if `overwrite`), else deleted."""
    tmp = _tempdir(target)
    try:
        yield tmp
        _publish(tmp, target, overwrite)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(f"cannot write the artifact {target}: {err}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _tempdir(target: Path) -> Path:
    """A hidden, incomplete-marked sibling of `target` to write into; stale ones of dead processes are removed."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{target.name}.*-*-*"):
            match = re.fullmatch(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)-\w+", stale.name)
            if match and not _alive(int(match.group(2))):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()  # not mkdtemp: the artifact gets the usual permissions
        (tmp / INCOMPLETE).touch()
    except OSError as err:
        raise ArtifactError(f"cannot write the artifact {target}: {err}") from err
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _publish(tmp: Path, target: Path, overwrite: bool) -> None:
    """Flush `tmp` to disk, unmark it and rename it into place; an artifact it replaces (only if
    `overwrite`: one may have appeared since `check_target`) is moved aside first."""
    if not overwrite:
        check_target(target)
    for path in [*tmp.iterdir(), tmp]:
        _fsync(path)
    (tmp / INCOMPLETE).unlink()
    old = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(index: dict) -> str:
    """SHA-256 of the index's content, its own checksum field left out."""
    body = {k: v for k, v in index.items() if k != "index_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_index(directory: Path, index: dict) -> None:
    index = dict(index, index_sha256=_digest(index))
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))


def read_index(directory: str | Path) -> dict:
    """Read and validate the index: format version, its own checksum and that of every listed file."""
    directory = Path(directory)
    path = directory / INDEX
    if (directory / INCOMPLETE).exists():
        raise ArtifactError(f"{directory}: an incomplete artifact (its write was interrupted); delete it and decompose again")
    try:
        index = json.loads(contained(directory, INDEX, ArtifactError).read_text())
    except FileNotFoundError as err:
        raise ArtifactError(f"{directory}: not a decomposed artifact (no {INDEX})") from err
    except (OSError, ValueError, RecursionError) as err:
        raise ArtifactError(f"{path}: unreadable or invalid JSON ({err})") from err
    version = index.get("format_version") if isinstance(index, dict) else None
    if type(version) is not int or version < 1:
        raise ArtifactError(f"{path}: no valid format_version ({version!r})")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {version} is newer than this hf_decompose reads ({FORMAT_VERSION}); upgrade hf-decompose")
    if index.get("index_sha256") != _digest(index):
        raise ArtifactError(f"{path}: checksum mismatch (corrupted or modified index)")
    for key in ("files", "tensors", "config", "base_model"):
        if not isinstance(index.get(key), dict):
            raise ArtifactError(f"{path}: field {key!r} is missing or malformed")
    base, digests = index["base_model"], index["base_model"].get("sha256")
    if not isinstance(base.get("id"), str) or not isinstance(digests, dict) or not digests or not all(isinstance(v, str) for v in digests.values()):
        raise ArtifactError(f"{path}: field 'base_model' lacks its id or sha256")
    if WEIGHTS not in index["files"]:
        raise ArtifactError(f"{path}: {WEIGHTS} is not listed in 'files'")
    for name, digest in index["files"].items():
        if name in ("", ".", "..") or Path(name).name != name or not isinstance(digest, str):
            raise ArtifactError(f"{path}: malformed entry {name!r} in 'files'")
        file = contained(directory, name, ArtifactError)
        if not file.is_file():
            raise ArtifactError(f"{directory}: file {name} listed in {INDEX} is missing")
        if sha256_files([file])[name] != digest:
            raise ArtifactError(f"{file}: checksum mismatch (corrupted or modified file)")
    return index


def load(directory: str | Path) -> tuple[dict, dict[str, TensorDelta]]:
    """Read an artifact: its index and the per-tensor deltas, checksums and shapes verified."""
    index = read_index(directory)
    reader = DeltaReader(directory, index)
    deltas = dict(reader.items())
    reader.check_all_used()
    return index, deltas


class DeltaReader(Mapping):
    """The deltas of a checked artifact (`read_index`), read one tensor at a time: a caller that puts each
    into a model and drops it never holds more than one."""

    def __init__(self, directory: str | Path, index: dict):
        self.path, self.index = Path(directory) / WEIGHTS, index
        try:
            with safe_open(self.path, framework="pt") as handle:
                self._keys = set(handle.keys())
        except (SafetensorError, OSError) as err:
            raise ArtifactError(f"{self.path}: unreadable ({err})") from err
        self._used: set[str] = set()

    def __getitem__(self, name: str) -> TensorDelta:
        meta = self.index["tensors"][name]
        try:
            shape, transposed = meta["shape"], meta["transposed"]
            if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape) or not isinstance(transposed, bool):
                raise ValueError(f"shape {shape!r}, transposed {transposed!r}")
            with safe_open(self.path, framework="pt") as handle:  # mapped for this entry only: its pages do not stay resident
                delta = TensorDelta.from_state(name, tuple(shape), transposed, _Tensors(self, handle, name))  # checks each part
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, SafetensorError, OSError) as err:
            raise ArtifactError(f"{self.path.parent}: entry for tensor {name!r} is malformed ({err})") from err
        return delta

    def __iter__(self) -> Iterator[str]:
        return iter(self.index["tensors"])

    def __len__(self) -> int:
        return len(self.index["tensors"])

    def check_all_used(self) -> None:
        """After every entry was read: refuse a tensor of the file that no entry owns."""
        stray = sorted(self._keys - self._used)
        if stray:
            raise ArtifactError(f"{self.path}: tensor {stray[0]!r} belongs to no entry of {INDEX}")


class _Tensors:
    """The stored parts of one entry, read on request (what `TensorDelta.from_state` asks for)."""

    def __init__(self, reader: DeltaReader, handle, name: str):
        self.reader, self.handle, self.prefix = reader, handle, f"{name}."

    def get(self, key: str) -> torch.Tensor | None:
        if key not in self.reader._keys or not key.startswith(self.prefix):
            return None
        self.reader._used.add(key)
        return self.handle.get_tensor(key)


def read_report(directory: str | Path) -> dict:
    path = Path(directory) / REPORT
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise ArtifactError(f"{path}: unreadable report ({err})") from err
    if not isinstance(report, dict):
        raise ArtifactError(f"{path}: the report is not a JSON object")
    return report


def update_report(directory: str | Path, report: dict) -> None:
    """Replace the report and its checksum, atomically (see `copy`)."""
    copy(directory, directory, report, overwrite=True)


def copy(source: str | Path, target: str | Path, report: dict, overwrite: bool = False) -> Path:
    """Write the artifact `source` (checked) to `target` with `report` as its report, atomically: a staged
    copy (other files hard-linked where possible) is swapped in; `target` may be `source` itself."""
    source, target = Path(source), Path(target)
    with locks.owning(target):
        index = read_index(source)
        if target != source:
            check_target(target, overwrite)
        with _staged(target, overwrite) as tmp:
            for file in source.iterdir():
                if file.is_file() and file.name not in (REPORT, INDEX, CARD) and file.name in index["files"]:
                    try:
                        os.link(file, tmp / file.name)
                    except OSError:
                        shutil.copy2(file, tmp / file.name)
            (tmp / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True, default=_jsonable))
            index["files"][REPORT] = sha256_files([tmp / REPORT])[REPORT]
            _write_index(tmp, index)
            _write_card(tmp, index, report, source)
    return target


def _add_quantization_config(directory: Path, index: dict) -> None:
    """Make the copied config.json load with transformers (after ``import hf_decompose``): its
    ``quantization_config`` is the DecomposedConfig with the base pinned, its weights the decomposition."""
    from .config import QUANT_METHOD

    path = directory / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    base = index["base_model"]
    config["quantization_config"] = dict(index["config"], quant_method=QUANT_METHOD, base_model=base["id"], base_revision=base.get("revision"))
    config["transformers_weights"] = WEIGHTS_WITHOUT_PLUGIN
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_card(directory: Path, index: dict, report: dict, source: Path | None) -> None:
    """README.md, the model card; not checksummed, so it can be edited on the Hub."""
    from .card import render_card

    text = render_card(index, report, source)
    (directory / CARD).unlink(missing_ok=True)  # may be a hard link to the previous card
    (directory / CARD).write_text(text)


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
