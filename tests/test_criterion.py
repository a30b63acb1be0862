"""The criterion's statistical promises, on synthetic deltas whose truth is known."""

import numpy as np
import pytest
import torch

from hf_decompose import DecomposedConfig
from hf_decompose.criterion import assess_layer, entry_support, orthonormal_basis, reject, robust_sigma, spectral_test
from hf_decompose.groups import Geometry, describe

Q = 0.05


def _layer(tensors: dict[str, torch.Tensor]):
    return {name: (describe(name, tuple(t.shape), "llama"), t) for name, t in tensors.items()}


def test_bh_and_bonferroni_reference_values():
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])
    # Benjamini & Hochberg's worked logic: k=2 is the largest with p_(k) <= k q / m at q = 0.05.
    assert reject(p, 0.05, "bh").tolist() == [True, True] + [False] * 8
    assert reject(p, 0.05, "bonferroni").tolist() == [True] + [False] * 9
    assert reject(np.array([]), 0.05, "bh").size == 0


@pytest.mark.parametrize("correction", ["bh", "bonferroni"])
def test_entry_support_equals_full_procedure(correction):
    from scipy import stats

    torch.manual_seed(5)
    r = torch.randn(300, 200)
    r[:20, :10] += 7
    full = reject(2 * stats.norm.sf(r.abs().double().numpy()), 0.05, correction).reshape(r.shape)
    fast = entry_support(r, 1.0, DecomposedConfig(mode="criterion", correction=correction))
    assert fast.sum() > 150 and np.array_equal(fast.numpy(), full)


@pytest.mark.parametrize("correction", ["bh", "bonferroni"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "vector"])
def test_entry_support_in_row_blocks_keeps_ties_as_a_stable_sort(monkeypatch, correction, layout):
    """|z| rounded to quarters: thousands of ties, some at the cut; 1 KiB row blocks."""
    from scipy import stats

    import hf_decompose.criterion as criterion

    monkeypatch.setattr(criterion, "CHUNK_BYTES", 1024)
    torch.manual_seed(6)
    r = (torch.randn(200, 150) * (1 + 3 * (torch.rand(200, 150) < 0.1)) * 4).round() / 4
    r = {"contiguous": r, "transposed": r.t().contiguous().t(), "vector": r.reshape(-1)}[layout]
    for q in (0.2, 0.05, 1e-4):
        full = reject(2 * stats.norm.sf(r.abs().double().numpy()), q, correction).reshape(r.shape)
        blocks = entry_support(r, 1.0, DecomposedConfig(mode="criterion", q=q, correction=correction))
        assert np.array_equal(blocks.numpy(), full)


@pytest.mark.parametrize("correction", ["bh", "bonferroni"])
def test_pure_noise_false_positive_rate_at_most_q(correction):
    torch.manual_seed(0)
    config = DecomposedConfig(mode="criterion", q=Q, correction=correction)
    fp, total, any_rejection, ranks, directions = 0, 0, 0, 0, 0
    for trial in range(10):
        tensors = {
            f"model.layers.{trial}.mlp.gate_proj.weight": torch.randn(96, 48) * 3e-4,
            f"model.layers.{trial}.mlp.up_proj.weight": torch.randn(96, 48) * 3e-4,
            f"model.layers.{trial}.mlp.down_proj.weight": torch.randn(48, 96) * 3e-4,
            f"model.layers.{trial}.input_layernorm.weight": torch.randn(48) * 3e-4,
        }
        results = assess_layer(_layer(tensors), config, Geometry(4, 2, 12, 48))
        for result in results.values():
            fp += int(result.mask.sum())
            total += result.mask.numel()
            if result.spectral is not None:
                ranks += result.spectral.rank
                directions += len(result.spectral.pvalues)
            any_rejection += int(result.mask.any() or (result.spectral is not None and result.spectral.rank > 0))
    assert fp / total <= Q
    assert ranks / directions <= Q
    assert any_rejection <= 0.25 * 40  # FDR/FWER per family keeps whole-tensor false alarms rare


