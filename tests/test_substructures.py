"""Substructure extraction: planted blocks are found under any permutation; storage round-trips."""

import numpy as np
import pytest
import torch

from hf_decompose.groups import Geometry, describe, group_ids
from hf_decompose.parts import TensorDelta
from hf_decompose.substructures import extract, layer_components


def _planted_blocks(seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(6, 4), (3, 7), (5, 5), (1, 1)]
    values = torch.zeros(40, 30)
    truth, r0, c0 = [], 0, 0
    for h, w in sizes:
        values[r0 : r0 + h, c0 : c0 + w] = torch.randn(h, w, generator=gen) + 3
        truth.append((set(range(r0, r0 + h)), set(range(c0, c0 + w))))
        r0, c0 = r0 + h, c0 + w
    rp, cp = torch.randperm(40, generator=gen), torch.randperm(30, generator=gen)
    inv_r, inv_c = torch.argsort(rp), torch.argsort(cp)
    permuted = values[rp][:, cp]
    truth = [({int(inv_r[r]) for r in rows}, {int(inv_c[c]) for c in cols}) for rows, cols in truth]
    return permuted, truth


def test_recovers_planted_blocks_under_permutation():
    values, truth = _planted_blocks()
    info = describe("model.layers.0.mlp.up_proj.weight", tuple(values.shape), "llama")
    delta = extract(info, values, values != 0)
    found = [({int(r) for r in b.rows}, {int(c) for c in b.cols}) for b in delta.of("block")]
    for sparse in delta.of("sparse"):  # a single entry is a 1x1 component, stored sparse
        found += [({r}, {c}) for r, c in zip(sparse.rows.tolist(), sparse.cols.tolist())]
    assert sorted(map(str, found)) == sorted(map(str, truth))
    assert delta.num_substructures() == 4
    assert torch.equal(delta.to_dense(), values)


def test_sparse_components_and_state_round_trip():
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(50, 20, generator=gen)
    mask = torch.rand(50, 20, generator=gen) < 0.03
    u, v = torch.randn(50, 2, generator=gen), torch.randn(2, 20, generator=gen)
    info = describe("model.layers.0.self_attn.q_proj.weight", (50, 20), "llama")
    delta = extract(info, values, mask, lowrank=(u, v), dense_block_density=1.01)
    assert delta.of("block") == [] and delta.get("sparse").values.numel() == int(mask.sum())
    assert delta.rank == 2
    expected = torch.where(mask, values, torch.zeros(())) + u @ v
    torch.testing.assert_close(delta.to_dense(), expected)
    again = TensorDelta.from_state(delta.name, delta.shape, delta.transposed, delta.state())
    assert torch.equal(again.to_dense(), delta.to_dense())
    assert again.num_params() == int(mask.sum()) + 2 * (50 + 20)


def test_layer_components_chain_heads_and_neurons():
    g = Geometry(num_heads=4, num_kv_heads=2, head_dim=4, hidden_size=16)

    def entry(name, shape, cells):
        info = describe(name, shape, "llama")
        values = torch.zeros(shape)
        for r, c in cells:
            values[r, c] = 1.0
        return info, extract(info, values, values != 0)

    deltas = {
        # head 0 reads input dim 3 and writes mid dim 5; neuron 7 reads mid dim 5 and writes out dim 2
        "q": entry("model.layers.0.self_attn.q_proj.weight", (16, 16), [(1, 3)]),
        "o": entry("model.layers.0.self_attn.o_proj.weight", (16, 16), [(5, 2)]),
        "up": entry("model.layers.0.mlp.up_proj.weight", (32, 16), [(7, 5)]),
        "down": entry("model.layers.0.mlp.down_proj.weight", (16, 32), [(2, 7)]),
        # an unrelated neuron
        "gate": entry("model.layers.0.mlp.gate_proj.weight", (32, 16), [(20, 11)]),
    }
    comps = layer_components(deltas, g)
    assert comps == [{"hidden": 3, "units": 2}, {"hidden": 1, "units": 1}]


