"""Checkpoint directories: stream their tensors lazily, hash their files, pair base and fine-tune
(`hf_decompose.hub.resolve` turns a Hub id into such a directory)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from . import kernels
from .errors import CheckpointError
from .names import matrices, matrix_of

WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
STORED_DTYPES = TORCH_DTYPES | {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
# float dtype: (the integer dtype of its bits, its exponent field); a value is NaN or Inf where the field is all ones
EXPONENT_BITS = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
                 torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000)}
FINITE_BLOCK = 1 << 16  # values checked at a time: the scratch stays in cache
CONFIG_PATTERNS = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "*.jinja", "vocab.*", "merges.txt"]


def contained(directory: Path, name: str, error: type[Exception] = CheckpointError) -> Path:
    """``directory / name``, refused (`error`) unless `name` is relative without ``..`` and the file, symlinks
    followed, lies inside `directory` (inside the repo folder for a Hub cache snapshot, whose files link to its blobs)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name:
        raise error(f"{directory}: file name {name!r} points outside the directory")
    path = directory / name
    root = directory.resolve()
    if root.parent.name == "snapshots":
        root = root.parent.parent
    if path.exists() and not path.resolve().is_relative_to(root):
        raise error(f"{path} is a link to {path.resolve()}, outside {directory}: refusing to read it")
    return path


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order when sharded; every one inside it."""
    index = directory / "model.safetensors.index.json"
    if not os.access(directory, os.R_OK | os.X_OK):
        raise CheckpointError(f"{directory}: cannot read the directory (permission denied)")
    if index.exists():
        try:
            names = sorted(set(json.loads(contained(directory, index.name).read_text())["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index}: unreadable index ({err})") from err
        files = [contained(directory, name) for name in names]
    else:
        files = [contained(directory, p.name) for p in sorted(directory.glob("*.safetensors"))]
    if not files:
        pickles = sorted(p.name for p in directory.glob("*.bin"))
        hint = f" (found {', '.join(pickles)}: convert to safetensors first)" if pickles else ""
        raise CheckpointError(f"{directory}: no safetensors weights{hint}")
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{directory}: missing weight file(s) {', '.join(missing)}")
    return files


def sha256_files_in_background(files: list[Path]) -> Future[dict[str, str]]:
    """`sha256_files` on a thread of its own (hashlib releases the GIL): the hashes of large checkpoints
    come while the caller works on their tensors."""
    executor = ThreadPoolExecutor(1, thread_name_prefix="hf_decompose-sha256")
    future = executor.submit(sha256_files, files)
    executor.shutdown(wait=False)
    return future


def sha256_files(files: list[Path]) -> dict[str, str]:
    """SHA-256 of each file, keyed by file name."""
    return {file.name: sha256_of(open(file, "rb")) for file in files}


def sha256_of(handle: BinaryIO) -> str:
    """SHA-256 of what is left to read in `handle`, which is closed after."""
    digest = hashlib.sha256()
    with handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


class RawTensors:
    """Tensors of safetensors files read with one ``pread`` each (a tensor, a stack's matrix, a block of their rows), in
    their stored dtype: no mapping whose pages fault in on every read, a file's header parsed once (opening a
    64-expert mixture's file for each tensor parsed its 1,611 entries each time: 1.1 ms a read), no checks."""

    def __init__(self, files: list[Path]):
        self._where: dict[str, tuple[Path, int, int, torch.dtype, list[int]]] = {}
        for file in files:
            with open(file, "rb") as handle:
                size = struct.unpack("<Q", handle.read(8))[0]
                header = json.loads(handle.read(size))
            for name, entry in header.items():
                if name != "__metadata__" and entry["dtype"] in STORED_DTYPES:
                    start, stop = entry["data_offsets"]
                    parts = matrices(name, tuple(entry["shape"])) if entry["dtype"] in FLOAT_DTYPES else [(name, tuple(entry["shape"]))]
                    each = (stop - start) // len(parts)  # a stack's matrices as `CheckpointReader` names them
                    for i, (one, shape) in enumerate(parts):
                        self._where[one] = (file, 8 + size + start + i * each, each, STORED_DTYPES[entry["dtype"]], list(shape))

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        file, offset, nbytes, dtype, shape = self._where[name]
        if rows is not None:  # a block of leading rows: contiguous on disk
            start, stop, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError(f"rows {rows} of {name!r}: only contiguous blocks of rows are read")
            each = nbytes // shape[0] if shape[0] else 0
            offset, nbytes, shape = offset + start * each, max(stop - start, 0) * each, [max(stop - start, 0), *shape[1:]]
        out = torch.empty(nbytes, dtype=torch.uint8)
        with open(file, "rb", buffering=0) as handle:
            if nbytes and os.preadv(handle.fileno(), [out.numpy()], offset) != nbytes:
                raise CheckpointError(f"{file}: tensor {name!r} is cut short")
        return out.view(dtype).view(shape)


class CheckpointReader:
    """Lazy, read-only view of a checkpoint's tensors: nothing is loaded until asked for."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.files = weight_files(self.directory)
        self.config = read_config(self.directory)
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        for file in self.files:
            try:
                with safe_open(file, framework="pt") as handle:
                    for name in handle.keys():
                        sl = handle.get_slice(name)
                        shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                        # a 3-D float tensor of matrices: a name a matrix (`names.SLICE`)
                        for one, one_shape in matrices(name, shape) if dtype in FLOAT_DTYPES else [(name, shape)]:
                            self._where[one], self._shapes[one], self._dtypes[one] = file, one_shape, dtype
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err
        self.raw = RawTensors(self.files)  # read tensor by tensor without opening a file each time

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> str:
        return self._dtypes[name]

    def get(self, name: str, rows: slice | None = None, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """One tensor (or a slice of its rows) as `dtype` (None: as stored), checked for NaN/Inf. Read into memory of
        its own (`RawTensors`; a file is mapped only for dtypes it does not read), so no file's pages stay resident."""
        stem, index = matrix_of(name)
        try:
            if name in self.raw and (rows is None or rows.step in (None, 1)):
                tensor = self.raw.get(name, rows)
            else:
                with safe_open(self._where[name], framework="pt") as handle:
                    if index is not None:
                        tensor = handle.get_slice(stem)[index] if rows is None else handle.get_slice(stem)[index, rows]
                    else:
                        tensor = handle.get_tensor(name) if rows is None else handle.get_slice(name)[rows]
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{self._where[name]}: cannot read tensor {name!r} ({err})") from err
        out = tensor if dtype is None else tensor.to(dtype)
        checked = out if out.element_size() < tensor.element_size() else tensor  # the fewer bytes; a narrowing cast can overflow
        if not all_finite(checked):
            bad = int((~torch.isfinite(checked)).sum())
            raise CheckpointError(f"{self.directory}: tensor {name!r} has {bad} NaN/Inf value(s)")
        return out

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no value of `tensor` is NaN or Inf. On CPU tested on its bits (no exponent field all ones): 16-bit
    values by the compiled kernel (`kernels.all_finite_16`), others a cache-sized block at a time: one read of the
    tensor (a float32 sum of bfloat16 values took 6x as long)."""
    if tensor.device.type != "cpu" or tensor.dtype not in EXPONENT_BITS:
        return bool(torch.isfinite(tensor).all())
    bits_dtype, exponent = EXPONENT_BITS[tensor.dtype]
    if tensor.element_size() == 2 and kernels.available():
        return kernels.all_finite_16(tensor.contiguous(), exponent)
    bits = tensor.contiguous().view(bits_dtype).numpy().reshape(-1)
    scratch = np.empty(min(bits.size, FINITE_BLOCK), bits.dtype)
    for start in range(0, bits.size, FINITE_BLOCK):
        block = scratch[: min(FINITE_BLOCK, bits.size - start)]
        np.bitwise_and(bits[start : start + FINITE_BLOCK], exponent, out=block)
        if block.max() == exponent:
            return False
    return True


def load_dtype(reader: CheckpointReader) -> torch.dtype:
    """The dtype ``AutoModelForCausalLM.from_pretrained(directory)`` gives the model (transformers'
    default ``dtype="auto"``): the config's ``dtype``, else that of the first floating-point tensor."""
    name = reader.config.get("dtype") or reader.config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, name.removeprefix("torch."))
    return TORCH_DTYPES[next((d for d in map(reader.dtype, reader.names()) if d in TORCH_DTYPES), "F32")]


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{directory}: no config.json") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from err
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read it ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def check_causal_lm(config: dict, where: Path) -> None:
    """Raise `CheckpointError` unless transformers knows `config` as a causal language model."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL

    model_type, architectures = config.get("model_type"), config.get("architectures")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise CheckpointError(f"{where}/config.json: model_type {model_type!r} is not supported by this transformers version")
    classes = {c for v in CAUSAL.values() for c in ([v] if isinstance(v, str) else v)}
    causal = model_type in CAUSAL if not architectures else all(
        isinstance(a, str) and (a in classes or a.endswith(("ForCausalLM", "LMHeadModel"))) for a in architectures
    )
    if not causal:
        raise CheckpointError(f"{where}/config.json: {model_type} {architectures} is not a causal language model")


@dataclass
class CheckpointPair:
    """A base and a fine-tune whose tensors pair up one to one."""

    base: CheckpointReader
    finetuned: CheckpointReader

    def __post_init__(self) -> None:
        b, f = self.base, self.finetuned
        self.dtype = load_dtype(f)  # what the fine-tune loads as: the base is held in it too
        if b.config.get("model_type") != f.config.get("model_type") or b.config.get("architectures") != f.config.get("architectures"):
            raise CheckpointError(
                f"architectures differ: base {b.directory} is {b.config.get('model_type')} {b.config.get('architectures')}, "
                f"fine-tune {f.directory} is {f.config.get('model_type')} {f.config.get('architectures')}"
            )
        check_causal_lm(f.config, f.directory)
        if bool(b.config.get("tie_word_embeddings", True)) != bool(f.config.get("tie_word_embeddings", True)):
            raise CheckpointError(
                f"tie_word_embeddings differs: base {b.config.get('tie_word_embeddings')}, fine-tune {f.config.get('tie_word_embeddings')}"
            )
        missing = sorted(set(b.names()) - set(f.names()))
        extra = sorted(set(f.names()) - set(b.names()))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing from the fine-tune: {', '.join(missing[:5])}")
            if extra:
                parts.append(f"not in the base: {', '.join(extra[:5])}")
            raise CheckpointError("tensors do not pair up; " + "; ".join(parts))
        vocab = (b.config.get("vocab_size"), f.config.get("vocab_size"))
        for name in b.names():
            for side in (b, f):
                if side.dtype(name) not in FLOAT_DTYPES:
                    raise CheckpointError(
                        f"{side.directory}: tensor {name!r} has dtype {side.dtype(name)}; only floating-point weights "
                        "can be decomposed (dequantize quantized checkpoints first)"
                    )
            bs, fs = b.shape(name), f.shape(name)
            if bs != fs and not (bs[1:] == fs[1:] and bs[:1] == vocab[:1] and fs[:1] == vocab[1:]):
                raise CheckpointError(f"tensor {name!r}: base shape {bs} != fine-tune shape {fs}")
            if bs[:1] > fs[:1]:
                raise CheckpointError(f"tensor {name!r}: the fine-tune's vocabulary shrank from {bs[0]} to {fs[0]} tokens (unsupported)")

    def names(self) -> list[str]:
        return self.base.names()

    def base_tensor(self, name: str, rows: slice | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base tensor, or its rows `rows` (a slice with bounds), in the fine-tune's shape (rows of
        tokens added by the fine-tune are zero), as `dtype` holding its values rounded to ``self.dtype``
        (the model's dtype: what a loaded base holds, so what a delta is added to)."""
        stored = TORCH_DTYPES[self.base.dtype(name)]
        if self.dtype in (torch.float16, torch.bfloat16) and stored != self.dtype:
            return self._base_tensor(name, rows, None).to(self.dtype).to(dtype)
        return self._base_tensor(name, rows, dtype)

    def _base_tensor(self, name: str, rows: slice | None, dtype: torch.dtype | None) -> torch.Tensor:
        shape = self.finetuned.shape(name)
        if self.base.shape(name) == shape:
            return self.base.get(name, rows, dtype)
        start, stop = (0, shape[0]) if rows is None else (rows.start, rows.stop)
        have = self.base.shape(name)[0]
        base = self.base.get(name, slice(min(start, have), min(stop, have)), dtype)
        return torch.cat([base, base.new_zeros(stop - start - base.shape[0], *shape[1:])])

    def deltas(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """Yield (name, base, fine-tune) one tensor pair at a time, as float32."""
        for name in self.names():
            yield name, self.base_tensor(name), self.finetuned.get(name)
