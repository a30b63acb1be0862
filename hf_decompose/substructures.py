"""Substructures: what is kept of a delta, split into independent pieces.

Per tensor, the support is a bipartite graph (output rows <-> input columns); its connected
components (``scipy.sparse.csgraph``) are stored as dense blocks (rows, cols, values) when dense
enough, else as sparse entries labelled by component. Supported singular directions are low-rank
substructures, each one independent. Per layer, supports chain through the layer's units (heads,
neurons) into the layered graph  inputs -> heads -> mid -> neurons -> outputs, whose components are
the layer's independent substructures.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .deltas import dense_support, nonzero, support_counts
from .groups import READS_HIDDEN, WRITES_HIDDEN, Geometry, ParamInfo, group_ids, kv_group_of_head
from .parts import BlockPart, DensePart, LowRankPart, OverridePart, SparsePart, TensorDelta


def extract(
    info: ParamInfo,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None,
    overrides: tuple[torch.Tensor, torch.Tensor] | None = None,
    dense_block_density: float = 0.5,
    in_place: bool = False,
    zero_outside: bool = False,
) -> TensorDelta:
    """Split the supported entries of `values` (canonical layout), plus low-rank factors and
    overrides, into independent substructures; one dense delta where pieces would cost more.
    With `in_place`, `values` may be overwritten (a full-size dense delta is then no second copy);
    with `zero_outside`, `values` is already zero wherever `mask` is not (an exact delta and its
    nonzero entries; `mask` None: made from `values` where needed): a dense delta is stored as it is,
    signed zeros included, without a masking pass."""
    delta = _pieces(info, values, mask, lowrank, overrides, dense_block_density, in_place, zero_outside)
    if delta.num_params() > values.numel() and any(p.kind in ("lowrank", "block", "sparse") for p in delta.parts):
        return TensorDelta(info.name, tuple(values.shape), info.transposed, [DensePart(delta.to_dense()), *delta.of("override")])
    return delta


def _pieces(info: ParamInfo, values: torch.Tensor, mask: torch.Tensor, lowrank, overrides, dense_block_density: float, in_place: bool,
            zero_outside: bool) -> TensorDelta:
    """`extract` before the cost check."""
    shape = tuple(values.shape)
    kept: list = []
    if lowrank is not None and lowrank[0].shape[1] > 0:
        kept.append(LowRankPart(lowrank[0].contiguous(), lowrank[1].contiguous()))
    if overrides is not None and overrides[1].numel():
        kept.append(OverridePart(overrides[1], overrides[0], shape))
    delta = TensorDelta(info.name, shape, info.transposed, kept)
    if mask is None:
        if _dense_support(values, dense_block_density):
            return _with(delta, DensePart(values))
        mask = nonzero(values)
    m = mask.numpy()  # numpy's boolean reductions are several times faster than torch's on one thread
    if not m.any():
        return delta
    if m.all() or (zero_outside and values.dim() != 2):
        return _with(delta, DensePart(values))  # shared, not copied: a full-size delta is stored as it is
    if values.dim() != 2:
        return _with(delta, DensePart(_masked(values, mask, in_place)))
    rows_used, cols_used = m.any(1), m.any(0)
    if _one_component(m, rows_used, cols_used):  # no graph needed
        return _single_component(delta, values, mask, torch.from_numpy(rows_used), torch.from_numpy(cols_used), dense_block_density, in_place,
                                 zero_outside)
    rows_all, cols_all = mask.nonzero(as_tuple=True)
    n_rows, n_cols = values.shape
    n_comp, labels = _bipartite_components(rows_all.numpy(), cols_all.numpy(), n_rows, n_cols)
    entry_label = labels[rows_all.numpy()]
    nnz = np.bincount(entry_label, minlength=n_comp)
    area = np.bincount(labels[:n_rows], minlength=n_comp) * np.bincount(labels[n_rows:], minlength=n_comp)
    dense = (nnz >= dense_block_density * area) & (area > 1)
    pieces = []
    for comp in np.nonzero(dense)[0]:  # few: every other component is stored as sparse entries
        ur = torch.from_numpy(np.nonzero(labels[:n_rows] == comp)[0])
        uc = torch.from_numpy(np.nonzero(labels[n_rows:] == comp)[0])
        pieces.append(BlockPart(ur, uc, _block(values, mask, ur, uc), shape))
    sparse_keep = torch.from_numpy(~dense[entry_label])
    if sparse_keep.any():
        r, c = rows_all[sparse_keep], cols_all[sparse_keep]
        pieces.append(SparsePart(r, c, values[r, c].contiguous(), shape, torch.from_numpy(entry_label)[sparse_keep].int()))
    return _with(delta, *pieces)


def _dense_support(values: torch.Tensor, dense_block_density: float) -> bool:
    """Whether the nonzero entries of a 2-D matrix make one dense block of it (`deltas.dense_support`), counted a
    block of rows at a time with no mask of the matrix's size."""
    counts = support_counts(values)
    return counts is not None and dense_support(*counts, dense_block_density)