def test_a_full_row_makes_one_component_without_the_graph():
    from hf_decompose.substructures import _bipartite_components

    gen = torch.Generator().manual_seed(2)
    values = torch.randn(60, 40, generator=gen)
    mask = torch.rand(60, 40, generator=gen) < 0.05
    mask[7] = True  # a supported neuron row: every used column hangs on it
    info = describe("model.layers.0.mlp.gate_proj.weight", (60, 40), "llama")
    delta = extract(info, values, mask)
    rows, cols = mask.nonzero(as_tuple=True)
    _, labels = _bipartite_components(rows.numpy(), cols.numpy(), 60, 40)
    assert len(set(labels[rows.numpy()].tolist())) == 1  # the graph agrees
    assert delta.num_substructures() == 1 and delta.num_params() == int(mask.sum())
    assert torch.equal(delta.to_dense(), torch.where(mask, values, torch.zeros(())))


def test_layer_components_from_spanning_pairs_equal_those_of_every_entry(monkeypatch):
    import hf_decompose.substructures as substructures

    g = Geometry(num_heads=4, num_kv_heads=2, head_dim=4, hidden_size=16)
    shapes = {"q": (16, 16), "k": (8, 16), "v": (8, 16), "o": (16, 16), "gate": (32, 16), "up": (32, 16), "down": (16, 32)}
    gen = torch.Generator().manual_seed(3)
    counts = []
    for density in (0.002, 0.01, 0.05, 0.3, 1.0):
        deltas = {}
        for role, shape in shapes.items():
            block = "self_attn" if role in ("q", "k", "v", "o") else "mlp"
            info = describe(f"model.layers.0.{block}.{role}_proj.weight", shape, "llama")
            values = torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < density)
            deltas[role] = (info, extract(info, values, values != 0))
        spanning = layer_components(deltas, g)
        with monkeypatch.context() as m:
            m.setattr(substructures, "_spanning_pairs", lambda support: support.nonzero(as_tuple=True))
            assert spanning == layer_components(deltas, g)
        counts.append(len(spanning))
    assert max(counts) > 1 and counts[-1] == 1, counts  # many components when sparse, one when dense


def test_support_of_an_exact_delta_needs_no_mask(monkeypatch):
    """An exact delta's support is its nonzero entries (mask None): the same parts as from the mask, for dense
    supports with gaps (counted a block of rows at a time, no mask made), block-diagonal halves (two
    components at density 0.5) and scattered entries; signed zeros stay as they are."""
    from hf_decompose import deltas

    monkeypatch.setattr(deltas, "BLOCK", 64)
    gen = torch.Generator().manual_seed(3)
    info = describe("model.layers.0.mlp.up_proj.weight", (40, 30), "llama")
    gappy = torch.randn(40, 30, generator=gen).bfloat16()
    gappy[torch.rand(40, 30, generator=gen) < 0.2] = 0.0
    gappy[0, 0] = -0.0
    halves = torch.zeros(40, 30)
    halves[:20, :15], halves[20:, 15:] = 1.0, 2.0
    scattered = torch.where(torch.rand(40, 30, generator=gen) < 0.05, torch.randn(40, 30, generator=gen), torch.zeros(()))
    made = []
    monkeypatch.setattr(deltas, "nonzero", lambda v: made.append(1) or v != 0)
    import hf_decompose.substructures as substructures

    monkeypatch.setattr(substructures, "nonzero", deltas.nonzero)
    for values, kinds, masked in ((gappy, ["dense"], False), (halves, ["block", "block"], True), (scattered, None, True)):
        made.clear()
        lazy = extract(info, values.clone(), None, zero_outside=True)
        eager = extract(info, values.clone(), values != 0, zero_outside=True)
        assert [p.kind for p in lazy.parts] == [p.kind for p in eager.parts] == (kinds or [p.kind for p in eager.parts])
        assert "sparse" in [p.kind for p in lazy.parts] or kinds
        assert bool(made) == masked
        assert all(torch.equal(a, b) for a, b in zip(lazy.state().values(), eager.state().values()))
    assert extract(info, gappy, None, zero_outside=True).get("dense").weight.view(torch.int16)[0, 0] == -0x8000


