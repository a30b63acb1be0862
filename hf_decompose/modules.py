"""Decomposed modules: a shared base module plus substructures, run `merged` or `split`.

* ``merged``: a copy of the base module whose weight is base + kept delta. It runs the very same
  kernel as a dense model with those weights, so its output is bit-identical to that model.
* ``split``: the shared base module's output plus each substructure's contribution (dense block,
  sparse entries, low-rank factors), computed separately and summed.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .errors import ConfigError
from .parts import DeltaOps, TensorDelta, run_split
from .parts.ops import LazyWeight, embedding_scale


class DecomposedModule(nn.Module):
    """Base module (shared, never modified) + delta, with `merged` and `split` execution."""

    def __init__(self, base: nn.Module, delta: TensorDelta, execution: str = "merged", tied: DecomposedModule | None = None):
        super().__init__()
        self.base = base
        object.__setattr__(self, "_followers", [])  # tied heads that run this module's parts
        if tied is not None:  # a tied head runs its embedding's parts, registered (and placed) there only
            object.__setattr__(self, "ops", tied.ops)
            tied._followers.append(self)
        else:
            self.ops = DeltaOps(delta, base.weight, lookup=isinstance(base, nn.Embedding))
        self.execution = execution
        self._lookup = isinstance(base, nn.Embedding)
        self.parallel = "auto"  # how split runs its parts: see `parts.set_parallel`
        object.__setattr__(self, "_tied", tied)  # a tied lm_head shares its embedding's merged weight
        object.__setattr__(self, "_merged", None)

    @property
    def weight(self) -> torch.Tensor:
        """The weight this module runs, for code that reads it outside the module's forward (Jamba's ``dt_proj.weight @ x``,
        Llama 4's ``embed_tokens.weight.device``): its merged copy's, built where an operation uses it (`LazyWeight`) and
        then held as merged execution holds it."""
        return LazyWeight(self.base.weight, lambda: self.merged_module().weight)

    @property
    def bias(self) -> torch.Tensor:
        """The base module's bias (a changed bias is merged into it in place: vectors never run split)."""
        return self.base.bias

    @property
    def delta(self) -> TensorDelta:
        return self.ops.delta

    def set_delta(self, delta: TensorDelta) -> None:
        """Swap in another delta (annealing tries several); tied heads follow."""
        device = self.base.weight.device
        self.ops = DeltaOps(delta, self.base.weight, lookup=isinstance(self.base, nn.Embedding)).to(device if device.type != "meta" else "cpu")
        object.__setattr__(self, "_merged", None)
        for follower in self._followers:
            object.__setattr__(follower, "ops", self.ops)
            object.__setattr__(follower, "_merged", None)

    def merged_module(self) -> nn.Module:
        """A copy of the base module holding base + delta (built once, on first use)."""
        if self._merged is None:
            if self.base.weight.device.type == "meta":
                raise ConfigError("merged execution needs the base weights resident; run offloaded models with set_execution('split')")
            module = copy.copy(self.base)
            module._parameters = dict(module._parameters)
            if self._tied is not None:
                module.weight = self._tied.merged_module().weight
            else:
                weight = self.delta.merge(self.base.weight.detach().cpu()).to(self.base.weight.device)
                module.weight = nn.Parameter(weight, requires_grad=False)
            object.__setattr__(self, "_merged", module)
        return self._merged

    def _apply(self, fn, recurse=True):  # a device or dtype move rebuilds the merged copy lazily
        object.__setattr__(self, "_merged", None)
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.execution == "merged":
            return self.merged_module()(x)
        scale = embedding_scale(self.base) if self._lookup else None  # Gemma's scaled embeddings
        return run_split(self.base, self.ops.parts(), x, self._lookup, scale, self.parallel)

    def extra_repr(self) -> str:
        d = self.delta
        return f"execution={self.execution}, substructures={d.num_substructures()}, rank={d.rank}, kept={d.num_params()}/{math.prod(d.shape)}"
