"""Substructure kinds: one registered `Part` class per kind, a tensor's delta as a list of them.

Each kind is one file: `dense`, `block`, `sparse`, `override`, `lowrank`, `qlowrank` (low rank in low-bit
factors), `quant` (low-bit codes),
`quantfull` (low-bit codes on the full grid), stored and summed in that order (their `order`); `vector`
is the run-time form of a bias delta. A new kind is a `Part` subclass decorated with `register_part`, in a file imported here so that it registers.
"""

from .base import PART_KINDS, Part, register_part
from .block import BlockPart
from .dense import DensePart
from .sparse import SparsePart
from .override import OverridePart
from .lowrank import LowRankPart
from .quantlowrank import QuantLowRankPart
from .quant import QuantPart
from .quantfull import FullQuantPart
from .vector import VectorPart
from .delta import TensorDelta
from .ops import DeltaOps, run_split, set_parallel

__all__ = [
    "PART_KINDS", "BlockPart", "DeltaOps", "DensePart", "FullQuantPart", "LowRankPart", "OverridePart", "Part", "QuantLowRankPart", "QuantPart",
    "SparsePart", "TensorDelta", "VectorPart", "register_part", "run_split", "set_parallel",
]
