"""Many fine-tunes over one base: the base is loaded and run once, each fine-tune adds its substructures.

    multi = MultiDecomposedModel.from_pretrained({"poet": "out/poet", "legal": "out/legal"})
    multi.load_decomposed("chat", "out/chat")          # more artifacts of the same base
    multi.set_active("poet")                           # or ["poet", "chat"]: their deltas add up
    multi.generate(**batch, decomposed_names=["poet", "legal", None])   # per row; None is the base

Matrices (linear, embedding, tied head) become a `TenantModule`: the base output of the whole
batch, plus each row's own substructures. Modules with other changed tensors (norm weights and
biases) become `TenantVectors`: a small copy of the module per fine-tune, run on that fine-tune's
rows. Biases of linear layers are additive substructures (``<module>.tenants.<name>.bias``).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from . import artifact
from .checkpoints import CheckpointReader, sha256_files
from .errors import ArtifactError, ConfigError
from .hub import resolve
from .inject import WRAPPABLE, param_name, set_submodule
from .parts import DeltaOps, run_split
from .substructures import TensorDelta

Names = str | Sequence[str] | None


class Routing:
    """Which fine-tunes apply to which batch rows; shared by every tenant module of one model."""

    def __init__(self) -> None:
        self.active: tuple[str, ...] = ()
        self.rows: tuple[str | None, ...] | None = None
        self._cache: dict[tuple[int, torch.device], list[tuple[tuple[str, ...], torch.Tensor | None]]] = {}

    @contextlib.contextmanager
    def per_row(self, rows: Sequence[str | None] | None) -> Iterator[None]:
        """Route row i of the batch to fine-tune rows[i] (None: the base alone) for a while."""
        saved = self.rows
        self.rows, self._cache = (None if rows is None else tuple(rows)), {}
        try:
            yield
        finally:
            self.rows, self._cache = saved, {}

    def groups(self, batch: int, device: torch.device) -> list[tuple[tuple[str, ...], torch.Tensor | None]]:
        """(fine-tunes, row indices or None for all rows) for a batch of `batch` rows."""
        if self.rows is None:
            return [(self.active, None)] if self.active else []
        key = (batch, device)
        if key not in self._cache:
            if batch % len(self.rows):
                raise ConfigError(f"decomposed_names has {len(self.rows)} entries for a batch of {batch} rows")
            repeat = batch // len(self.rows)  # generate() repeats each row for beams / num_return_sequences
            rows = [i for i, name in enumerate(self.rows) for _ in range(repeat)]
            by_name: dict[str, list[int]] = defaultdict(list)
            for i, row in enumerate(rows):
                if self.rows[row] is not None:
                    by_name[self.rows[row]].append(i)
            self._cache[key] = [
                ((name,), None if len(idx) == batch else torch.tensor(idx, device=device)) for name, idx in by_name.items()
            ]
        return self._cache[key]


class TenantModule(nn.Module):
    """A shared base matrix module plus per-fine-tune substructures (``tenants.<name>.<part>``)."""

    def __init__(self, base: nn.Module, routing: Routing, tied: TenantModule | None = None):
        super().__init__()
        self.base = base
        if tied is not None:  # a tied head runs its embedding's parts, registered there only
            object.__setattr__(self, "tenants", tied.tenants)
        else:
            self.tenants = nn.ModuleDict()
        object.__setattr__(self, "routing", routing)
        self.lookup = isinstance(base, nn.Embedding)
        self.parallel = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = getattr(self.base, "embed_scale", None) if self.lookup else None  # Gemma's scaled embeddings
        batch = x.shape[0]
        if self.routing.rows is not None and batch == 1 < len(self.routing.rows):  # one input for every row (position ids)
            batch = len(self.routing.rows)
        groups = [(n, idx) for n, idx in self.routing.groups(batch, x.device) if any(t in self.tenants for t in n)]
        if not groups:
            return self.base(x)
        x = x.expand(batch, *x.shape[1:])
        if groups[0][1] is None:  # one selection for the whole batch: the split path
            parts = [p for t in groups[0][0] if t in self.tenants for p in self.tenants[t].parts()]
            return run_split(self.base, parts, x, self.lookup, scale, self.parallel)
        y = self.base(x)
        for names, idx in groups:  # each group of rows adds its own fine-tune's parts
            rows = x.index_select(0, idx)
            c = sum(self.tenants[t](rows, self.lookup) for t in names if t in self.tenants).to(y.dtype)
            c = c * scale.to(c.dtype) if scale is not None else c
            y = y.index_put((idx,), c, accumulate=True)  # (index_add is slow on a busy CPU)
        return y


class TenantVectors(nn.Module):
    """A module whose vectors (norm weights, biases) differ per fine-tune: a copy per fine-tune."""

    def __init__(self, base: nn.Module, routing: Routing):
        super().__init__()
        self.base = base
        self.tenants = nn.ModuleDict()
        object.__setattr__(self, "routing", routing)
        object.__setattr__(self, "_combined", {})

    def add(self, name: str, deltas: dict[str, TensorDelta]) -> None:
        module = copy.deepcopy(self.base)
        for attr, delta in deltas.items():
            setattr(module, attr, nn.Parameter(delta.merge(getattr(self.base, attr).detach()), requires_grad=False))
        self.tenants[name] = module
        self._combined.clear()

    def _module(self, names: tuple[str, ...]) -> nn.Module:
        names = tuple(n for n in names if n in self.tenants)
        if len(names) == 1:
            return self.tenants[names[0]]
        if names not in self._combined:  # several fine-tunes at once: their vector deltas add up
            module = copy.deepcopy(self.base)
            for attr, base in self.base.named_parameters(recurse=False):
                total = base.detach() + sum(getattr(self.tenants[n], attr).detach() - base.detach() for n in names)
                setattr(module, attr, nn.Parameter(total, requires_grad=False))
            self._combined[names] = module
        return self._combined[names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = [(n, idx) for n, idx in self.routing.groups(x.shape[0], x.device) if any(t in self.tenants for t in n)]
        if not groups:
            return self.base(x)
        if groups[0][1] is None:
            return self._module(groups[0][0])(x)
        y = self.base(x)
        for names, idx in groups:
            y = y.index_copy(0, idx, self._module(names)(x.index_select(0, idx)).to(y.dtype))
        return y


class MultiDecomposedModel(nn.Module):
    """One base model serving several decomposed fine-tunes of it (PEFT's multi-adapter shape)."""

    def __init__(self, model: nn.Module, base_sha256: dict[str, str]):
        super().__init__()
        self.model = model
        self.base_sha256 = base_sha256
        self.routing = Routing()
        self.names: list[str] = []
        object.__setattr__(self, "_params", dict(model.named_parameters()))  # as loaded, before wrapping
        object.__setattr__(self, "_owners", dict(model.named_modules()))
        object.__setattr__(self, "_wrappers", {})

    @classmethod
    def from_base(cls, base_model: str | Path, revision: str | None = None, **hub_kwargs) -> MultiDecomposedModel:
        """The base alone (float32); add fine-tunes with `load_decomposed` / `add_decomposed`."""
        base_dir = resolve(base_model, revision, **hub_kwargs)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        return cls(model, sha256_files(CheckpointReader(base_dir).files))

    @classmethod
    def from_pretrained(cls, artifacts: dict[str, str | Path], base_model: str | Path | None = None, **hub_kwargs) -> MultiDecomposedModel:
        """Load several artifacts of one base; the base comes from the first artifact's index unless given."""
        first = artifact.read_index(next(iter(artifacts.values())))["base_model"]
        multi = cls.from_base(base_model or first["id"], None if base_model else first.get("revision"), **hub_kwargs)
        for name, directory in artifacts.items():
            multi.load_decomposed(name, directory)
        return multi

    def load_decomposed(self, name: str, directory: str | Path) -> None:
        """Add the fine-tune saved in an artifact directory under `name`."""
        index, deltas = artifact.load(directory)
        if index["base_model"]["sha256"] != self.base_sha256:
            raise ArtifactError(f"{directory} was decomposed against another base ({index['base_model']['id']}) than this model's")
        self.add_decomposed(name, deltas)

    def add_decomposed(self, name: str, deltas: dict[str, TensorDelta]) -> None:
        """Add a fine-tune given as its deltas (e.g. ``decompose(...).deltas``) under `name`."""
        if name in self.names or not name or "." in name:
            raise ConfigError(f"fine-tune name {name!r} is taken or invalid (non-empty, no dots)")
        if getattr(self.model, "hf_device_map", None) is not None:
            raise ConfigError("load every fine-tune before placing the model on devices")
        for owner_name, attrs in self._by_owner(deltas).items():
            owner = self._owners[owner_name]
            if isinstance(owner, WRAPPABLE):
                self._wrap(owner_name, owner, TenantModule).tenants[name] = self._ops(owner, attrs)
            else:
                self._wrap(owner_name, owner, TenantVectors).add(name, attrs)
        tied = self._tied_head()
        if tied is not None and tied[1] in self._wrappers and tied[0] not in self._wrappers:
            head = TenantModule(self._owners[tied[0]], self.routing, tied=self._wrappers[tied[1]])
            set_submodule(self.model, tied[0], head)
            self._wrappers[tied[0]] = head
        self.names.append(name)

    def _by_owner(self, deltas: dict[str, TensorDelta]) -> dict[str, dict[str, TensorDelta]]:
        tied = self._tied_head()
        out: dict[str, dict[str, TensorDelta]] = defaultdict(dict)
        for key, delta in deltas.items():
            pname = param_name(key, self._params)
            if delta.is_empty() or (pname is None and tied is not None and key.endswith("lm_head.weight")):
                continue  # a tied head's delta is its embedding's
            if pname is None:
                raise ArtifactError(f"tensor {key!r} has no matching parameter in {type(self.model).__name__}")
            param = self._params[pname]
            if math.prod(delta.shape) != param.numel():
                raise ArtifactError(f"tensor {key!r}: delta shape {delta.shape} does not fit the base's {tuple(param.shape)}")
            owner, _, attr = pname.rpartition(".")
            out[owner][attr] = delta
        return out

    def _tied_head(self) -> tuple[str, str] | None:
        """(head name, embedding name) when the head's weight is the embedding's."""
        embed, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        base_embed = embed.base if isinstance(embed, TenantModule) else embed
        base_head = head.base if isinstance(head, TenantModule) else head
        if base_head is None or base_head.weight is not base_embed.weight:
            return None
        names = {id(m): n for n, m in self._owners.items()}
        return names[id(base_head)], names[id(base_embed)]

    def _wrap(self, owner_name: str, owner: nn.Module, kind: type) -> nn.Module:
        if owner_name not in self._wrappers:
            self._wrappers[owner_name] = kind(owner, self.routing)
            set_submodule(self.model, owner_name, self._wrappers[owner_name])
        return self._wrappers[owner_name]

    @staticmethod
    def _ops(owner: nn.Module, attrs: dict[str, TensorDelta]) -> DeltaOps:
        weight = attrs["weight"] if "weight" in attrs else TensorDelta("weight", tuple(owner.weight.shape))
        bias = attrs["bias"].merge(owner.bias.detach()) - owner.bias.detach().float() if "bias" in attrs else None
        ops = DeltaOps(weight, owner.weight, bias)
        ops.delta = None  # a fine-tune keeps its parts only: what only the `TensorDelta` holds is freed
        return ops

    def set_active(self, names: Names) -> MultiDecomposedModel:
        """Apply these fine-tunes to every row (None or []: the base alone)."""
        names = [names] if isinstance(names, str) else list(names or [])
        self._check(names)
        self.routing.active = tuple(names)
        return self

    def _check(self, names: Sequence[str | None]) -> None:
        unknown = sorted({n for n in names if n is not None and n not in self.names})
        if unknown:
            raise ConfigError(f"unknown fine-tune(s) {unknown}; loaded: {self.names}")

    def _rows(self, names: Sequence[str | None] | None):
        if names is not None:
            self._check(names)
        return self.routing.per_row(names)

    def forward(self, *args, decomposed_names: Sequence[str | None] | None = None, **kwargs):
        with self._rows(decomposed_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, decomposed_names: Sequence[str | None] | None = None, **kwargs):
        """`generate`, with an optional fine-tune per batch row (``decomposed_names``)."""
        with self._rows(decomposed_names):
            return self.model.generate(*args, **kwargs)

    def dispatch(self, device_map="auto", **kwargs) -> MultiDecomposedModel:
        """Place base layers and every fine-tune's substructures (see `placement.place`)."""
        from .placement import place

        place(self, device_map, **kwargs)
        return self

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)
