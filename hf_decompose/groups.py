"""Architecture-aware dependency groups: which entries of which tensors form one unit.

A *group* is the paper's multi-channel dependency: an MLP neuron (its gate/up rows and its down
column), an attention head (its query rows and output columns), a key/value head (its k/v rows,
shared by the query heads of its GQA group), a token row of an embedding, a whole norm or bias vector.

Matrices are handled in the canonical ``(out_features, in_features)`` layout; GPT-2's ``Conv1D``
weights are stored transposed and flagged here.
"""

from __future__ import annotations

import functools

import re
from dataclasses import dataclass

import numpy as np

from .names import matrix_of

# a mixture of experts' shared expert is the layer's MLP (its routed experts, stored one by one, are plain matrices)
_LLAMA = re.compile(r"^(?P<layer>.*?layers\.\d+)\.(?P<block>self_attn|mlp)\.(?:shared_experts?\.)?(?P<proj>\w+)_proj\.(?P<kind>weight|bias)$")
_GPT2 = re.compile(r"^(?P<layer>.*?h\.\d+)\.(?P<block>attn|mlp)\.(?P<proj>c_attn|c_proj|c_fc)\.(?P<kind>weight|bias)$")
LAYER_LISTS = ("layers", "h", "layer", "blocks")  # the names a model's list of decoder layers goes by (MPT's: blocks)
_LAYER = re.compile(rf"^(?P<layer>.*?(?:{'|'.join(LAYER_LISTS)})\.\d+)\.")
_TOKEN_ROWS = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight", "lm_head.weight", "embed_out.weight")

READS_HIDDEN = {"q", "k", "v", "qkv", "gate", "up", "gate_up", "c_attn", "c_fc"}
WRITES_HIDDEN = {"o", "down", "c_proj"}
NEURON_ROLES = {"gate", "up", "gate_up", "down", "c_fc"}
ALIASES = {"out": "o"}  # OPT's attention output projection, out_proj
EXPERTS_STORED_IN_OUT = {"gpt_oss", "llama4", "llama4_text"}  # model types whose stacks of experts hold each expert's matrix (in, out)


@dataclass(frozen=True)
class Geometry:
    """Attention geometry read from a model config."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @classmethod
    def from_config(cls, config: dict) -> Geometry:
        hidden = config.get("hidden_size") or config.get("n_embd")
        heads = config.get("num_attention_heads") or config.get("n_head")
        if not hidden or not heads:
            raise ValueError("config lacks hidden_size/num_attention_heads")
        kv = (config.get("num_key_value_heads") if _declares(config.get("model_type"), "num_key_value_heads") else None) or heads
        head_dim = config.get("head_dim") or hidden // heads
        return cls(int(heads), int(kv), int(head_dim), int(hidden))


@functools.cache
def _declares(model_type: str | None, key: str) -> bool:
    """Whether the model type's config reads `key` (a config.json may carry keys its model ignores, such as
    an OPT config with ``num_key_value_heads``)."""
    from transformers import AutoConfig

    try:
        return hasattr(AutoConfig.for_model(model_type), key)
    except (ValueError, KeyError, TypeError):
        return True


@dataclass(frozen=True)
class ParamInfo:
    """What one tensor is: its layer, its role, its layout and how its entries group."""

    name: str
    layer: str | None
    role: str
    transposed: bool
    group_axis: int | None
    group_kind: str

    def canonical(self, tensor):
        """The tensor in (out, in) layout."""
        return tensor.t() if self.transposed else tensor


def describe(name: str, shape: tuple[int, ...], model_type: str) -> ParamInfo:
    """Classify one checkpoint tensor."""
    layer_match = _LAYER.match(name)
    layer = layer_match.group("layer") if layer_match else None
    if len(shape) != 2:
        return ParamInfo(name, layer, "vector", False, None, "vector")
    match = _LLAMA.match(name) or _GPT2.match(name)
    role = ALIASES.get(match.group("proj"), match.group("proj")) if match else None
    if role == "c_proj":  # GPT-2 names both output projections c_proj
        role = "down" if match.group("block") == "mlp" else "o"
    # a projection of another layout (MLA's q_a / q_b / kv_b, ...) is a plain matrix: its rows are no heads or neurons
    if match and match.group("kind") == "weight" and role in READS_HIDDEN | WRITES_HIDDEN:
        axis = 1 if role in WRITES_HIDDEN else 0
        kind = "neuron" if role in NEURON_ROLES else ("kv_head" if role in ("k", "v") else "head")
        return ParamInfo(name, match.group("layer"), role, model_type == "gpt2", axis, kind)
    if name.endswith(_TOKEN_ROWS):
        return ParamInfo(name, None, "lm_head" if name.endswith(("lm_head.weight", "embed_out.weight")) else "embed", False, 0, "token")
    if name.endswith("wpe.weight"):
        return ParamInfo(name, None, "positions", False, 0, "position")
    # an expert's matrix stored (in, out) in its stack: flagged, so its rows are outputs as every canonical matrix's
    transposed = model_type in EXPERTS_STORED_IN_OUT and matrix_of(name)[1] is not None
    return ParamInfo(name, layer, "matrix", transposed, 0, "row")


def group_ids(info: ParamInfo, shape: tuple[int, ...], geometry: Geometry | None) -> np.ndarray:
    """Group index of each row (group_axis 0) or column (axis 1) of the canonical matrix.

    Ids are local to (layer, group_kind): q rows and o columns of head h share id h; k and v rows of
    kv head g share id g; gate/up rows and down columns of neuron n share id n. A fused q/k/v matrix's k and v rows
    of kv head g take id ``num_heads + g`` (after the query heads': the kv head's node in `layer_components`); a fused
    gate/up matrix's rows j and ``n / 2 + j`` are neuron j's. A head's rows or columns are the matrix's own share of
    them (MLA's values are narrower than its queries and keys): a matrix the head count does not divide raises.
    Only heads need the `geometry`.
    """
    n = shape[info.group_axis]
    if info.role in ("q", "o"):
        return _heads(info, n, geometry.num_heads)
    if info.role in ("k", "v"):
        return _heads(info, n, geometry.num_kv_heads)
    if info.role == "qkv":
        ids = _heads(info, n, geometry.num_heads + 2 * geometry.num_kv_heads)
        kv = ids >= geometry.num_heads
        ids[kv] = geometry.num_heads + (ids[kv] - geometry.num_heads) % geometry.num_kv_heads
        return ids
    if info.role == "gate_up":
        return np.arange(n) % (n // 2)
    if info.role == "c_attn":  # rows: [q | k | v] blocks of hidden_size each; all three belong to the head
        return (np.arange(n) % geometry.hidden_size) // geometry.head_dim
    return np.arange(n)


def _heads(info: ParamInfo, n: int, heads: int) -> np.ndarray:
    """Ids of `n` rows or columns in `heads` equal consecutive blocks."""
    if n % heads:
        raise ValueError(f"{info.name}: {n} {'columns' if info.group_axis else 'rows'} do not split into {heads} heads of equal size; "
                         "the config's attention geometry does not describe this matrix")
    return np.arange(n) // (n // heads)


def kv_group_of_head(head: int, geometry: Geometry) -> int:
    """The key/value head that query head `head` attends with (GQA)."""
    return head // (geometry.num_heads // geometry.num_kv_heads)
