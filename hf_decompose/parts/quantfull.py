"""Low-bit codes on the full grid: every one of the ``2^bits`` codes used (`hf_decompose.quantize`).

The codes are the odd integers ``-(2^bits - 1)..2^bits - 1`` times a bfloat16 group scale (half a
step): at 2 bits the levels -3, -1, 1, 3 where the signed grid of `quant` has only -1, 0, 1. Stored
bit-packed as ``(code + 2^bits - 1) / 2``; run like `quant` (codes of at most 3 bits fit the fused
4-bit kernels). One bit is the same on both grids and stays a `quant` part.
"""

from __future__ import annotations

import torch

from ..quantize import bits_of, codes_of
from .base import register_part
from .quant import QuantPart


@register_part
class FullQuantPart(QuantPart):
    kind = "quantfull"
    order = 61
    grid = "full"

    @classmethod
    def from_packed(cls, packed: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...]) -> FullQuantPart:
        """From `quantize(..., grid="full")`'s packed codes and scales."""
        cls._check_packed(packed, scales, shape)
        return cls(codes_of(packed, shape, "full"), scales, bits_of(packed, shape))