def test_planted_sparse_support_recall():
    torch.manual_seed(1)
    sigma, snr = 1e-4, 8.0
    delta = torch.randn(256, 128) * sigma
    planted = torch.rand(256, 128) < 0.01
    delta[planted] += snr * sigma * torch.sign(torch.randn(int(planted.sum())))
    config = DecomposedConfig(mode="criterion", q=Q, spectral_test=False, group_test=False)
    result = assess_layer(_layer({"model.layers.0.mlp.up_proj.weight": delta}), config, None)["model.layers.0.mlp.up_proj.weight"]
    recall = float((result.mask & planted).sum() / planted.sum())
    false_discovery = float((result.mask & ~planted).sum() / max(int(result.mask.sum()), 1))
    assert recall >= 0.95
    assert false_discovery <= Q * 2  # BH controls FDR in expectation; one draw stays near q


def test_group_test_finds_planted_neuron_and_head():
    torch.manual_seed(2)
    g = Geometry(num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32)
    s = 1e-4
    t = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(32, 32) * s,
        "model.layers.0.self_attn.k_proj.weight": torch.randn(16, 32) * s,
        "model.layers.0.self_attn.v_proj.weight": torch.randn(16, 32) * s,
        "model.layers.0.self_attn.o_proj.weight": torch.randn(32, 32) * s,
        "model.layers.0.mlp.gate_proj.weight": torch.randn(64, 32) * s,
        "model.layers.0.mlp.up_proj.weight": torch.randn(64, 32) * s,
        "model.layers.0.mlp.down_proj.weight": torch.randn(32, 64) * s,
    }
    # Neuron 5 and head 2 move by 1.6 sigma on every entry: invisible entry by entry, plain as a group.
    t["model.layers.0.mlp.gate_proj.weight"][5] += 1.6 * s
    t["model.layers.0.mlp.down_proj.weight"][:, 5] -= 1.6 * s
    t["model.layers.0.self_attn.q_proj.weight"][16:24] += 1.6 * s
    t["model.layers.0.self_attn.o_proj.weight"][:, 16:24] += 1.6 * s
    config = DecomposedConfig(mode="criterion", q=Q, spectral_test=False)
    r = assess_layer(_layer(t), config, g)
    gate = r["model.layers.0.mlp.gate_proj.weight"].mask
    assert gate[5].all() and gate.any(dim=1).sum() == 1
    assert r["model.layers.0.mlp.down_proj.weight"].mask[:, 5].all()
    q_rows = r["model.layers.0.self_attn.q_proj.weight"].mask.any(dim=1)
    assert q_rows[16:24].all() and q_rows.sum() == 8
    assert r["model.layers.0.self_attn.o_proj.weight"].mask[:, 16:24].all()
    assert not r["model.layers.0.self_attn.k_proj.weight"].mask.any()
    # entry tests alone see nothing
    entry_only = assess_layer(_layer(t), DecomposedConfig(mode="criterion", q=Q, spectral_test=False, group_test=False), g)
    assert entry_only["model.layers.0.mlp.gate_proj.weight"].mask[5].sum() <= 2


def test_spectral_test_recovers_planted_rank_and_not_noise():
    torch.manual_seed(3)
    noise = torch.randn(384, 192) * 1e-4
    u, v = torch.linalg.qr(torch.randn(384, 3))[0], torch.linalg.qr(torch.randn(192, 3))[0]
    spikes = torch.tensor([0.02, 0.01, 0.006])  # edge is ~1e-4 * (sqrt(384) + sqrt(192)) = 0.0034
    config = DecomposedConfig(mode="criterion")
    planted = spectral_test(noise + (u * spikes) @ v.t(), config)
    assert planted.rank == 3
    assert abs(planted.sigma - 1e-4) / 1e-4 < 0.1  # median-based scale ignores the spikes
    assert spectral_test(noise, config).rank == 0


