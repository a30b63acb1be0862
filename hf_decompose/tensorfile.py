"""A safetensors file written one tensor at a time, so that no more than the tensor at hand is in memory.

The header (names, dtypes, shapes, offsets) is only known once every tensor is written, so a region is
reserved for it at the start of the file and filled in, space-padded as safetensors pads its headers,
at `close`; a header that outgrows its reservation is moved into a fresh file (one sequential copy).
Tensors keep the order they are added in, except those whose size is not a multiple of 4 bytes (an odd
number of bfloat16 values, int8 codes), held back to the end so that every 4-byte tensor stays 4-byte
aligned. Every other tensor goes to a thread that writes it while the caller computes the next ones (a
large artifact is bound by the disk: writing 1 GB took 2.7 s, as long as computing it); at most
`PENDING_BYTES` wait for it, or one tensor larger than that.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import threading
from collections import deque
from pathlib import Path

import torch

DTYPES = {torch.float32: "F32", torch.int32: "I32", torch.int64: "I64", torch.bfloat16: "BF16", torch.float16: "F16",
          torch.float64: "F64", torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16"}
PENDING_BYTES = 256 * 2**20  # tensors added but not yet written, at most (or one larger tensor)
HEADER_BYTES_PER_TENSOR = 6 * 100  # about six parts of ~100 header bytes each (plus its name) per decomposed tensor


def header_reserve(names: list[str]) -> int:
    """Bytes to reserve for the header of an artifact holding the parts of the tensors `names`."""
    return 8 * math.ceil((1024 + sum(HEADER_BYTES_PER_TENSOR + 6 * len(n) for n in names)) / 8)


class SafetensorsWriter:
    """`add` tensors, then `close`: the file is a valid safetensors file only after `close`."""

    def __init__(self, path: Path, reserve: int, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.reserve = reserve
        self.entries: dict[str, dict] = {"__metadata__": metadata or {"format": "pt"}}
        self.offset = 0
        self.held_back: list[tuple[str, torch.Tensor]] = []
        self.file = open(self.path, "wb")
        self.file.seek(8 + reserve)
        self._pending: deque = deque()  # bytes the writer thread has yet to write, in order
        self._pending_bytes, self._closing, self._error = 0, False, None
        self._changed = threading.Condition()
        self._writer = threading.Thread(target=self._drain, name="hf_decompose-writer", daemon=True)
        self._writer.start()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.entries:
            raise ValueError(f"tensor {name!r} added twice")
        if tensor.numel() * tensor.element_size() % 4:
            # held until `close` as a copy: a tensor read from a mapped safetensors file keeps the whole mapping, and every
            # page of it read, resident while it lives (the 1.5B synthetic anneal's artifact writing rose by 2.6 GiB so)
            self.held_back.append((name, tensor.detach().cpu().clone()))
        else:
            self._write(name, tensor)

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu().contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy()  # the tensor's own bytes, no copy
        with self._changed:
            while self._error is None and self._pending and self._pending_bytes + data.nbytes > PENDING_BYTES:
                self._changed.wait()
            self._raise_error()
            self._pending.append(data)
            self._pending_bytes += data.nbytes
            self._changed.notify_all()
        self.entries[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [self.offset, self.offset + data.nbytes]}
        self.offset += data.nbytes

    def _drain(self) -> None:
        """The writer thread: write pending tensors in order until closed; keep the first error for the caller."""
        while True:
            with self._changed:
                while not self._pending and not self._closing:
                    self._changed.wait()
                if not self._pending:
                    return
                data = self._pending[0]
            try:
                self.file.write(memoryview(data))
            except BaseException as err:  # the disk is full, the file was closed: the caller raises it
                with self._changed:
                    self._error = err
                    self._pending.clear()
                    self._changed.notify_all()
                return
            with self._changed:
                if self._pending and self._pending[0] is data:  # not dropped by `abort` meanwhile
                    self._pending.popleft()
                    self._pending_bytes -= data.nbytes
                self._changed.notify_all()
            del data  # not held while waiting for the next one

    def _raise_error(self) -> None:
        if self._error is not None:
            raise OSError(f"{self.path}: writing failed ({self._error})") from self._error

    def _stop(self) -> None:
        """Let the writer thread finish what is pending, and end it."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._writer.join()

    def close(self) -> None:
        """Write the held-back tensors and the header; the file is complete afterwards."""
        for name, tensor in sorted(self.held_back, key=lambda nt: -nt[1].element_size()):
            self._write(name, tensor)
        self.held_back = []
        self._stop()
        self._raise_error()
        header = json.dumps(self.entries, separators=(",", ":")).encode()
        if len(header) <= self.reserve:
            self.file.seek(0)
            self.file.write(struct.pack("<Q", self.reserve) + header + b" " * (self.reserve - len(header)))
            self.file.close()
            return
        self.file.close()
        size = 8 * math.ceil(len(header) / 8)
        moved = self.path.with_name(self.path.name + ".tmp")
        with open(self.path, "rb") as src, open(moved, "wb") as dst:
            dst.write(struct.pack("<Q", size) + header + b" " * (size - len(header)))
            src.seek(8 + self.reserve)
            shutil.copyfileobj(src, dst, 1 << 24)
        os.replace(moved, self.path)

    def abort(self) -> None:
        with self._changed:
            self._pending.clear()
            self._pending_bytes = 0
        self._stop()
        self.file.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close() if kind is None else self.abort()
