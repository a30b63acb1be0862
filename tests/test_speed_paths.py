"""Shortcuts taken for speed decide what the slow path would: one component without the graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hf_decompose.substructures as substructures
from hf_decompose.groups import describe
from hf_decompose.substructures import extract


def _supports() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    gappy = torch.rand(64, 96, generator=gen) < 0.9  # a 16-bit fine-tune: most entries moved, some not
    chain = torch.zeros(64, 96, dtype=torch.bool)  # one component reached only after several steps
    for k in range(8):
        chain[8 * k : 8 * k + 9, 12 * k : 12 * k + 12] = True
    two = torch.zeros(64, 96, dtype=torch.bool)  # two blocks: two components
    two[:32, :48], two[32:, 48:] = True, torch.rand(32, 48, generator=gen) < 0.3
    sparse = torch.rand(64, 96, generator=gen) < 0.02
    return {"gappy": gappy, "chain": chain, "two": two, "sparse": sparse}


@pytest.mark.parametrize("kind", ["gappy", "chain", "two", "sparse"])
def test_one_component_shortcut_agrees_with_the_graph(kind, monkeypatch):
    mask = _supports()[kind]
    m = mask.numpy()
    n_comp, labels = substructures._bipartite_components(*(i.numpy() for i in mask.nonzero(as_tuple=True)), *mask.shape)
    used = np.concatenate([m.any(1), m.any(0)])
    one = len(set(labels[used].tolist())) == 1
    assert substructures._one_component(m, m.any(1), m.any(0), steps=64) == one
    assert one == (kind in ("gappy", "chain"))
    values = torch.randn(64, 96, generator=torch.Generator().manual_seed(1)) * mask
    info = describe("model.layers.0.mlp.up_proj.weight", (64, 96), "llama")
    fast = extract(info, values.clone(), mask)
    monkeypatch.setattr(substructures, "_one_component", lambda *a, **k: False)
    graph = extract(info, values.clone(), mask)
    assert torch.equal(fast.to_dense(), graph.to_dense()) and torch.equal(fast.to_dense(), values)
    assert fast.num_params() == graph.num_params() and fast.nbytes() <= graph.nbytes()


@pytest.mark.parametrize("kind", ["gappy", "chain", "two", "sparse"])
def test_spanning_pairs_of_one_component_need_no_graph(kind, monkeypatch):
    """`layer_components`' pairs: the same components as the support's, built without its graph where it is one."""
    mask = _supports()[kind]
    _, labels = substructures._bipartite_components(*(i.numpy() for i in mask.nonzero(as_tuple=True)), *mask.shape)
    rows, cols = substructures._spanning_pairs(mask)
    _, pair_labels = substructures._bipartite_components(rows.numpy(), cols.numpy(), *mask.shape)
    used = np.flatnonzero(np.concatenate([mask.numpy().any(1), mask.numpy().any(0)]))
    same = {(a, b) for a, b in zip(labels[used], pair_labels[used])}
    assert len(same) == len({a for a, _ in same}) == len({b for _, b in same})  # the same partition of the used nodes
    if kind == "gappy":  # joined within `_one_component`'s steps (the chain takes more: the graph decides it)
        def no_graph(*args):
            raise AssertionError("built the graph of a single component")

        monkeypatch.setattr(substructures, "_bipartite_components", no_graph)
        assert [t.numel() for t in substructures._spanning_pairs(mask)] == [rows.numel(), cols.numel()]
