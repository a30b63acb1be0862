"""Sparse: scattered entries of a matrix delta, each labelled with its connected component."""

from __future__ import annotations

import warnings

import torch

from .base import Part, cast, expect, in_range, register_part

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


@register_part
class SparsePart(Part):
    """Entries ``values`` at (``rows``, ``cols``), sorted by row and run as a CSR matrix (``crow``);
    ``components`` labels each entry's substructure (None for a run-time correction)."""

    kind = "sparse"
    order = 30
    fields = ("indices", "values", "components")
    optional = frozenset({"components"})

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...],
                 components: torch.Tensor | None = None):
        super().__init__(shape)
        if rows.numel() > 1 and rows.shape == cols.shape == values.shape and not bool((rows[1:] >= rows[:-1]).all()):
            rows, perm = rows.sort(stable=True)
            cols, values = cols[perm], values[perm]
            components = None if components is None else components[perm]
        index = torch.int32 if max(*shape[:2], rows.numel()) < 2**31 else torch.long
        self.register_buffer("rows", rows.to(index).contiguous())
        self.register_buffer("cols", cols.to(index).contiguous())
        self.register_buffer("values", values)
        self.register_buffer("components", components)
        crow = torch.zeros(shape[0] + 1, dtype=index)
        if rows.numel() and int(rows.min()) >= 0 and int(rows.max()) < shape[0]:  # else `check` refuses the part
            crow[1:] = torch.bincount(rows.long(), minlength=shape[0]).cumsum(0)
        self.register_buffer("crow", crow, persistent=False)

    def state(self) -> dict[str, torch.Tensor]:
        out = {"indices": torch.stack([self.rows, self.cols]), "values": self.values}
        if self.components is not None:
            out["components"] = self.components
        return out

    @classmethod
    def from_state(cls, shape, tensors):
        indices = tensors["indices"]
        if len(shape) != 2 or indices.dim() != 2 or indices.shape[0] != 2:
            raise ValueError(f"sparse indices of shape {tuple(indices.shape)} for a tensor of shape {tuple(shape)}")
        return cls(indices[0], indices[1], tensors["values"], shape, tensors["components"])

    def check(self) -> None:
        nnz = self.values.numel()
        expect(self.values, (nnz,), values=True)
        expect(self.rows, (nnz,), values=False)
        expect(self.cols, (nnz,), values=False)
        if self.components is not None:
            expect(self.components, (nnz,), values=False)
        in_range(self.rows, self.shape[0])
        in_range(self.cols, self.shape[1])

    def num_substructures(self) -> int:
        return 0 if self.components is None or not self.components.numel() else int(torch.unique(self.components).numel())

    def add_to(self, out: torch.Tensor) -> None:
        out.index_put_((self.rows.long(), self.cols.long()), self.values.float(), accumulate=True)

    def mark(self, mask: torch.Tensor) -> None:
        mask[self.rows.long(), self.cols.long()] = True

    def forward(self, x: torch.Tensor, lookup: bool = False) -> torch.Tensor:
        if lookup:
            return self._rows(x)
        # CPU has no 16-bit sparse matmul kernel: bfloat16 / float16 inputs multiply in float32
        dtype = torch.float32 if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) else x.dtype
        matrix = torch.sparse_csr_tensor(self.crow, self.cols, cast(self.values, dtype), self.shape[:2], check_invariants=False)
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        return (matrix @ flat.t()).t().to(x.dtype).reshape(*x.shape[:-1], self.shape[0])

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Delta rows of token ids: a ragged gather of each id's CSR row."""
        flat = ids.reshape(-1)
        starts = self.crow[flat]
        counts = self.crow[flat + 1] - starts
        which = torch.repeat_interleave(torch.arange(flat.numel(), device=ids.device), counts)
        first = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        entry = starts[which] + torch.arange(which.numel(), device=ids.device) - first
        out = self.values.new_zeros(flat.numel(), self.shape[1])
        out.index_put_((which, self.cols[entry].long()), self.values[entry], accumulate=True)
        return out.reshape(*ids.shape, self.shape[1])
