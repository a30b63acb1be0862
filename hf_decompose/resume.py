"""Interrupted work: a per-layer cache that lets a re-run resume, and SIGTERM handled like Ctrl-C.

A cache directory holds ``manifest.json`` (its key: a hash of both checkpoints' weight files and of
the config) and, per finished layer ``i``, ``<i>.safetensors`` (the layer's `TensorDelta` parts)
and ``<i>.json`` (layer name, tensor shapes, statistics, the weights' SHA-256, and the full record
the key hashes: configuration and both checkpoints' SHA-256), the JSON written last as the entry's
commit mark. An entry is reused only when its own key matches; a cache with another key is wiped; a
damaged entry is recomputed. One process at a time owns a cache (`locks.owning`, held until `close`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from . import locks
from .checkpoints import sha256_files
from .config import DecomposedConfig
from .errors import ArtifactError
from .parts import TensorDelta
from .tensorfile import SafetensorsWriter, header_reserve

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
NOT_IN_KEY = ("base_model", "base_revision", "execution")  # settings that do not change the deltas
logger = logging.getLogger(__name__)
LayerResult = tuple[dict[str, TensorDelta], dict]


def cache_record(base_sha: dict[str, str], finetuned_sha: dict[str, str], config: DecomposedConfig) -> dict:
    """Everything a layer's result depends on: the format, both checkpoints' file hashes, the configuration."""
    settings = {k: v for k, v in config.to_dict().items() if k not in NOT_IN_KEY}
    return json.loads(json.dumps({"format": CACHE_FORMAT, "base": base_sha, "finetuned": finetuned_sha, "config": settings}, default=str))


def cache_key(record: dict) -> str:
    """SHA-256 of a `cache_record`."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


class LayerCache:
    """Finished layers of one decomposition, each entry keyed by `cache_key` of `record`; the directory is
    owned (locked) by this object until `close`."""

    def __init__(self, directory: str | Path, record: dict):
        self.directory = Path(directory)
        self.record, self.key = record, cache_key(record)
        self.reused = 0
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(locks.owning(self.directory, "layer cache"))
        try:
            self._prepare()
        except BaseException:
            self.close()
            raise

    def _prepare(self) -> None:
        manifest = self.directory / MANIFEST
        try:
            if self.directory.is_dir() and any(self.directory.iterdir()) and not manifest.is_file():
                raise ArtifactError(f"{self.directory} is not empty and is no layer cache: refusing to use it for one")
            if _read_json(manifest).get("key") != self.key:
                clear(self.directory)
            self.directory.mkdir(parents=True, exist_ok=True)
            _write_atomic(manifest, json.dumps({"key": self.key, "record": self.record}))
        except OSError as err:
            raise ArtifactError(f"cannot create the layer cache {self.directory}: {err}") from err

    def close(self) -> None:
        """Release the directory's lock (the entries stay for a re-run)."""
        self._lock.close()

    def get(self, index: int, layer: str) -> LayerResult | None:
        """The cached result of layer `index`, or None when absent, damaged or computed from other inputs or settings."""
        meta = _read_json(self.directory / f"{index:05d}.json")
        weights = self.directory / f"{index:05d}.safetensors"
        if meta.get("key") != self.key or meta.get("record") != self.record or meta.get("layer") != layer:
            return None
        if not weights.is_file() or sha256_files([weights])[weights.name] != meta.get("sha256"):
            return None
        try:
            tensors = load_file(weights)
            deltas = {n: TensorDelta.from_state(n, tuple(t["shape"]), bool(t["transposed"]), tensors) for n, t in meta["tensors"].items()}
        except (SafetensorError, OSError, KeyError, TypeError, AttributeError):
            return None
        self.reused += 1
        return deltas, meta["stats"]

    def put(self, index: int, layer: str, deltas: dict[str, TensorDelta], stats: dict) -> None:
        weights = self.directory / f"{index:05d}.safetensors"
        tmp = weights.with_suffix(".tmp")
        try:
            with SafetensorsWriter(tmp, header_reserve(list(deltas))) as writer:  # no second copy of a large delta
                for d in deltas.values():
                    for key, tensor in d.state().items():
                        writer.add(key, tensor)
            os.replace(tmp, weights)
            tensors = {n: {"shape": list(d.shape), "transposed": d.transposed} for n, d in deltas.items()}
            meta = {"key": self.key, "record": self.record, "layer": layer, "sha256": sha256_files([weights])[weights.name], "tensors": tensors, "stats": stats}
            _write_atomic(self.directory / f"{index:05d}.json", json.dumps(meta, default=_jsonable))
        except (OSError, SafetensorError) as err:
            raise ArtifactError(f"cannot write the layer cache {self.directory}: {err}") from err


def cached_layer(cache: LayerCache | None, index: int, layer: str, compute: Callable[[], LayerResult]) -> LayerResult:
    """Layer `index`'s (deltas, statistics): from the cache if it holds them, else computed and stored.

    Statistics pass through JSON either way, so a resumed run reports exactly what a fresh one does.
    """
    if cache is None:
        return compute()
    hit = cache.get(index, layer)
    if hit is not None:
        return hit
    deltas, stats = compute()
    cache.put(index, layer, deltas, stats)
    return deltas, json.loads(json.dumps(stats, default=_jsonable))


def clear(directory: str | Path) -> None:
    """Delete a layer cache (a directory holding a cache manifest; anything else is left alone), unless
    another process owns it now."""
    if not (Path(directory) / MANIFEST).is_file():
        return
    try:
        with locks.owning(directory, "layer cache"):
            shutil.rmtree(directory, ignore_errors=True)
    except ArtifactError as err:
        logger.info("left the layer cache in place: %s", err)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM raises `SystemExit` (as SIGINT raises `KeyboardInterrupt`), so
    cleanup code runs. Does nothing off the main thread or where SIGTERM is already handled."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def _exit(signum: int, frame) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
