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

from .substructures import TensorDelta


class DeltaOps(nn.Module):
    """The substructures of one matrix delta as tensors that move with the module (buffers)."""

    def __init__(self, delta: TensorDelta, base_weight: torch.Tensor):
        super().__init__()
        self.delta = delta
        self.n_blocks = len(delta.blocks)
        if delta.dense is not None:
            self.register_buffer("dense", delta.dense)
        for i, b in enumerate(delta.blocks):
            self.register_buffer(f"block{i}_rows", b.rows)
            self.register_buffer(f"block{i}_cols", b.cols)
            self.register_buffer(f"block{i}_values", b.values)
        sparse = self._sparse_entries(delta, base_weight)
        if sparse is not None:
            self.register_buffer("sparse", sparse)
        if delta.lowrank_u is not None:
            self.register_buffer("lowrank_u", delta.lowrank_u)
            self.register_buffer("lowrank_v", delta.lowrank_v)

    @staticmethod
    def _sparse_entries(delta: TensorDelta, base_weight: torch.Tensor) -> torch.Tensor | None:
        """Sparse entries plus the override corrections, as one coalesced COO matrix."""
        idx, val = [], []
        if delta.sparse_values is not None:
            idx.append(delta.sparse_indices)
            val.append(delta.sparse_values)
        if delta.override_values is not None:
            canonical = base_weight.t() if delta.transposed else base_weight
            ov = tuple(delta.override_indices.t())
            rest = delta.to_dense()[ov]
            idx.append(delta.override_indices.t())
            val.append(delta.override_values - canonical.detach().float()[ov] - rest)
        if not idx:
            return None
        return torch.sparse_coo_tensor(torch.cat(idx, 1), torch.cat(val), delta.shape).coalesce()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ delta^T for x of shape (..., in)."""
        out = torch.zeros(*x.shape[:-1], self.delta.shape[0], dtype=x.dtype, device=x.device)
        if hasattr(self, "dense"):
            out = out + x @ self.dense.to(x.dtype).t()
        for i in range(self.n_blocks):
            rows, cols, values = (getattr(self, f"block{i}_{k}") for k in ("rows", "cols", "values"))
            out[..., rows] += x[..., cols] @ values.to(x.dtype).t()
        if hasattr(self, "sparse"):
            flat = x.reshape(-1, x.shape[-1])
            out = out + torch.sparse.mm(self.sparse.to(x.dtype), flat.t()).t().reshape(out.shape)
        if hasattr(self, "lowrank_u"):
            out = out + (x @ self.lowrank_v.to(x.dtype).t()) @ self.lowrank_u.to(x.dtype).t()
        return out

    def rows(self, ids: torch.Tensor, embed_dim: int) -> torch.Tensor:
        """Delta rows for token ids (embedding lookup): a (..., dim) tensor."""
        out = torch.zeros(*ids.shape, embed_dim, device=ids.device)
        if hasattr(self, "dense"):
            out = out + self.dense[ids]
        for i in range(self.n_blocks):
            rows, cols, values = (getattr(self, f"block{i}_{k}") for k in ("rows", "cols", "values"))
            lookup = torch.full((self.delta.shape[0],), -1, dtype=torch.long, device=ids.device)
            lookup[rows] = torch.arange(rows.numel(), device=ids.device)
            pos = lookup[ids]
            hit = pos >= 0
            contrib = torch.zeros(*ids.shape, cols.numel(), device=ids.device)
            contrib[hit] = values[pos[hit]]
            out[..., cols] += contrib
        if hasattr(self, "sparse"):
            dense_rows = torch.index_select(self.sparse, 0, ids.reshape(-1)).to_dense()
            out = out + dense_rows.reshape(*ids.shape, embed_dim)
        if hasattr(self, "lowrank_u"):
            out = out + self.lowrank_u[ids] @ self.lowrank_v
        return out


class DecomposedModule(nn.Module):
    """Base module (shared, never modified) + delta, with `merged` and `split` execution."""

    def __init__(self, base: nn.Module, delta: TensorDelta, execution: str = "merged", tied: DecomposedModule | None = None):
        super().__init__()
        self.base = base
        self.ops = DeltaOps(delta, base.weight)
        self.execution = execution
        object.__setattr__(self, "_tied", tied)  # a tied lm_head shares its embedding's merged weight
        object.__setattr__(self, "_merged", None)

    @property
    def delta(self) -> TensorDelta:
        return self.ops.delta

    def merged_module(self) -> nn.Module:
        """A copy of the base module holding base + delta (built once, on first use)."""
        if self._merged is None:
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
        return self.base(x) + self._split_delta(x)

    def _split_delta(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, nn.Embedding):
            rows = self.ops.rows(x, self.delta.shape[1])
            scale = getattr(self.base, "embed_scale", None)  # Gemma's scaled embeddings
            return rows * scale.to(rows.dtype) if scale is not None else rows
        return self.ops(x)

    def extra_repr(self) -> str:
        d = self.delta
        return f"execution={self.execution}, substructures={d.num_substructures()}, rank={d.rank}, kept={d.num_params()}/{math.prod(d.shape)}"