def test_pairs_of_a_delta_that_replaces_every_entry_are_those_of_a_full_support():
    from hf_decompose.substructures import _every_pair, _spanning_pairs

    for shape in ((5, 7), (1, 3), (4, 1)):
        got, expected = _every_pair(shape), _spanning_pairs(torch.ones(shape, dtype=torch.bool))
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), shape


def test_group_ids_of_fused_narrow_and_foreign_projections():
    """Phi-3's fused q/k/v rows are query heads then kv heads (GQA), its fused gate/up rows neuron j's at j and n/2 + j;
    OPT's out_proj is an output projection; MLA's o_proj columns are its narrower value heads' (not the config's rope
    head_dim), and its low-rank projections are plain matrices; a matrix the heads do not divide is refused by name.
    A dense Phi-3 layer is one component of every hidden dim, head, kv head and neuron."""
    g = Geometry(num_heads=4, num_kv_heads=2, head_dim=4, hidden_size=16)
    qkv = describe("model.layers.0.self_attn.qkv_proj.weight", (32, 16), "phi3")
    assert (qkv.role, qkv.group_kind, qkv.group_axis) == ("qkv", "head", 0)
    np.testing.assert_array_equal(group_ids(qkv, (32, 16), g), np.repeat([0, 1, 2, 3, 4, 5, 4, 5], 4))
    gate_up = describe("model.layers.0.mlp.gate_up_proj.weight", (64, 16), "phi3")
    assert (gate_up.role, gate_up.group_kind) == ("gate_up", "neuron")
    np.testing.assert_array_equal(group_ids(gate_up, (64, 16), g), np.tile(np.arange(32), 2))
    out = describe("model.decoder.layers.0.self_attn.out_proj.weight", (16, 16), "opt")
    assert (out.role, out.group_kind, out.group_axis) == ("o", "head", 1)
    o = describe("model.layers.0.self_attn.o_proj.weight", (16, 32), "deepseek_v3")
    np.testing.assert_array_equal(group_ids(o, (16, 32), g), np.repeat(np.arange(4), 8))
    for proj in ("q_a_proj", "q_b_proj", "kv_b_proj", "kv_a_proj_with_mqa"):
        info = describe(f"model.layers.0.self_attn.{proj}.weight", (24, 16), "deepseek_v3")
        assert (info.role, info.group_kind) == ("matrix", "row"), info
    for name in ("model.layers.1.mlp.shared_experts.gate_proj.weight", "model.layers.0.mlp.shared_expert.down_proj.weight"):
        assert describe(name, (32, 16), "deepseek_v3").group_kind == "neuron"
    assert describe("model.layers.0.mlp.experts.3.gate_proj.weight", (32, 16), "qwen2_moe").role == "matrix"  # one routed expert
    for name, role in (("gpt_neox.embed_in.weight", "embed"), ("embed_out.weight", "lm_head"), ("transformer.word_embeddings.weight", "embed")):
        assert (describe(name, (300, 16), "gpt_neox").role, describe(name, (300, 16), "gpt_neox").group_kind) == (role, "token")
    odd = describe("model.layers.0.self_attn.q_proj.weight", (18, 16), "llama")
    with pytest.raises(ValueError, match=r"q_proj.weight: 18 rows do not split into 4 heads"):
        group_ids(odd, (18, 16), g)

    shapes = {"self_attn.qkv_proj": (32, 16), "self_attn.o_proj": (16, 16), "mlp.gate_up_proj": (64, 16), "mlp.down_proj": (16, 32)}
    deltas = {}
    for name, shape in shapes.items():
        info = describe(f"model.layers.0.{name}.weight", shape, "phi3")
        values = torch.ones(shape)
        deltas[name] = (info, extract(info, values, values != 0))
    assert layer_components(deltas, g) == [{"hidden": 3 * 16, "units": 4 + 2 + 32}]
