"""The decomposed artifact on disk: substructures (safetensors), an index with checksums, the report.

Layout of an artifact directory::

    decomposed_config.json      format version, DecomposedConfig, base (id, revision, SHA-256 of
                                its weight files), per-tensor shapes, SHA-256 of every file here
    decomposition.safetensors   the kept deltas, per tensor its parts (`hf_decompose.parts`): <tensor>.dense |
                                .block.<i>.* | .sparse.* | .override.* | .lowrank.u/.v | .quant.codes (or .codes_huffman)/.scales
                                (or .scales_huffman)[/.columns];
                                above `max_shard_size` (50 GB by default, the Hub's largest file, as in
                                ``save_pretrained``) sharded: decomposition-00001-of-0000N.safetensors ... and
                                decomposition.safetensors.index.json (transformers' index), each tensor's parts in one shard
    decomposition.json          the report (kept fraction, sizes, equivalence, layers, timings)
    config.json, tokenizer ...  the fine-tune's config and tokenizer (small), so the artifact loads alone;
                                config.json carries the `quantization_config` (quant_method
                                "hf_decompose") that lets transformers load it (`hf_decompose.quantizer`)
    README.md                   the model card (`hf_decompose.card`), not checksummed

Writes are atomic: everything goes to a hidden temporary sibling directory, marked incomplete
until it is renamed into place; the index checksums itself too. The weights file is written tensor by
tensor (`tensorfile`), so deltas can arrive a layer at a time (`writing`) and never be held twice; a finished
shard is flushed and hashed on threads while the next one is computed. A temporary directory left by a
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
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import locks
from .checkpoints import contained, sha256_files, sha256_of
from .errors import ArtifactError
from .parts import TensorDelta
from .tensorfile import SafetensorsWriter, header_reserve

# 2: low-bit codes may be Huffman-coded (`.quant.codes_huffman`), unknown to readers of 1; 3: the weights may be sharded,
# unknown to readers of 2; 4: low-bit codes may have a step per column (`.quant.columns`), unknown to readers of 3. An
# artifact is written at the lowest version that reads it (3 only when sharded, 4 only with steps per column); all are read.
FORMAT_VERSION = 4
INDEX = "decomposed_config.json"
WEIGHTS = "decomposition.safetensors"
WEIGHTS_INDEX = "decomposition.safetensors.index.json"  # a sharded artifact's, in transformers' format (what it downloads)
SHARD = "decomposition-{:05d}-of-{:05d}.safetensors"
SHARD_PATTERN = "decomposition-*-of-*.safetensors"
MAX_SHARD_SIZE = "50GB"  # the Hub's largest file, transformers' `save_pretrained` default
REPORT = "decomposition.json"
CARD = "README.md"
# config.json's `transformers_weights`: not a file name, so that transformers without the plugin stops
# with this text instead of loading random weights; the plugin's hook puts `WEIGHTS` back before files resolve.
WEIGHTS_WITHOUT_PLUGIN = "decomposition (an hf_decompose artifact: `pip install hf-decompose` and `import hf_decompose` to load it)"
SHARDS_WITHOUT_PLUGIN = "decomposition, sharded (an hf_decompose artifact: `pip install hf-decompose` and `import hf_decompose` to load it)"
WEIGHTS_OF = {WEIGHTS_WITHOUT_PLUGIN: WEIGHTS, SHARDS_WITHOUT_PLUGIN: WEIGHTS_INDEX}  # what the plugin's hook puts back
INCOMPLETE = ".incomplete"  # present while a directory is being written
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def save(
    directory: str | Path,
    deltas: dict[str, TensorDelta],
    index: dict,
    report: dict,
    side_files_from: Path | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> Path:
    """Write an artifact atomically; replace an existing artifact only if `overwrite` (see `check_target`)."""
    with writing(directory, list(deltas), overwrite, max_shard_size) as writer:
        writer.add(deltas)
        writer.finish(index, report, side_files_from)
    return writer.target


@contextlib.contextmanager
def writing(directory: str | Path, names: list[str], overwrite: bool = False, max_shard_size: int | str = MAX_SHARD_SIZE) -> Iterator[ArtifactWriter]:
    """An `ArtifactWriter` into a staged copy of `directory`, published atomically once the block ends
    after `ArtifactWriter.finish`; an exception, or no `finish`, leaves `directory` as it was."""
    limit = shard_bytes(max_shard_size)  # a bad size fails before anything is written
    with locks.owning(directory):
        target = check_target(directory, overwrite)
        with _staged(target, overwrite) as tmp:
            writer = ArtifactWriter(target, tmp, names, limit)
            try:
                yield writer
            except BaseException:
                writer.abort()
                raise
            if not writer.finished:
                raise ArtifactError(f"{target}: the artifact was not finished")


class ArtifactWriter:
    """Writes the kept deltas of the tensors `names` as they come (a layer at a time), then the rest of the
    artifact. The weights are the same bytes whether deltas come all at once or layer by layer; a tensor whose
    parts would take its shard past `limit` bytes starts the next shard (one larger than `limit` gets its own)."""

    def __init__(self, target: Path, tmp: Path, names: list[str], limit: int):
        self.target, self.tmp, self.limit = target, tmp, limit
        self.reserve = header_reserve(names)
        self.tensors: dict[str, dict] = {}
        self.weight_map: dict[str, int] = {}  # stored key -> its shard's number
        self.by_column = False  # whether a part holds steps per column (format version 4)
        self.shards: list[tuple[Path, int]] = []  # closed shards: path and size
        self.digests: list[Future[str]] = []  # the SHA-256 of the closed shards but the last, computed on a thread
        self._threads = ThreadPoolExecutor(2, thread_name_prefix="hf_decompose-shard")  # one flushes, one hashes
        self.finished = False
        self._open_shard()

    def _open_shard(self) -> None:
        self.weights = SafetensorsWriter(self.tmp / f".shard-{len(self.shards) + 1}", self.reserve)
        self.shard_size = 0

    def _close_shard(self) -> None:
        self.weights.close()
        self.shards.append((self.weights.path, self.weights.path.stat().st_size))

    def _flush_and_hash(self, path: Path) -> Future[str]:
        """Flush `path` to disk on one thread while another hashes it (the handles opened now: renames follow)."""
        self._threads.submit(_fsync_handle, os.open(path, os.O_RDONLY))
        return self._threads.submit(sha256_of, open(path, "rb"))

    def add(self, deltas: dict[str, TensorDelta]) -> None:
        for name, delta in deltas.items():
            self.add_stored(name, delta.state(), {"shape": list(delta.shape), "transposed": delta.transposed})

    def add_stored(self, name: str, state: dict[str, torch.Tensor], meta: dict) -> None:
        """The stored tensors `state` of entry `name` (`TensorDelta.state`), `meta` its index entry."""
        size = sum(t.numel() * t.element_size() for t in state.values())
        if self.shard_size and self.shard_size + size > self.limit:
            self._close_shard()
            self.digests.append(self._flush_and_hash(self.shards[-1][0]))
            self._open_shard()
        for key, tensor in state.items():
            self.weights.add(key, tensor)
            self.weight_map[key] = len(self.shards)
            self.by_column |= key.endswith(".columns")
        self.shard_size += size
        self.tensors[name] = meta

    def abort(self) -> None:
        self.weights.abort()
        self._threads.shutdown(wait=True)

    def finish(self, index: dict, report: dict, side_files_from: Path | None = None) -> None:
        """Complete the weights; add the report, side files, index (with every file's SHA-256) and card."""
        tmp = self.tmp
        self._close_shard()
        count = len(self.shards)
        names = [WEIGHTS] if count == 1 else [SHARD.format(i + 1, count) for i in range(count)]
        for (path, _), name in zip(self.shards, names):
            path.rename(tmp / name)
        total = sum(size for _, size in self.shards)
        if count > 1:
            weight_map = {key: names[shard] for key, shard in sorted(self.weight_map.items())}
            (tmp / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        report = dict(report, size_bytes=dict(report.get("size_bytes", {}), artifact=total))
        report = json.loads(json.dumps(report, sort_keys=True, default=_jsonable))  # as read back: the card renders alike
        if side_files_from is not None:  # before the last shard's flush starts: files written during it wait for it
            for name in SIDE_FILES:
                if (side_files_from / name).exists():
                    shutil.copy2(side_files_from / name, tmp / name)
        _add_quantization_config(tmp, index, sharded=count > 1)
        (tmp / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True, default=_jsonable))
        self.digests.append(self._flush_and_hash(tmp / names[-1]))
        others = sorted(p for p in tmp.iterdir() if p.is_file() and p.name not in (INCOMPLETE, *names))
        digests = sha256_files(others) | {name: digest.result() for name, digest in zip(names, self.digests)}
        self._threads.shutdown(wait=True)  # the shards are on disk (publishing flushes every file again: a no-op now)
        version = 4 if self.by_column else 2 if count == 1 else 3
        index = dict(index, format_version=version, files=dict(sorted(digests.items())), weights=names, tensors=self.tensors)
        _write_index(tmp, index)
        _write_card(tmp, index, report, side_files_from)
        self.finished = True


def shard_bytes(max_shard_size: int | str) -> int:
    """`max_shard_size` in bytes (an int, or transformers' strings: "5GB", "500MiB", ...); `ConfigError` for a bad one."""
    from transformers.utils.hub import convert_file_size_to_int

    from .errors import ConfigError

    try:
        limit = convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError, AttributeError) as err:
        raise ConfigError(f"max_shard_size={max_shard_size!r} is no size (an int of bytes, or a string such as '5GB' or '500MiB')") from err
    if type(limit) is not int or limit <= 0:
        raise ConfigError(f"max_shard_size={max_shard_size!r} is no size (an int of bytes, or a string such as '5GB' or '500MiB')")
    return limit


