"""One run at a time per output: an OS-level lock (``fcntl.flock``) on a hidden sibling lock file.

``owning(path)`` holds ``.<name>.lock`` beside `path` exclusively for the block; the kernel drops the
lock when the process exits or is killed, so a stale lock file never blocks anyone. The lock file holds
its holder (pid, host, start time, command), so a second run fails at once naming it. Locks are
re-entrant within a process (the CLI holds the output's lock while the library takes it again).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import ArtifactError

_held: dict[Path, list] = {}  # lock file -> [fd, depth]


def lock_file(path: str | Path) -> Path:
    path = Path(path).absolute()
    return path.parent / f".{path.name}.lock"


def holder(path: str | Path) -> dict:
    """What the lock file of `path` says about its holder ({} when none or unreadable)."""
    try:
        data = json.loads(lock_file(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def owning(path: str | Path, what: str = "output") -> Iterator[None]:
    """Hold `path`'s lock for the block; raise `ArtifactError` naming the holder if another process has it."""
    file = lock_file(path)
    if file in _held:
        _held[file][1] += 1
        try:
            yield
        finally:
            _held[file][1] -= 1
        return
    created = _make_parents(file.parent, path)
    try:
        fd = _acquire(file, path, what)
    except BaseException:
        _remove_empty(created)
        raise
    _held[file] = [fd, 1]
    try:
        yield
    finally:
        del _held[file]
        with contextlib.suppress(OSError):
            file.unlink()  # before the unlock: a waiter that opened this inode sees it gone and retries
        os.close(fd)
        _remove_empty(created)


def _make_parents(directory: Path, path: str | Path) -> list[Path]:
    """Create `directory` and its missing ancestors; return those created, deepest first."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    try:
        for d in reversed(missing):
            d.mkdir()
    except OSError as err:
        _remove_empty(missing)
        raise ArtifactError(f"cannot create the directory of {path}: {err}") from err
    return missing


def _remove_empty(directories: list[Path]) -> None:
    """Remove the directories a run created for its lock if they are still empty (a failed run leaves nothing)."""
    for d in directories:
        try:
            d.rmdir()
        except OSError:
            return


def _acquire(file: Path, path: str | Path, what: str) -> int:
    while True:
        try:
            fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ArtifactError(f"cannot lock {path} ({file}): {err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = holder(path) or (time.sleep(0.1), holder(path))[1]  # the holder may be writing its record
            raise ArtifactError(f"{path}: this {what} is in use by another run ({_describe(info)}); "
                                "wait for it to finish or choose another output") from None
        try:
            same = os.fstat(fd).st_ino == file.stat().st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed by its last holder between our open and our lock: retry
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    return fd


def _describe(info: dict) -> str:
    if not info:
        return "holder unknown"
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: {info.get('command')}"