def _with(delta: TensorDelta, *parts) -> TensorDelta:
    """`delta` with `parts` added."""
    return TensorDelta(delta.name, delta.shape, delta.transposed, [*delta.parts, *parts])


def _block(values: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(values * mask)[rows][:, cols], contiguous, without temporaries of the block's size: gathered one
    axis at a time, multiplied a slab of rows at a time (a bool factor is cast to float per slab)."""
    block, keep = _gather(values, rows, cols).contiguous(), _gather(mask, rows, cols)
    for b, k in zip(block.split(1024), keep.split(1024)):
        b.mul_(k)
    return block


def _gather(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """t[rows][:, cols], one axis at a time (no index grid of the block's size)."""
    t = t.index_select(0, rows)
    return t if cols.numel() == t.shape[1] else t.index_select(1, cols)


def _masked(values: torch.Tensor, mask: torch.Tensor, in_place: bool) -> torch.Tensor:
    """`values` where `mask`, else 0."""
    return values.masked_fill_(~mask, 0) if in_place else values.masked_fill(~mask, 0)


def _single_component(delta: TensorDelta, values: torch.Tensor, mask: torch.Tensor, rows_used: torch.Tensor,
                      cols_used: torch.Tensor, dense_block_density: float, in_place: bool, zero_outside: bool) -> TensorDelta:
    rows, cols = rows_used.nonzero()[:, 0], cols_used.nonzero()[:, 0]
    area = rows.numel() * cols.numel()
    if np.count_nonzero(mask.numpy()) >= dense_block_density * area and area > 1:
        if rows.numel() == mask.shape[0] and cols.numel() == mask.shape[1]:
            return _with(delta, DensePart(values if zero_outside else _masked(values, mask, in_place)))
        return _with(delta, BlockPart(rows, cols, _block(values, mask, rows, cols), delta.shape))
    r, c = mask.nonzero(as_tuple=True)
    return _with(delta, SparsePart(r, c, values[r, c].contiguous(), delta.shape, torch.zeros(r.numel(), dtype=torch.int32)))


def _bipartite_components(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int) -> tuple[int, np.ndarray]:
    """Components of the graph rows <-> cols; labels for the row nodes then the column nodes,
    numbered in order of their first node (as scipy numbers them)."""
    per_row = np.bincount(rows, minlength=n_rows)
    used = np.concatenate([per_row, np.bincount(cols, minlength=n_cols)]) > 0
    if rows.size and per_row.max() == used[n_rows:].sum():
        # a row touches every used column: one component of all used nodes, no graph needed (an
        # embedding whose trained tokens moved: a graph of that many edges costs ~35 bytes each)
        first = int(np.argmax(used))
        opens = ~used
        opens[first] = True
        labels = (np.cumsum(opens) - 1).astype(np.int32)
        labels[used] = labels[first]
        return int(opens.sum()), labels
    n = n_rows + n_cols
    graph = coo_matrix((np.ones(rows.size, dtype=np.int8), (rows, cols + n_rows)), shape=(n, n))
    return connected_components(graph, directed=False)


def _one_component(m: np.ndarray, rows_used: np.ndarray, cols_used: np.ndarray, steps: int = 4) -> bool:
    """Whether the used rows and columns of the support `m` form one component, by reach from its fullest
    row, a pass over `m` per step: once every used column is reached, so is every used row. A dense
    support with scattered gaps (a 16-bit fine-tune leaves some entries unchanged) joins in a step or two."""
    rows = np.zeros_like(rows_used)
    rows[np.argmax(np.count_nonzero(m, axis=1))] = True
    n_cols = np.count_nonzero(cols_used)
    for _ in range(steps):
        cols = m[rows].any(0)
        if np.count_nonzero(cols) == n_cols:
            return True
        rows = (m & cols).any(1)
    return False


def _spanning_pairs(support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of at most rows + cols entries whose bipartite graph has the components, and the
    used rows and columns, of `support`'s: per component, every row paired with one of its columns and
    every column with one of its rows. Components are all `layer_components` needs of a matrix."""
    s = support.numpy()  # numpy's boolean reductions: several times faster than torch's
    rows_used, cols_used = s.any(1), s.any(0)
    rows, cols = torch.from_numpy(np.flatnonzero(rows_used)), torch.from_numpy(np.flatnonzero(cols_used))
    if rows.numel() == 0:
        return rows, cols
    if _one_component(s, rows_used, cols_used):  # its fullest row reaches every used column in one step if any row does
        # no graph, whose edge lists cost ~35 bytes an entry (5.8 GB at the 1.5B synthetic pair's dense tied
        # embedding): any spanning pairs do
        return torch.cat([rows, rows[:1].expand(cols.numel())]), torch.cat([cols[:1].expand(rows.numel()), cols])
    n_rows = support.shape[0]
    _, labels = _bipartite_components(*(i.numpy() for i in support.nonzero(as_tuple=True)), n_rows, support.shape[1])
    row_labels, col_labels = labels[rows.numpy()], labels[n_rows + cols.numpy()]
    root_row, root_col = np.zeros(labels.max() + 1, dtype=np.int64), np.zeros(labels.max() + 1, dtype=np.int64)
    root_row[row_labels], root_col[col_labels] = rows.numpy(), cols.numpy()  # any member of each component
    return torch.cat([rows, torch.from_numpy(root_row[col_labels])]), torch.cat([torch.from_numpy(root_col[row_labels]), cols])


def _every_pair(shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`_spanning_pairs` of a support of every entry, without making it: each row paired with column 0, each
    column with row 0."""
    rows, cols = torch.arange(shape[0]), torch.arange(shape[1])
    return torch.cat([rows, torch.zeros_like(cols)]), torch.cat([torch.zeros_like(rows), cols])


def layer_components(deltas: dict[str, tuple[ParamInfo, TensorDelta]], geometry: Geometry | None) -> list[dict[str, int]]:
    """Independent substructures of one transformer block's entry-level support.

    Nodes: block inputs, attention heads (and kv heads, linked to their query heads), mid-block
    hidden dims, MLP neurons, block outputs. Edges: supported entries of the matrices that read or
    write the hidden state. Returns one record per component (hidden dims, units), largest first.
    The graph is layered and acyclic, so its strongly connected components are single nodes and
    the condensed graph is the graph itself: weak components are the independent pieces.
    """
    if geometry is None:
        return []
    hidden = geometry.hidden_size
    offsets = {"in": 0, "mid": hidden, "out": 2 * hidden, "head": 3 * hidden}
    offsets["kv_head"] = offsets["head"] + geometry.num_heads
    offsets["neuron"] = offsets["kv_head"] + geometry.num_kv_heads
    edges: list[tuple[np.ndarray, np.ndarray]] = []
    n_neurons = 0
    for info, delta in deltas.values():
        if info.role not in READS_HIDDEN | WRITES_HIDDEN or delta.is_empty():
            continue
        rows, cols = _every_pair(delta.shape) if delta.replaces_all else _spanning_pairs(delta.support())
        if rows.numel() == 0:
            continue
        axis_idx = rows.numpy() if info.group_axis == 0 else cols.numpy()
        unit = group_ids(info, delta.shape, geometry)[axis_idx] + offsets[info.group_kind]
        attention = info.group_kind in ("head", "kv_head")
        if info.group_kind == "neuron":
            n_neurons = max(n_neurons, delta.shape[info.group_axis])
        if info.role in READS_HIDDEN:
            edges.append(((offsets["in"] if attention else offsets["mid"]) + cols.numpy(), unit))
        else:
            edges.append((unit, (offsets["mid"] if attention else offsets["out"]) + rows.numpy()))
    if not edges:
        return []
    src = np.concatenate([e[0] for e in edges])
    dst = np.concatenate([e[1] for e in edges])
    n = offsets["neuron"] + n_neurons
    heads = np.arange(geometry.num_heads)  # a kv head feeds every query head of its GQA group
    kv_of_head = np.array([kv_group_of_head(h, geometry) for h in heads]) + offsets["kv_head"]
    touched = np.zeros(n, dtype=bool)
    touched[src] = touched[dst] = True
    linked = touched[kv_of_head]
    src = np.concatenate([src, kv_of_head[linked]])
    dst = np.concatenate([dst, heads[linked] + offsets["head"]])
    graph = coo_matrix((np.ones(src.size, dtype=np.int8), (src, dst)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    used = np.zeros(n, dtype=bool)
    used[src] = used[dst] = True
    comps = []
    for comp in np.unique(labels[used]):
        nodes = np.nonzero((labels == comp) & used)[0]
        comps.append({"hidden": int((nodes < offsets["head"]).sum()), "units": int((nodes >= offsets["head"]).sum())})
    return sorted(comps, key=lambda c: -(c["hidden"] + c["units"]))
