"""Many fine-tunes over one base: the base is loaded and run once, each fine-tune adds its substructures.

    model = DecomposedModel.from_pretrained({"poet": "out/poet", "legal": "out/legal"})
    model.load_decomposed("chat", "out/chat")          # more artifacts of the same base
    model.set_active("poet")                           # or ["poet", "chat"]: their deltas add up
    model.generate(**batch, decomposed_names=["poet", "legal", None])   # per row; None is the base

The model is the one decomposed-model type (`DecomposedModel`, the base's transformers class with the
mixin in front); `MultiTenant` is the part of that mixin that serves fine-tunes by name.

Matrices (linear, embedding, tied head) become a `TenantModule`: the base output of the whole
batch, plus each row's own substructures. Rows of a mixed batch are grouped by fine-tune once per
step (`Routing.layout`) into one padded slab per fine-tune; low-rank factors and biases of every
fine-tune run stacked (two `bmm`), so their kernel count does not grow with the fine-tunes.
A mixture of experts' fused expert weights become `experts.TenantExperts`: each fine-tune's changed expert matrices as
parts, run in the experts' loop on its tokens. Modules with other changed parameters (norm weights and biases, routers'
corrections, learned positions, experts of another layout) become `TenantParameters`: each fine-tune's values of them,
held whole and swapped in for its rows; a mixed batch runs an RMS norm once with each row's weight, other modules per
fine-tune on its rows. Checkpoint tensors find their parameters as in a single model (`names.TensorTargets`:
transformers' own checkpoint conversion).
Biases of linear layers are additive substructures (``<module>.tenants.<name>.bias``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import artifact, kernels
from .errors import ArtifactError, CheckpointError, ConfigError
from .experts import TenantExperts, expert_deltas, holds_experts, interface, runs_experts
from .inject import merged_values, off_text_path, target_parameter, wrappable
from .names import Target, TensorTargets
from .parts import DeltaOps, QuantPart, TensorDelta, run_split
from .parts.ops import LazyWeight, embedding_scale, runs_direct, weights_loaded
from .parts.quant import kernel_base, kernel_parts

Names = str | Sequence[str] | None
IDENTITY_ROWS = 1024  # rows of the identity (or row ids) a weight read outside its module's forward is built from at a time


class Routing:
    """Which fine-tunes apply to which batch rows; shared by every tenant module of one model."""

    def __init__(self) -> None:
        self.active: tuple[str, ...] = ()
        self.rows: tuple[str | None, ...] | None = None
        self._caches: dict[tuple, dict[tuple, object]] = {}  # forms derived from the routing, by its state

    @contextlib.contextmanager
    def per_row(self, rows: Sequence[str | None] | None) -> Iterator[None]:
        """Route row i of the batch to fine-tune rows[i] (None: the base alone) for a while."""
        saved = self.rows
        self.rows = None if rows is None else tuple(rows)
        try:
            yield
        finally:
            self.rows = saved

    @property
    def state(self) -> tuple:
        """What decides the routing: (per-row fine-tunes, active fine-tunes); equal states route alike."""
        return self.rows, self.active

    @contextlib.contextmanager
    def only(self, names: tuple[str, ...]) -> Iterator[None]:
        """Route every row to `names` for a while: a module running one fine-tune's rows of a mixed batch runs the
        modules inside it with that fine-tune, whatever their inputs' rows."""
        saved = self.rows, self.active
        self.rows, self.active = None, tuple(names)
        try:
            yield
        finally:
            self.rows, self.active = saved

    def _memo(self) -> dict[tuple, object]:
        """Forms derived from the routing, kept while it routes alike (a generate() call's steps, and the next call
        with the same rows; a few states at once, as `only` switches within a step)."""
        state = self.state
        if state not in self._caches and len(self._caches) >= 16:
            self._caches.clear()
        return self._caches.setdefault(state, {})

    def groups_for(self, tenants: nn.ModuleDict, batch: int, device: torch.device) -> list[tuple[tuple[str, ...], torch.Tensor | None]]:
        """The `groups` naming one of `tenants`' fine-tunes (a module's own view)."""
        held = tenants._modules.keys()
        if self.rows is None:
            return [(self.active, None)] if not held.isdisjoint(self.active) else []
        cache, key = self._memo(), ("for", id(tenants), len(held), batch, device)
        if key not in cache:
            cache[key] = [(n, idx) for n, idx in self.groups(batch, device) if not held.isdisjoint(n)]
        return cache[key]

    def groups(self, batch: int, device: torch.device) -> list[tuple[tuple[str, ...], torch.Tensor | None]]:
        """(fine-tunes, row indices or None for all rows) for a batch of `batch` rows."""
        if self.rows is None:
            return [(self.active, None)] if self.active else []
        cache, key = self._memo(), (batch, device)
        if key not in cache:
            if batch % len(self.rows):
                raise ConfigError(f"decomposed_names has {len(self.rows)} entries for a batch of {batch} rows")
            repeat = batch // len(self.rows)  # generate() repeats each row for beams / num_return_sequences
            rows = [i for i, name in enumerate(self.rows) for _ in range(repeat)]
            by_name: dict[str, list[int]] = defaultdict(list)
            for i, row in enumerate(rows):
                if self.rows[row] is not None:
                    by_name[self.rows[row]].append(i)
            cache[key] = [((name,), None if len(idx) == batch else torch.tensor(idx, device=device)) for name, idx in by_name.items()]
        return cache[key]

    def read_outside(self, tenants: nn.ModuleDict, changes: Callable[[str], bool], what: str) -> tuple[str, ...]:
        """The routed fine-tunes among `tenants` that `changes` a parameter code reads outside its module's forward
        (`what` it is, said in the refusal): one selection for every row, or none; a batch mixing fine-tunes that change
        it is refused."""
        rows = self.rows
        groups = self.groups_for(tenants, len(rows) if rows is not None else 1, torch.device("cpu"))
        names = tuple(n for group, _ in groups for n in group if n in tenants and changes(n))
        if names and groups[0][1] is not None:
            raise ConfigError(f"{what}, so a batch mixing fine-tunes that change it cannot run it row by row: give every row the same fine-tunes")
        return names

    def row_groups(self, batch: int, device: torch.device) -> torch.Tensor:
        """``(batch,)``: each row's group in `groups` plus one, 0 for rows of the base alone."""
        cache, key = self._memo(), ("row_groups", batch, device)
        if key not in cache:
            which = torch.zeros(batch, dtype=torch.long)
            for g, (_, idx) in enumerate(self.groups(batch, device)):
                which[slice(None) if idx is None else idx.cpu()] = g + 1
            cache[key] = which.to(device)
        return cache[key]

    def tenant_rows(self, names: tuple[str, ...], batch: int) -> torch.Tensor:
        """``(batch,)``: each row's fine-tune as its index in `names` plus one, 0 for rows of the base alone."""
        cache, key = self._memo(), ("tenant_rows", names, batch)
        if key not in cache:
            index = torch.zeros(batch, dtype=torch.long)
            for name, idx in self.groups(batch, torch.device("cpu")):
                if name[0] in names:
                    index[slice(None) if idx is None else idx] = names.index(name[0]) + 1
            cache[key] = index
        return cache[key]

    def layout(self, names: tuple[str, ...], batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
        """Rows padded into one slab of M per fine-tune of `names`: (gather ``(T * M,)`` row of each slot,
        positions of the used slots, their rows, rows used per fine-tune). Padding repeats row 0, unused.
        Where the fine-tunes cover every row, the positions are in row order and the rows None."""
        cache, key = self._memo(), (names, batch, device)
        if key not in cache:
            where: dict[str, list[int]] = {n: [] for n in names}
            for name, idx in self.groups(batch, device):
                if name[0] in where:
                    where[name[0]] = list(range(batch)) if idx is None else idx.tolist()
            m = max(1, *map(len, where.values()))
            gather = [r for n in names for r in where[n] + [0] * (m - len(where[n]))]
            pos = [t * m + i for t, n in enumerate(names) for i in range(len(where[n]))]
            rows = [r for n in names for r in where[n]]
            used = tuple(len(where[n]) for n in names)
            every_row = sorted(rows) == list(range(batch))
            if every_row:
                pos = [p for _, p in sorted(zip(rows, pos))]
            gather_t, pos_t, rows_t = (torch.tensor(v, dtype=torch.long, device=device) for v in (gather, pos, rows))
            cache[key] = (gather_t, pos_t, None if every_row else rows_t, used)
        return cache[key]


class _Stacked:
    """The tenants of one module in batched form: low-rank factors zero-padded to one rank and
    stacked (two `bmm`), biases stacked; the other parts run per fine-tune on its slab of rows. Each
    fine-tune's own factors and biases then become views of the stacks, so they are held once.

    Low-bit codes stay per fine-tune. Where every fine-tune's parts are low rank and codes the compiled kernel runs
    and the base is a float32 linear layer on CPU, `in_kernel` runs the base once with each row's own parts in one
    kernel call; otherwise each fine-tune's codes go through its fused kernel (with PyTorch's int4 kernel, one call over all
    fine-tunes' codes stacked, every row times every fine-tune, took 2.5 ms against 0.77 ms for eight calls of one row
    each: 8 fine-tunes of 1536 x 576, 3-bit group 64, CPU, one thread)."""

    def __init__(self, tenants: list[DeltaOps], device: torch.device):
        lowrank = [t.lowrank if _stackable(t, "lowrank", device) else None for t in tenants]
        self.u = self.v = self.bias = None
        if any(p is not None for p in lowrank):
            shape = next(p for p in lowrank if p is not None).shape
            rank = max(p.u.shape[1] for p in lowrank if p is not None)
            dtype = next(p for p in lowrank if p is not None).u.dtype
            if next(p for p in lowrank if p is not None).u.is_contiguous():  # an embedding's: its rows are looked up
                self.u = torch.zeros(len(tenants), shape[0], rank, dtype=dtype, device=device)
            else:  # laid out as `LowRankPart.runtime` lays u out: the second bmm reads row-major operands
                self.u = torch.zeros(len(tenants), rank, shape[0], dtype=dtype, device=device).transpose(1, 2)
            self.v = torch.zeros(len(tenants), rank, shape[1], dtype=dtype, device=device)
            for t, p in enumerate(lowrank):
                if p is not None:  # the fine-tune's own factors become views of the stack: held once
                    r = p.u.shape[1]
                    self.u[t, :, :r], self.v[t, :r] = p.u, p.v
                    p.u, p.v = self.u[t, :, :r], self.v[t, :r]
        biases = [t.bias if _stackable(t, "bias", device) else None for t in tenants]
        if any(b is not None for b in biases):
            ref = next(b.bias for b in biases if b is not None)
            self.bias = torch.stack([torch.zeros_like(ref) if b is None else b.bias for b in biases])
            for t, b in enumerate(biases):
                if b is not None:
                    b.bias = self.bias[t]
        stacked = [(lowrank[t] is not None, biases[t] is not None) for t in range(len(tenants))]
        self.rest = [[p for name, p in t.named_children() if not (name == "lowrank" and s[0] or name == "bias" and s[1])]
                     for t, s in zip(tenants, stacked)]  # fmt: skip
        self.shape = next(p.shape for t in tenants for p in t.children() if len(p.shape) == 2)
        self.dtype = next(b.dtype for t in tenants for b in t.buffers() if b.is_floating_point())
        parts = [t.parts() for t in tenants]  # each fine-tune's, after stacking (its factors are views of the stacks)
        self.flat = [p for ps in parts for p in ps]
        kernel = [kernel_parts(ps) for ps in parts]
        self.table = kernels.codes_table(kernel) if all(k is not None for k in kernel) else None  # see `in_kernel`
        self.rank = 0 if self.table is None else kernels.table_rank(self.table)

    def in_kernel(self, base: nn.Module, x: torch.Tensor, tenant_rows: torch.Tensor) -> torch.Tensor | None:
        """``base(x)`` plus each row's own fine-tune's parts in one call of the compiled kernel (Punica's grouped
        layout: the base read once), where every fine-tune's parts are ones it runs (`parts.quant.kernel_parts`: low
        rank and codes, float32 on CPU) beside a base it runs (`parts.quant.kernel_base`), nothing hooked; else None."""
        weights = None if self.table is None else kernel_base(base, x)
        if weights is None or not runs_direct(base, *self.flat):
            return None
        flat = x.reshape(-1, x.shape[-1])
        return kernels.rows_codes_matmul(flat, *weights, self.table, tenant_rows, self.rank).view(*x.shape[:-1], -1)

    def __call__(self, x: torch.Tensor, lookup: bool, used: tuple[int, ...]) -> torch.Tensor | None:
        """Contributions ``(T, M, ...)`` of each fine-tune to its slab ``x[t]`` of M rows (`used[t]` of them real), None
        where there are none."""
        out = None
        if self.u is not None:
            if lookup:  # each fine-tune's rows of u, then one bmm with v
                ids = x + torch.arange(x.shape[0], device=x.device).view(-1, *[1] * (x.dim() - 1)) * self.u.shape[1]
                rows = F.embedding(ids.flatten(1), self.u.flatten(0, 1))
                out = torch.bmm(rows, self.v).view(*x.shape, -1)
            else:
                flat = x.flatten(1, -2)
                out = torch.bmm(torch.bmm(flat, _cast(self.v, x.dtype).transpose(1, 2)), _cast(self.u, x.dtype).transpose(1, 2))
                out = out.view(*x.shape[:-1], -1)
        if any(self.rest):
            rest = self._fused_rest(x, used) if not lookup and self._fused(x) else \
                torch.stack([self._rest(parts if used[t] else [], x[t], lookup) for t, parts in enumerate(self.rest)])
            out = rest if out is None else out + rest
        if self.bias is not None:
            bias = _cast(self.bias, x.dtype).view(self.bias.shape[0], *[1] * (x.dim() - 2), -1)
            out = bias.expand(*x.shape[:-1], -1) if out is None else out + bias
        return out

    def _fused(self, x: torch.Tensor) -> bool:
        """Every fine-tune's other parts are one low-bit part that runs through a fused kernel (annealing's layout)."""
        return all(len(parts) == 1 and isinstance(parts[0], QuantPart) and parts[0].fused(x) for parts in self.rest)

    def _fused_rest(self, x: torch.Tensor, used: tuple[int, ...]) -> torch.Tensor:
        """The low-bit parts' contributions, each fine-tune's rows through its fused kernel."""
        flat = x.flatten(1, -2)
        out = [parts[0].matmul(flat[t]) if used[t] else flat.new_zeros(flat.shape[1], self.shape[0]) for t, parts in enumerate(self.rest)]
        return torch.stack(out).view(*x.shape[:-1], self.shape[0])

    def _rest(self, parts: list[nn.Module], x: torch.Tensor, lookup: bool) -> torch.Tensor:
        if not parts:  # this fine-tune has none of the looped kinds
            return x.new_zeros(*x.shape, self.shape[1], dtype=self.dtype) if lookup else x.new_zeros(*x.shape[:-1], self.shape[0])
        out = parts[0](x, lookup)
        for p in parts[1:]:
            out = out + p(x, lookup)
        return out


def _changes(ops: DeltaOps, attr: str) -> bool:
    """Whether a fine-tune's parts change the module's `attr` (its bias, or its weight)."""
    return any((kind == "bias") == (attr == "bias") for kind in ops._modules)


def _stackable(ops: DeltaOps, part: str, device: torch.device) -> bool:
    """A part that can join the stack: resident on the module's device, not placed by Accelerate."""
    p = getattr(ops, part, None)
    return p is not None and "_hf_hook" not in p.__dict__ and all(b.device == device for b in p.buffers())


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class TenantModule(nn.Module):
    """A shared base matrix module plus per-fine-tune substructures (``tenants.<name>.<part>``)."""

    def __init__(self, base: nn.Module, routing: Routing, name: str, tied: TenantModule | None = None):
        super().__init__()
        self.base = base
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_read", {})  # weight, bias: (the fine-tunes and the count held, their value) of the last read
        if tied is not None:  # a tied head runs its embedding's parts, registered there only
            object.__setattr__(self, "tenants", tied.tenants)
        else:
            self.tenants = nn.ModuleDict()
        object.__setattr__(self, "routing", routing)
        object.__setattr__(self, "_tied", tied)
        self.lookup = isinstance(base, nn.Embedding)
        self.parallel = "auto"
        object.__setattr__(self, "_batched", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = embedding_scale(self.base) if self.lookup else None  # Gemma's scaled embeddings
        batch = x.shape[0]
        if self.routing.rows is not None and batch == 1 < len(self.routing.rows):  # one input for every row (position ids)
            batch = len(self.routing.rows)
        groups = self.routing.groups_for(self.tenants, batch, x.device)
        if not groups:
            return self.base(x)
        x = x.expand(batch, *x.shape[1:])
        if groups[0][1] is None:  # one selection for the whole batch: the split path
            parts = [p for t in groups[0][0] if t in self.tenants for p in self.tenants[t].parts()]
            return run_split(self.base, parts, x, self.lookup, scale, self.parallel)
        names, stacked = self._stacked(x.device)
        y = None if self.lookup else stacked.in_kernel(self.base, x, self.routing.tenant_rows(names, batch))
        if y is not None:
            return y
        y = self.base(x)  # every row's base output, then every fine-tune's parts in batched kernels
        gather, pos, rows, used = self.routing.layout(names, batch, x.device)
        slabs = x.index_select(0, gather).unflatten(0, (len(names), -1))
        c = stacked(slabs, self.lookup, used)
        if c is None:
            return y
        c = c.flatten(0, 1).index_select(0, pos).to(y.dtype)
        c = c * scale.to(c.dtype) if scale is not None else c
        if rows is None:  # every row has its fine-tune: contributions gathered in row order (the scatter was 7% of a step)
            return y + c
        return y.index_put((rows,), c, accumulate=True)  # (index_add is slow on a busy CPU)

    def _stacked(self, device: torch.device) -> tuple[tuple[str, ...], _Stacked]:
        """The fine-tunes' names and their batched form (fine-tunes are only ever added: their count tells them apart)."""
        if self._tied is not None:  # one stack of the shared parts
            return self._tied._stacked(device)
        key = (len(self.tenants._modules), device)
        if self._batched is None or self._batched[0] != key:
            object.__setattr__(self, "_batched", (key, (tuple(self.tenants), _Stacked(list(self.tenants.values()), device))))
        return self._batched[1]

    @property
    def weight(self) -> torch.Tensor:
        """The weight the routed fine-tunes run, for code that reads it outside the module's forward (`LazyWeight`: built
        where an operation uses it, the last selection's held)."""
        return LazyWeight(self.base.weight, lambda: self._routed("weight"))

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias the routed fine-tunes run, for code that reads it outside the module's forward (Jamba's
        ``dt_proj(x) - dt_proj.bias``)."""
        bias = getattr(self.base, "bias", None)
        return None if bias is None else LazyWeight(bias, lambda: self._routed("bias"))

    def _routed(self, attr: str) -> torch.Tensor:
        """`attr` (weight or bias) as the routed fine-tunes run it; refused by name for a batch mixing fine-tunes that
        change it."""
        names = self.routing.read_outside(self.tenants, lambda n: _changes(self.tenants[n], attr), f"{self.name}.{attr} is read by another module")
        if not names:
            return getattr(self.base, attr)
        key = (names, len(self.tenants._modules))
        if self._read.get(attr, (None,))[0] != key:
            self._read.pop(attr, None)
            with weights_loaded(self.base, self.tenants):
                self._read[attr] = (key, self._merged(attr, names))
        return self._read[attr][1]

    def _merged(self, attr: str, names: tuple[str, ...]) -> torch.Tensor:
        """The base's `attr` plus `names`' deltas of it as their parts run, in float32, rounded once to its dtype: a bias's
        delta; a weight's, each part's contribution to row ids (an embedding) or to rows of the identity (a linear layer:
        the transpose), `IDENTITY_ROWS` at a time."""
        value = getattr(self.base, attr)
        delta = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        if attr == "bias":
            for name in names:
                delta += self.tenants[name].bias.bias.float().to(value.device)
            return (value.float() + delta).to(value.dtype)
        n = value.shape[0] if self.lookup else value.shape[1]
        for start in range(0, n, IDENTITY_ROWS):
            stop = min(start + IDENTITY_ROWS, n)
            if self.lookup:
                x = torch.arange(start, stop, device=value.device)
            else:
                x = torch.zeros(stop - start, n, device=value.device)
                x[:, start:stop].fill_diagonal_(1)
            for name in names:
                for kind, part in self.tenants[name].named_children():
                    if kind != "bias":
                        c = part(x, self.lookup).float().to(value.device)
                        if self.lookup:
                            delta[start:stop] += c
                        else:
                            delta[:, start:stop] += c.T
        return (value.float() + delta).to(value.dtype)

    def _apply(self, fn, recurse=True):  # a move or a cast restacks lazily
        object.__setattr__(self, "_batched", None)
        self._read.clear()
        return super()._apply(fn, recurse)


class TenantParameters(nn.Module):
    """A module whose own parameters differ per fine-tune (norm weights, biases, fused expert weights, learned
    positions): each fine-tune's values of the changed ones, held whole (``tenants.<name>.<attr>``) and swapped in.

    Rows that share one selection of fine-tunes run the module once with theirs (several: their deltas add up). A
    mixed batch runs a module called on one tensor with 1-D parameters (an RMS norm: ``weight * x``) once with each
    row's own, checked once against a run per fine-tune (bit for bit); any other module once per fine-tune on its
    rows, where every tensor it is called with has the rows first (a mixture of experts gets the batch's tokens in
    row order, each row's as many); a module called with anything else (attention, with its cache) refuses a mixed
    batch by name."""

    def __init__(self, base: nn.Module, routing: Routing, name: str):
        super().__init__()
        self.base = base
        self.tenants = nn.ModuleDict()
        object.__setattr__(self, "routing", routing)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_combined", {})
        object.__setattr__(self, "_rows", None)  # (routing state, source tensors and versions, per-row vectors) of the last mixed batch
        object.__setattr__(self, "_per_row", None)  # whether per-row vectors give each fine-tune's output: checked once

    def __getattr__(self, name: str):
        """The base module's attributes; a parameter read by another module (a convolution's weight that its parent
        passes to a kernel) is the routed fine-tunes' value (offloaded by Accelerate: a copy, loaded), and a method its
        parent calls (Gemma 3n's AltUp `predict`, `correct`) runs with them (`_method`)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules["base"]
            if name not in base._parameters:
                value = getattr(base, name)
                return functools.partial(self._method, name) if inspect.ismethod(value) and value.__self__ is base else value
        names = self.routing.read_outside(self.tenants, lambda n: True, f"{self.name}.{name} is read by another module")

        def routed() -> torch.Tensor | None:
            return self._params(names).get(name, base._parameters[name]) if names else base._parameters[name]

        value = routed()
        if value is None or value.device.type != "meta":
            return value
        with weights_loaded(base, self.tenants):  # the parent's hook loads its own weights only, not this module's
            return routed().detach().clone()

    def __setattr__(self, name: str, value) -> None:
        """State the base module holds as a plain tensor attribute (or None), written by its parent, is the base's
        (RecurrentGemma resets its recurrence's state at the start of each generation: written on this wrapper, the base
        kept the last one, and a batch of another size failed)."""
        base = self.__dict__.get("_modules", {}).get("base")
        if base is not None and name in vars(base) and _is_state(vars(base)[name]) and _is_state(value) and not isinstance(value, nn.Parameter):
            setattr(base, name, value)
        else:
            super().__setattr__(name, value)

    def _method(self, method: str, *args, **kwargs):
        """The base module's `method`, called outside its forward, run with the routed fine-tunes' parameters (before, with
        the base's: Gemma 3n by name off by 2e-2, silently); refused by name for a batch mixing fine-tunes that change them."""
        names = self.routing.read_outside(self.tenants, lambda n: True, f"{self.name}.{method}() is called outside its module's forward")
        base = self._modules["base"]
        with weights_loaded(base, self.tenants), _swapped(base, self._params(names) if names else {}), _unhooked(base):
            return getattr(base, method)(*args, **kwargs)

    def add(self, name: str, values: dict[str, torch.Tensor]) -> None:
        """Fine-tune `name`'s values of the base module's parameters named in `values` (whole tensors)."""
        self.tenants[name] = nn.ParameterDict({attr: nn.Parameter(v, requires_grad=False) for attr, v in values.items()})
        self._combined.clear()

    def _apply(self, fn, recurse=True):  # a move or a cast gathers the per-row vectors and the sums again
        object.__setattr__(self, "_rows", None)
        self._combined.clear()
        return super()._apply(fn, recurse)

    def _params(self, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The parameters that `names` change, as they run: one fine-tune's own, or several's deltas added up."""
        names = tuple(n for n in names if n in self.tenants)
        if len(names) == 1:
            return dict(self.tenants[names[0]].items())
        if names not in self._combined:
            attrs = dict.fromkeys(a for n in names for a in self.tenants[n].keys())
            base = {a: getattr(self.base, a).detach() for a in attrs}
            self._combined[names] = {a: base[a] + sum(self.tenants[n][a].detach() - base[a] for n in names if a in self.tenants[n]) for a in attrs}
        return self._combined[names]

    def forward(self, *args, **kwargs):
        x = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
        groups = self.routing.groups_for(self.tenants, x.shape[0], x.device)
        if not groups:
            return self.base(*args, **kwargs)
        with weights_loaded(self.base, self.tenants):  # the base's and each fine-tune's values, offloaded with the layer, where they run
            return self._forward(groups, x, args, kwargs)

    def _forward(self, groups, x: torch.Tensor, args: tuple, kwargs: dict):
        if groups[0][1] is None:
            return _call_with(self.base, self._params(groups[0][0]), *args, **kwargs)
        y = self._rowwise(args[0]) if self._per_row is not False and len(args) == 1 and not kwargs else None
        return y if y is not None else self._per_copy(groups, x.shape[0], args, kwargs)

    def _per_copy(self, groups: list[tuple[tuple[str, ...], torch.Tensor]], batch: int, args: tuple, kwargs: dict):
        """The base's output for every row of `batch`, each fine-tune's rows run again with its parameters."""
        if holds_experts(self.base) and not runs_experts(self.base):  # e.g. dense experts held whole: every token once per expert
            raise ConfigError(f"{self.name} ({type(self.base).__name__}) runs experts outside transformers' experts interface, on inputs not "
                              "known to be in row order, so a batch mixing fine-tunes that change them cannot run it row by row: give every "
                              "row the same fine-tunes")
        unsplit = [k for k, v in (*enumerate(args), *kwargs.items()) if not (isinstance(v, torch.Tensor) and v.dim() and v.shape[0] in (1, batch))
                   and not (v is None or isinstance(v, (bool, int, float, str)))]  # fmt: skip
        if unsplit:
            raise ConfigError(f"{self.name} ({type(self.base).__name__}) is called with more than its rows ({unsplit}), so a batch mixing "
                              "fine-tunes that change its parameters cannot run it row by row: give every row the same fine-tunes")
        held = _state(self.base)
        y = _call_with(self.base, {}, *args, **kwargs)
        if kept := [name for name, t in _state(self.base).items() if held.get(name) is not t]:
            raise ConfigError(f"{self.name} ({type(self.base).__name__}) keeps state between calls ({kept}), so a batch mixing fine-tunes "
                              "that change its parameters cannot run it row by row: give every row the same fine-tunes")
        for names, idx in groups:
            def rows(v):  # a tensor of one row is every row's (position ids)
                return v.index_select(0, idx) if isinstance(v, torch.Tensor) and v.shape[0] == batch else v

            with self.routing.only(names):
                part = _call_with(self.base, self._params(names), *map(rows, args), **{k: rows(v) for k, v in kwargs.items()})
            y = _put_rows(y, part, idx, batch, f"{self.name} ({type(self.base).__name__})")
        return y

    def _rowwise(self, x: torch.Tensor) -> torch.Tensor | None:
        """The module run once with every row's vectors ``(rows, 1.., dim)``; None where it does not take them. The
        per-row vectors are gathered once per routing, batch and device (the same rows step after step), again where a
        source parameter was replaced or changed in place, and per call where a gradient flows."""
        key = (self.routing.state, len(self.tenants._modules), x.shape[0], x.dim(), x.device)
        memo = self._rows
        if memo is None or memo[0] != key or torch.is_grad_enabled() and memo[3] or not all(
                owner.get(a) is t and t._version == v for owner, a, t, v in memo[1]):  # fmt: skip
            memo = self._gather(x, key)
            if memo is None:
                return None
        try:
            y = _call_with(self.base, memo[2], x)
        except (RuntimeError, ValueError):
            y = None
        if self._per_row is None:  # the first mixed batch: per-row vectors must give what each fine-tune's run gives
            groups = self.routing.groups_for(self.tenants, x.shape[0], x.device)
            object.__setattr__(self, "_per_row", y is not None and torch.equal(y, self._per_copy(groups, x.shape[0], (x,), {})))
        return y if self._per_row else None

    def _gather(self, x: torch.Tensor, key: tuple) -> tuple | None:
        """(key, sources: (parameters dict, name, tensor, version), per-row vectors, whether a gradient may flow),
        kept where none may; None where the module's parameters are not all 1-D."""
        attrs = [a for a, _ in self.base.named_parameters(recurse=False)]
        if not attrs or any(getattr(self.base, a).dim() != 1 for a in attrs):
            object.__setattr__(self, "_per_row", False)
            return None
        groups = self.routing.groups(x.shape[0], x.device)
        held = self.tenants._modules.keys()
        changed = [{}, *(self._params(n) if not held.isdisjoint(n) else {} for n, _ in groups)]
        shape = (x.shape[0], *[1] * (x.dim() - 2), -1)
        which = self.routing.row_groups(x.shape[0], x.device)
        params = {a: torch.stack([c.get(a, getattr(self.base, a)) for c in changed]).index_select(0, which).view(shape) for a in attrs}
        owners = [self.base._parameters, *(self.tenants[n]._parameters for n in held)]
        sources = [(o, a, t, t._version) for o in owners for a, t in o.items() if a in attrs]
        grad = any(t.requires_grad for _, _, t, _ in sources)
        memo = (key, sources, params, grad)
        object.__setattr__(self, "_rows", None if grad and torch.is_grad_enabled() else memo)
        return memo


def _put_rows(y, part, idx: torch.Tensor, batch: int, name: str):
    """`y` (a tensor or a tuple of them) with rows `idx` of `batch` replaced by `part`'s. An output of several entries a
    row (a router's logits of the rows' tokens, flattened) holds each row's together, in order."""
    if not isinstance(y, torch.Tensor):
        return type(y)(_put_rows(a, b, idx, batch, name) for a, b in zip(y, part))
    each = y.shape[0] // batch if y.dim() else 0
    if not each or y.shape[0] != each * batch or part.shape[0] != each * idx.numel():
        raise ConfigError(f"{name}: an output of shape {tuple(y.shape)} has no rows of a batch of {batch}, so a batch mixing fine-tunes that "
                          "change its parameters cannot run it row by row: give every row the same fine-tunes")
    if each > 1:
        idx = (idx[:, None] * each + torch.arange(each, device=idx.device)).flatten()
    return y.index_copy(0, idx, part.to(y.dtype))


def _is_state(value) -> bool:
    return value is None or isinstance(value, torch.Tensor)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors `module` and its submodules hold as plain attributes (not parameters or buffers): a recurrent layer's
    state between calls (RecurrentGemma's ``recurrent_states``), which a run per fine-tune on some rows would overwrite."""
    return {f"{name}.{k}".lstrip("."): v for name, m in module.named_modules() for k, v in vars(m).items() if isinstance(v, torch.Tensor)}


def _call_with(module: nn.Module, params: dict[str, torch.Tensor], *args, **kwargs):
    """``module(*args, **kwargs)`` with `params` in place of some of its own parameters (`torch.func.functional_call`;
    outside `torch.compile` by swapping them in and back, which took a tenth of its time)."""
    if torch.compiler.is_compiling():
        return torch.func.functional_call(module, params, args, kwargs)
    # placed by Accelerate: the weights are loaded by the caller (`weights_loaded`), and the hook would load the base's
    # over `params`, so the forward it wraps runs
    forward = module._old_forward if "_hf_hook" in module.__dict__ else module
    with _swapped(module, params):
        return forward(*args, **kwargs)


@contextlib.contextmanager
def _unhooked(module: nn.Module) -> Iterator[None]:
    """`module.forward` without its Accelerate hook for a while, for its own methods that call it (the hook would load
    the base's values over those swapped in; the caller loads the weights, `weights_loaded`)."""
    if "_hf_hook" not in module.__dict__:
        yield
        return
    hooked = module.forward
    module.forward = module._old_forward
    try:
        yield
    finally:
        module.forward = hooked


@contextlib.contextmanager
def _swapped(module: nn.Module, params: dict[str, torch.Tensor]) -> Iterator[None]:
    """`module` with `params` in place of some of its own parameters for a while."""
    own = {name: module._parameters[name] for name in params}
    try:
        module._parameters.update(params)
        yield
    finally:
        module._parameters.update(own)


class Tenancy:
    """What a model serving fine-tunes by name keeps beside its modules (``model.tenancy``)."""

    def __init__(self, model: nn.Module, base_sha256: dict[str, str]):
        self.base_sha256 = base_sha256
        self.routing = Routing()
        self.names: list[str] = []
        self.targets = TensorTargets(model)  # as loaded, before wrapping
        self.owners = dict(model.named_modules())
        self.off_text = off_text_path(model)  # modules run on images (a vision tower): their inputs are not the batch's rows
        self.wrappers: dict[str, nn.Module] = {}


class MultiTenant:
    """Many fine-tunes over one base, mixed into `DecomposedModel` (see the module docstring).

    A model made by `DecomposedModel.from_base` (or ``from_pretrained({name: artifact})``) holds the
    base alone; each `load_decomposed` adds a fine-tune's substructures under a name."""

    tenancy: Tenancy | None = None

    @property
    def decomposed_names(self) -> list[str]:
        """The fine-tunes loaded by name."""
        return list(self.tenancy.names) if self.tenancy is not None else []

    def load_decomposed(self, name: str, directory: str | Path):
        """Add the fine-tune saved in an artifact directory under `name`."""
        index, deltas = artifact.load(directory)
        if index["base_model"]["sha256"] != self._tenants().base_sha256:
            raise ArtifactError(f"{directory} was decomposed against another base ({index['base_model']['id']}) than this model's")
        return self.add_decomposed(name, deltas)

    def add_decomposed(self, name: str, deltas: dict[str, TensorDelta]):
        """Add a fine-tune given as its deltas (e.g. ``decompose(...).deltas``) under `name`."""
        t = self._tenants()
        if name in t.names or not name or "." in name:
            raise ConfigError(f"fine-tune name {name!r} is taken or invalid (non-empty, no dots)")
        if getattr(self, "hf_device_map", None) is not None:
            raise ConfigError("load every fine-tune before placing the model on devices")
        for owner_name, attrs in self._by_owner(deltas).items():
            owner = t.owners[owner_name]
            whole = all(len(found) == 1 and found[0][1].strides is None for found in attrs.values())
            layout = interface(owner)
            experts = expert_deltas(layout, attrs) if layout is not None and not isinstance(t.wrappers.get(owner_name), TenantParameters) else None
            if wrappable(owner) and whole and set(attrs) <= {"weight", "bias"}:
                self._wrap(owner_name, TenantModule(owner, t.routing, owner_name)).tenants[name] = _ops(owner, {a: f[0][0] for a, f in attrs.items()})
            elif experts is not None:  # a mixture of experts' fused weights: each changed expert's parts
                self._wrap(owner_name, TenantExperts(owner, t.routing, owner_name)).tenants[name] = experts
            else:
                self._wrap(owner_name, TenantParameters(owner, t.routing, owner_name)).add(name, merged_values(owner, attrs))
        tied = self._tied_head()
        if tied is not None and tied[1] in t.wrappers and tied[0] not in t.wrappers:
            self._wrap(tied[0], TenantModule(t.owners[tied[0]], t.routing, tied[0], tied=t.wrappers[tied[1]]))
        t.names.append(name)
        return self

    def set_active(self, names: Names):
        """Apply these fine-tunes to every row (None or []: the base alone)."""
        names = [names] if isinstance(names, str) else list(names or [])
        self._check_names(names)
        self._tenants().routing.active = tuple(names)
        return self

    def generate(self, *args, decomposed_names: Sequence[str | None] | None = None, **kwargs):
        """`generate`, with an optional fine-tune per batch row (``decomposed_names``; None: the base)."""
        with self._rows(decomposed_names):
            return super().generate(*args, **kwargs)

    def restack(self) -> None:
        """Forget the batched forms of the tenants (after a move or a placement): rebuilt on the next step."""
        for module in self.modules():
            if isinstance(module, TenantModule):
                object.__setattr__(module, "_batched", None)

    # -- internals ---------------------------------------------------------------------------------
    def _tenants(self) -> Tenancy:
        if self.tenancy is None:
            raise ConfigError(
                "this model runs its own fine-tune; to serve several by name, load them over their base: "
                "DecomposedModel.from_pretrained({name: artifact, ...}) or DecomposedModel.from_base(base)"
            )
        return self.tenancy

    def _check_names(self, names: Sequence[str | None]) -> None:
        known = self.decomposed_names
        unknown = sorted({n for n in names if n is not None and n not in known})
        if unknown:
            raise ConfigError(f"unknown fine-tune(s) {unknown}; loaded: {known}")

    def _rows(self, names: Sequence[str | None] | None) -> contextlib.AbstractContextManager:
        if names is None:
            return contextlib.nullcontext()
        self._check_names(names)
        return self._tenants().routing.per_row(names)

    def _by_owner(self, deltas: dict[str, TensorDelta]) -> dict[str, dict[str, list[tuple[TensorDelta, Target]]]]:
        """Each changed tensor's delta and where it lives, by owner module and parameter (several for a fused one)."""
        t, tied = self.tenancy, self._tied_head()
        out: dict[str, dict[str, list[tuple[TensorDelta, Target]]]] = defaultdict(lambda: defaultdict(list))
        names = list(deltas)
        for key, delta in deltas.items():
            if delta.is_empty() or (tied is not None and key.endswith("lm_head.weight")):
                continue  # a tied head's delta is its embedding's
            try:
                target = target_parameter(key, names, self, t.targets)
            except CheckpointError:
                raise ArtifactError(f"tensor {key!r} has no matching parameter in {type(self).__name__}") from None
            shape = tuple(t.targets.params[target.parameter].shape) if target.strides is None else target.shape
            if math.prod(delta.shape) != math.prod(shape):
                raise ArtifactError(f"tensor {key!r}: delta shape {delta.shape} does not fit the base's {shape}")
            owner, _, attr = target.parameter.rpartition(".")
            out[owner][attr].append((delta, target))
        return out

    def _tied_head(self) -> tuple[str, str] | None:
        """(head name, embedding name) when the head's weight is the embedding's."""
        embed, head = self.get_input_embeddings(), self.get_output_embeddings()
        base_embed = embed.base if isinstance(embed, TenantModule) else embed
        base_head = head.base if isinstance(head, TenantModule) else head
        if base_head is None or base_head.weight is not base_embed.weight:
            return None
        names = {id(m): n for n, m in self.tenancy.owners.items()}
        return names[id(base_head)], names[id(base_embed)]

    def _wrap(self, owner_name: str, wrapper: nn.Module) -> nn.Module:
        """The wrapper of `owner_name` (`wrapper`, put in its place in the module as loaded, where there is none yet)."""
        t = self.tenancy
        if owner_name not in t.wrappers:
            t.wrappers[owner_name] = wrapper
            parent, _, child = owner_name.rpartition(".")
            setattr(t.owners[parent], child, wrapper)  # the parent as loaded: a wrapped parent runs it
            if owner_name in t.off_text:
                wrapper.register_forward_pre_hook(_refuse_mixed_media)
        if type(t.wrappers[owner_name]) is not type(wrapper):
            raise ArtifactError(f"{owner_name}: this fine-tune's changes need a {type(wrapper).__name__}, the fine-tunes loaded before "
                                f"it a {type(t.wrappers[owner_name]).__name__}")
        return t.wrappers[owner_name]


def _refuse_mixed_media(wrapper: nn.Module, args: tuple) -> None:
    """Refuse a batch mixing fine-tunes that change a module run on images, not on the batch's rows (`off_text_path`):
    its n-th input is the n-th image, whichever row holds it."""
    rows = wrapper.routing.rows
    if rows is not None and any(idx is not None for _, idx in wrapper.routing.groups_for(wrapper.tenants, len(rows), torch.device("cpu"))):
        raise ConfigError(f"{wrapper.name} ({type(wrapper.base).__name__}) runs on the batch's images, not on its rows, so a batch mixing "
                          "fine-tunes that change it cannot run it row by row: give every row the same fine-tunes")


def _ops(owner: nn.Module, attrs: dict[str, TensorDelta]) -> DeltaOps:
    weight = attrs["weight"] if "weight" in attrs else TensorDelta("weight", tuple(owner.weight.shape))
    bias = attrs["bias"].merge(owner.bias.detach()) - owner.bias.detach().float() if "bias" in attrs else None
    return DeltaOps(weight, owner.weight, bias, lookup=isinstance(owner, nn.Embedding)).compact()  # memory per fine-tune is what serving many pays for


def routed(forward):
    """`forward` taking ``decomposed_names`` (a fine-tune per batch row); its signature stays the original's."""

    @functools.wraps(forward)
    def call(self, *args, decomposed_names: Sequence[str | None] | None = None, **kwargs):
        if decomposed_names is None:
            return forward(self, *args, **kwargs)
        with self._rows(decomposed_names):
            return forward(self, *args, **kwargs)

    return call


class MultiDecomposedModel:
    """Constructors of a `DecomposedModel` serving fine-tunes by name (the one decomposed-model type).

    ``MultiDecomposedModel(model)`` turns a loaded base model into one (in place);
    ``MultiDecomposedModel.from_pretrained({name: artifact})`` is ``DecomposedModel.from_pretrained({name: artifact})``."""

    def __new__(cls, model: nn.Module, base_sha256: dict[str, str] | None = None):
        from .decomposed import serving

        return serving(model, base_sha256 or {})

    @staticmethod
    def from_base(base_model: str | Path, revision: str | None = None, **hub_kwargs):
        from .decomposed import DecomposedModel

        return DecomposedModel.from_base(base_model, revision, **hub_kwargs)

    @staticmethod
    def from_pretrained(artifacts: dict[str, str | Path], base_model: str | Path | None = None, **hub_kwargs):
        from .decomposed import DecomposedModel

        return DecomposedModel.from_pretrained(artifacts, base_model=base_model, **hub_kwargs)