def _fsync_handle(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    weights = index.get("weights", [WEIGHTS])
    if not isinstance(weights, list) or not weights or (version < 3 and weights != [WEIGHTS]) or len(set(map(str, weights))) != len(weights):
        raise ArtifactError(f"{path}: field 'weights' is malformed ({weights!r})")
    for name in weights + ([WEIGHTS_INDEX] if len(weights) > 1 else []):
        if name not in index["files"]:
            raise ArtifactError(f"{path}: {name} is not listed in 'files'")
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


def weight_files(index: dict) -> list[str]:
    """The names of a checked artifact's weights files: ``decomposition.safetensors``, or its shards in order."""
    return index.get("weights", [WEIGHTS])


class DeltaReader(Mapping):
    """The deltas of a checked artifact (`read_index`), read one tensor at a time: a caller that puts each
    into a model and drops it never holds more than one."""

    def __init__(self, directory: str | Path, index: dict):
        self.directory, self.index = Path(directory), index
        self._where: dict[str, Path] = {}  # stored key -> its weights file
        for name in weight_files(index):
            path = self.directory / name
            try:
                with safe_open(path, framework="pt") as handle:
                    keys = list(handle.keys())
            except (SafetensorError, OSError) as err:
                raise ArtifactError(f"{path}: unreadable ({err})") from err
            for key in keys:
                if key in self._where:
                    raise ArtifactError(f"{path}: tensor {key!r} is stored in {self._where[key].name} too")
                self._where[key] = path
        if len(weight_files(index)) > 1:  # an entry with no parts is a tensor that did not change: none may go missing
            try:
                mapped = dict(json.loads((self.directory / WEIGHTS_INDEX).read_text())["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ArtifactError(f"{self.directory / WEIGHTS_INDEX}: no weight_map ({err})") from err
            stored = {key: path.name for key, path in self._where.items()}
            differ = sorted(k for k in mapped.keys() | stored.keys() if mapped.get(k) != stored.get(k))
            if differ:
                raise ArtifactError(f"{self.directory}: the shards do not hold the tensors {WEIGHTS_INDEX} maps (first: {differ[0]!r})")
        self._used: set[str] = set()
        self._keys_of: dict[str, list[str]] = {}  # entry -> the stored keys its parts were read from

    def __getitem__(self, name: str) -> TensorDelta:
        meta = self.index["tensors"][name]
        try:
            shape, transposed = meta["shape"], meta["transposed"]
            if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape) or not isinstance(transposed, bool):
                raise ValueError(f"shape {shape!r}, transposed {transposed!r}")
            with contextlib.ExitStack() as handles:  # files mapped for this entry only: their pages do not stay resident
                tensors = _Tensors(self, handles, name)
                delta = TensorDelta.from_state(name, tuple(shape), transposed, tensors)  # checks each part
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, SafetensorError, OSError) as err:
            raise ArtifactError(f"{self.directory}: entry for tensor {name!r} is malformed ({err})") from err
        self._keys_of[name] = tensors.keys
        return delta

    def stored(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of entry `name` as the files store them (the entry is read and checked first)."""
        self[name]
        with contextlib.ExitStack() as handles:
            tensors = _Tensors(self, handles, name)
            return {key: tensors.get(key) for key in self._keys_of[name]}

    def __iter__(self) -> Iterator[str]:
        return iter(self.index["tensors"])

    def __len__(self) -> int:
        return len(self.index["tensors"])

    def check_all_used(self) -> None:
        """After every entry was read: refuse a tensor of the files that no entry owns."""
        stray = sorted(set(self._where) - self._used)
        if stray:
            raise ArtifactError(f"{self._where[stray[0]]}: tensor {stray[0]!r} belongs to no entry of {INDEX}")


class _Tensors:
    """The stored parts of one entry, read on request (what `TensorDelta.from_state` asks for)."""

    def __init__(self, reader: DeltaReader, handles: contextlib.ExitStack, name: str):
        self.reader, self.handles, self.prefix = reader, handles, f"{name}."
        self.opened: dict[Path, object] = {}
        self.keys: list[str] = []

    def get(self, key: str) -> torch.Tensor | None:
        path = self.reader._where.get(key)
        if path is None or not key.startswith(self.prefix):
            return None
        if path not in self.opened:
            self.opened[path] = self.handles.enter_context(safe_open(path, framework="pt"))
        self.reader._used.add(key)
        self.keys.append(key)
        return self.opened[path].get_tensor(key)


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


def copy(source: str | Path, target: str | Path, report: dict, overwrite: bool = False, max_shard_size: int | str | None = None) -> Path:
    """Write the artifact `source` (checked) to `target` with `report` as its report, atomically: a staged
    copy (other files hard-linked where possible) is swapped in; `target` may be `source` itself. With
    `max_shard_size`, the weights are written again in shards of at most that size (their tensors as stored)."""
    source, target = Path(source), Path(target)
    if max_shard_size is not None:
        return _reshard(source, target, report, overwrite, max_shard_size)
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


def _reshard(source: Path, target: Path, report: dict, overwrite: bool, max_shard_size: int | str) -> Path:
    index = read_index(source)
    reader = DeltaReader(source, index)
    with writing(target, list(index["tensors"]), overwrite, max_shard_size) as writer:
        for name in index["tensors"]:
            writer.add_stored(name, reader.stored(name), index["tensors"][name])
        reader.check_all_used()
        written = {k: v for k, v in index.items() if k not in ("files", "weights", "tensors", "format_version", "index_sha256")}
        writer.finish(written, report, source)
    return writer.target


def _add_quantization_config(directory: Path, index: dict, sharded: bool) -> None:
    """Make the copied config.json load with transformers (after ``import hf_decompose``): its
    ``quantization_config`` is the DecomposedConfig with the base pinned, its weights the decomposition."""
    from .config import QUANT_METHOD

    path = directory / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    base = index["base_model"]
    config["quantization_config"] = dict(index["config"], quant_method=QUANT_METHOD, base_model=base["id"], base_revision=base.get("revision"))
    config["transformers_weights"] = SHARDS_WITHOUT_PLUGIN if sharded else WEIGHTS_WITHOUT_PLUGIN
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
