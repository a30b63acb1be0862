"""Vector: an additive bias delta at run time (stored as the bias tensor's own delta)."""

from __future__ import annotations

import torch

from .base import Part, cast


class VectorPart(Part):
    """``bias`` added to every row; built by `DeltaOps` from a bias's delta, never stored itself."""

    kind = "bias"

    def __init__(self, bias: torch.Tensor):
        super().__init__(bias.shape)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor, lookup: bool = False) -> torch.Tensor:
        return cast(self.bias, x.dtype).expand(*x.shape[:-1], -1)