def test_exact_structure_leaves_no_rounding_supported():
    """A merged adapter saved in float32 (fine-tune = base + B A, rounded once): its delta is rank 8 plus float32
    rounding, 1e-7 of its scale. The tests resolve noise down to `RESOLUTION`: the spectral part keeps rank 8 and no
    entry of the rounding is supported (every one was, and which ones depended on the device's rounding). An exactly
    sparse delta (robust scale 0) keeps every changed entry, and a noisy one is tested at its own scale."""
    gen = torch.Generator().manual_seed(0)
    names = [f"model.layers.0.mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
    layer = {}
    for name in names:
        shape = (256, 512) if "down" in name else (512, 256)
        base = torch.randn(shape, generator=gen) * 0.02
        lora = (torch.randn(shape[0], 8, generator=gen) * 0.01) @ (torch.randn(8, shape[1], generator=gen) * 0.01)
        layer[name] = (describe(name, shape, "llama"), (base + lora) - base)
    for name, test in assess_layer(layer, DecomposedConfig(mode="criterion"), None).items():
        assert test.stats["spectral_rank"] == 8 and test.stats["supported_entries"] == 0, name
    sparse = torch.zeros(512, 256)
    sparse.view(-1)[torch.randperm(sparse.numel(), generator=gen)[:300]] = torch.randn(300, generator=gen) * 1e-3
    only = assess_layer(_layer({names[0]: sparse.clone()}), DecomposedConfig(mode="criterion", spectral_test=False), None)[names[0]]
    assert torch.equal(only.mask, sparse != 0)
    noisy = torch.randn(512, 256, generator=gen) * 1e-4
    assert abs(assess_layer(_layer({names[0]: noisy}), DecomposedConfig(mode="criterion"), None)[names[0]].sigma - 1e-4) < 5e-6


def test_robust_sigma_ignores_outliers():
    torch.manual_seed(4)
    x = torch.randn(100_000) * 2.0
    x[:1000] = 1e3
    assert abs(robust_sigma(x) - 2.0) < 0.05


@pytest.mark.parametrize("arch", ["falcon", "gpt_neox"])
def test_matrices_of_unknown_roles_are_tested_per_tensor_never_pooled(arch):
    """Falcon's and GPT-NeoX's projections are no kind the groups know: each is its own group test,
    whatever else the layer holds (pooled, rows of unrelated matrices shared one test)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=1,
                                  num_attention_heads=4, new_decoder_architecture=False)  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(0)
    layer = {}
    for name, p in model.named_parameters():
        if ".0." in name and p.dim() == 2:
            delta = torch.randn(p.shape, generator=gen)
            delta[:3] += 1.5  # a few supported rows in every matrix
            layer[name] = (describe(name, tuple(p.shape), arch), delta)
    unknown = [n for n, (info, _) in layer.items() if info.role == "matrix"]
    assert len(unknown) >= 3 and len({layer[n][1].shape[0] for n in unknown}) > 1  # the larger first used to crash
    cfg = DecomposedConfig(mode="criterion", spectral_test=False)
    together = assess_layer({n: (i, d.clone()) for n, (i, d) in layer.items()}, cfg, Geometry.from_config(config.to_dict()))
    for name in unknown:
        info, delta = layer[name]
        alone = assess_layer({name: (info, delta.clone())}, cfg, Geometry.from_config(config.to_dict()))[name]
        assert np.array_equal(together[name].group_pvalues, alone.group_pvalues), name
        assert together[name].group_pvalues.size == delta.shape[0]
        assert torch.equal(together[name].mask, alone.mask)
        assert together[name].mask[:3].all(1).all() and together[name].stats["supported_groups"] >= 3


def test_orthonormal_basis_by_cholesky_and_householder_where_the_gram_is_singular_or_ill_conditioned():
    """The randomized SVD's bases: orthonormal, spanning the columns (Cholesky QR takes columns of any scales);
    Householder QR's own Q where Cholesky QR would lose orthogonality (a rank-deficient block, as an exactly
    low-rank delta gives, or nearly dependent columns)."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(4096, 72, generator=gen)
    for block in (y, y * torch.logspace(0, -6, 72)):
        q = orthonormal_basis(block)
        torch.testing.assert_close(q.T @ q, torch.eye(72), rtol=0, atol=1e-5)
        torch.testing.assert_close(q @ (q.T @ block), block, rtol=0, atol=1e-4)
    twins = y[:, :36] + 1e-6 * torch.randn(4096, 36, generator=gen)
    for block in (torch.cat([y[:, :36], y[:, :36]], 1), torch.cat([y[:, :36], twins], 1)):
        assert torch.equal(orthonormal_basis(block), torch.linalg.qr(block).Q)
        assert torch.equal(orthonormal_basis(block, exact=False), torch.linalg.qr(block).Q)
    # a power iteration's basis, by Cholesky QR in float32 up to a condition bound of 1e3: near orthonormal, the same span
    for block in (y, y * torch.logspace(0, -2, 72)):
        q = orthonormal_basis(block, exact=False)
        torch.testing.assert_close(q.T @ q, torch.eye(72), rtol=0, atol=0.05)
        span = torch.linalg.qr(block).Q
        torch.testing.assert_close(span @ (span.T @ q), q, rtol=0, atol=1e-4)
    ill = y * torch.logspace(0, -2.5, 72)  # a bound of 2.1e3: within the exact basis's, beyond the power iteration's
    assert not torch.equal(orthonormal_basis(ill), torch.linalg.qr(ill).Q)
    assert torch.equal(orthonormal_basis(ill, exact=False), torch.linalg.qr(ill).Q)


