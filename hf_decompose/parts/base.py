"""The base of every substructure kind, and the registry that names them.

A kind is one `Part` subclass, registered with `register_part`: it owns its tensors (buffers), the keys
they are stored under in an artifact (``<tensor name>.<kind>[.<i>].<field>``), their validation against
the delta's shape, its dense view (`add_to`), its stored size and its forward pass (its contribution to
``x @ delta^T`` for ``(out, in)`` matrices, or with ``lookup=True`` the delta rows of token ids). A
tensor's delta (`TensorDelta`) is its shape plus a list of parts, and the artifact is read and written
through the registry, in the kinds' `order` (which is also the order in which parts are summed).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from types import EllipsisType
from typing import ClassVar

import torch
from torch import nn

from ..checkpoints import all_finite

PART_KINDS: dict[str, type[Part]] = {}
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def register_part(cls: type[Part]) -> type[Part]:
    """Register a kind under ``cls.kind`` (a class decorator); `PART_KINDS` stays in the kinds' `order`."""
    if cls.kind in PART_KINDS:
        raise ValueError(f"a substructure kind named {cls.kind!r} is already registered ({PART_KINDS[cls.kind].__name__})")
    kinds = sorted([*PART_KINDS.values(), cls], key=lambda k: k.order)
    PART_KINDS.clear()
    PART_KINDS.update((k.kind, k) for k in kinds)
    return cls


# rows a part adds to a dense matrix at a time (`add_to`): no temporary of a vocabulary-sized matrix's size
ROWS = 4096


def row_blocks(out: torch.Tensor, rows: int = ROWS) -> Iterator[slice | EllipsisType]:
    """Indices of consecutive blocks of at most `rows` rows covering `out` (a 0-d tensor: one, all of it)."""
    return (slice(r, r + rows) for r in range(0, out.shape[0], rows)) if out.dim() else iter([...])


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def stored(t: torch.Tensor) -> torch.Tensor:
    """A tensor as the artifact stores it: indices fit int32 (shapes < 2^31), half the bytes of int64."""
    return (t.int() if t.dtype == torch.int64 else t).contiguous()


class Part(nn.Module):
    """One substructure of a tensor's delta, in the canonical ``(out, in)`` layout of `shape`.

    Subclasses declare `kind` (the registered name and the key's middle), `order`, `fields` (stored tensors, in key
    order; ``""`` stores the kind's single tensor under the kind's name), `optional` fields, and whether a
    delta may hold several (`numbered`: keys ``<kind>.<i>.<field>``).
    """

    kind: ClassVar[str] = "part"
    order: ClassVar[int] = 0  # where the kind's parts are stored and summed among a delta's parts
    fields: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[frozenset[str]] = frozenset()
    numbered: ClassVar[bool] = False
    additive: ClassVar[bool] = True  # summed into the delta (an override replaces values instead)

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)
        self._cost: int | None = None

    # -- storage -------------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """The stored tensors by field name."""
        raise NotImplementedError

    @classmethod
    def from_state(cls, shape: tuple[int, ...], tensors: dict[str, torch.Tensor | None]) -> Part:
        """The part of a tensor of `shape` from its stored fields (optional ones may be None)."""
        raise NotImplementedError

    @classmethod
    def key(cls, field: str, index: int | None = None) -> str:
        return ".".join(s for s in (cls.kind, None if index is None else str(index), field) if s)

    @classmethod
    def read(cls, shape: tuple[int, ...], get: Callable[[str], torch.Tensor | None]) -> list[Part]:
        """Every part of this kind that `get` (stored key -> tensor or None) holds for one tensor."""
        found = []
        for index in itertools.count() if cls.numbered else [None]:
            tensors = {f: get(cls.key(f, index)) for f in cls.fields}
            missing = [f for f, t in tensors.items() if t is None]
            if len(missing) == len(cls.fields):
                break
            if any(f not in cls.optional for f in missing):
                raise ValueError(f"a {cls.kind} part is stored incompletely (no {cls.key(missing[0], index)!r})")
            found.append(cls.from_state(shape, tensors))
        return found

    def check(self) -> None:
        """Raise ValueError unless the part is complete, finite and fits `shape`."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes of the stored tensors (see `stored`)."""
        return sum(t.numel() * (4 if t.dtype == torch.int64 else t.element_size()) for t in self.state().values())

    def num_params(self) -> int:
        """Delta parameters this part stores (an entry it replaces counts where it is kept)."""
        return sum(t.numel() for t in self.state().values() if t.dtype in FLOATS)

    def num_substructures(self) -> int:
        return 1

    # -- dense views ---------------------------------------------------------------------------
    def add_to(self, out: torch.Tensor) -> None:
        """Add this part's values to `out` (float32, `shape`)."""
        raise NotImplementedError

    def mark(self, mask: torch.Tensor) -> None:
        """Set the entries this part touches in `mask` (entry-level parts; low rank touches none)."""

    # -- execution -----------------------------------------------------------------------------
    def runtime(self, base: torch.Tensor, rest: Callable[[], torch.Tensor], lookup: bool = False) -> Part:
        """The module that runs this part beside the base `base` (canonical layout; `rest()` is the
        dense sum of the additive parts; `lookup`: the module is an embedding, its rows are looked up): its
        own view of the same tensors, so that moving it (Accelerate placement) leaves the stored delta where it is."""
        return copy.deepcopy(self, memo={id(t): t for t in self._buffers.values() if t is not None})

    def cost(self) -> int:
        """Multiply-adds per input row."""
        if self._cost is None:  # sizes never change (a move or a cast keeps them)
            self._cost = sum(b.numel() for b in self._buffers.values() if b is not None and b.is_floating_point())
        return self._cost

    def forward(self, x: torch.Tensor, lookup: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"shape={self.shape}, cost={self.cost()}"


def expect(tensor: torch.Tensor, shape: tuple[int, ...], values: bool) -> None:
    """Raise ValueError unless `tensor` has `shape` and is float values (`values`) or integer indices, finite."""
    if tuple(tensor.shape) != tuple(shape) or (tensor.dtype in FLOATS) != values:
        raise ValueError(f"a part has shape {tuple(tensor.shape)} and dtype {tensor.dtype}, expected {tuple(shape)}")
    if values and not all_finite(tensor):  # the exponent bits: 7-100x `torch.isfinite(...).all()` on CPU
        raise ValueError("a part holds NaN/Inf values")


def in_range(index: torch.Tensor, bound: int) -> None:
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= bound):
        raise ValueError(f"an index lies outside [0, {bound})")