def test_bfloat16_power_iterations_keep_the_spectral_decisions(monkeypatch):
    """Where the device multiplies bfloat16 natively the randomized SVD's power iterations run in it: spikes near the
    noise edge and well above it get the same singular values (to float32's Rayleigh-Ritz accuracy), ranks and
    directions as in float32."""
    import hf_decompose.criterion as criterion

    gen = torch.Generator().manual_seed(3)
    m, n = 768, 512
    noise = torch.randn(m, n, generator=gen) * 1e-4
    edge = 1e-4 * (m**0.5 + n**0.5)
    spikes = [(torch.randn(m, 1, generator=gen), torch.randn(1, n, generator=gen), edge * f) for f in (20, 5, 1.6, 1.3, 1.1)]
    delta = noise + sum(s * (u / u.norm()) @ (v / v.norm()) for u, v, s in spikes)
    config = DecomposedConfig(mode="criterion")
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        monkeypatch.setattr(criterion, "subspace_dtype", lambda device, _d=dtype: _d)
        runs[dtype] = spectral_test(delta, config)
    single, mixed = runs[torch.float32], runs[torch.bfloat16]
    assert single.rank == mixed.rank >= 3
    np.testing.assert_allclose(mixed.singular_values[: single.rank + 1], single.singular_values[: single.rank + 1], rtol=1e-5)
    # the bulk's Ritz values: a hundredth of float32's own distance from the exact singular values
    exact = torch.linalg.svdvals(delta).double().numpy()[: len(single.singular_values)]
    assert np.abs(mixed.singular_values - single.singular_values).max() <= 0.01 * np.abs(single.singular_values - exact).max()
    torch.testing.assert_close(mixed.u @ mixed.v, single.u @ single.v, rtol=0, atol=1e-3 * float(single.singular_values[0]) / m**0.5)


def test_like_small_matrices_take_their_randomized_svds_in_stacks_each_as_alone(monkeypatch):
    """A mixture's experts (`BATCH_MIN` or more small matrices of one shape) run their randomized SVDs in stacks: each
    expert's triplets bit for bit its own run's (an exactly low-rank and a zero delta among them: Householder QR for
    those), and the layer's verdicts those of one matrix at a time; a matrix without enough like it runs alone."""
    import hf_decompose.criterion as criterion

    gen = torch.Generator().manual_seed(0)
    config = DecomposedConfig(mode="criterion")
    deltas = {}
    for e in range(9):
        for kind, shape in (("gate", (256, 512)), ("down", (512, 256))):
            change = torch.randn(shape[0], 4, generator=gen) @ torch.randn(4, shape[1], generator=gen) * 1e-3
            deltas[f"model.layers.0.mlp.experts.{e}.{kind}_proj.weight"] = torch.randn(shape, generator=gen) * 1e-4 + change
    deltas["model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.randn(256, 3, generator=gen) @ torch.randn(3, 512, generator=gen)
    deltas["model.layers.0.mlp.experts.1.gate_proj.weight"] = torch.zeros(256, 512)
    deltas["model.layers.0.self_attn.q_proj.weight"] = torch.randn(512, 512, generator=gen) * 1e-4
    monkeypatch.setattr(criterion, "BATCH_BYTES", 4 * 256 * 512 * 4)  # stacks of 4: nine experts of a kind in three
    triplets = criterion.batched_triplets(deltas, config)
    assert set(triplets) == {n for n in deltas if ".experts." in n}
    for name, got in triplets.items():
        assert all(torch.equal(a, b) for a, b in zip(got, criterion.randomized_svd(deltas[name], 72, niter=3, seed=config.seed))), name
    layer = {name: (describe(name, tuple(t.shape), "qwen3_moe"), t) for name, t in deltas.items()}
    stacked = assess_layer({n: (info, t.clone()) for n, (info, t) in layer.items()}, config, None)
    monkeypatch.setattr(criterion, "BATCH_MIN", 10**9)
    alone = assess_layer(layer, config, None)
    for name in deltas:
        assert torch.equal(stacked[name].mask, alone[name].mask) and stacked[name].stats == alone[name].stats, name
    assert alone["model.layers.0.mlp.experts.0.gate_proj.weight"].stats["spectral_rank"] == 3
