"""Annealing on the tiny trained pair: the guard rolls back, compensation helps, sets stay disjoint."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_decompose import ConfigError, DecomposedConfig, PromptError, annealing, decompose
from hf_decompose.config import LADDER, TARGET_SCHEDULES
from hf_decompose.annealing import GramCollector, calibrate, guard, weighted_lowrank
from hf_decompose.modules import DecomposedModule
from hf_decompose.parts import DensePart


@pytest.fixture(scope="module")
def exact(tiny_pair):
    model = decompose(tiny_pair.finetuned, tiny_pair.base, DecomposedConfig(mode="lossless", execution="split"), progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_pair.finetuned)
    return model, tok, calibrate(model, tok, tiny_pair.calib_prompts[:8], 16)


def _module(model, suffix):
    return next(m for n, m in model.named_modules() if n.endswith(suffix) and isinstance(m, DecomposedModule))


def test_guard_rejects_a_planted_breaking_step(exact):
    model, _, calib = exact
    assert guard(model, calib)[0]
    module = _module(model, "layers.0.mlp.down_proj")
    full = module.delta
    broken = type(full)(full.name, full.shape, full.transposed, [DensePart(full.get("dense").weight * -20)])
    module.set_delta(broken)
    ok, stats = guard(model, calib)
    module.set_delta(full)
    assert not ok and stats["top1_agreement"] < 1.0
    assert guard(model, calib)[0]


def test_annealing_rolls_back_levels_that_break_equivalence(tiny_pair, exact):
    # level 1.0 drops every direction (rank 0): generation must change, so every layer rolls back
    config = DecomposedConfig(mode="anneal", annealing={"levels": [1.0], "calibration_prompts": 8, "calibration_tokens": 16, "precision": False})
    model = decompose(tiny_pair.finetuned, tiny_pair.base, config, calibration=tiny_pair.calib_prompts, progress=False)
    annealing = model.report["annealing"]
    assert {layer["layer"] for layer in annealing["levels"]} >= {"model.layers.0", "model.layers.1"}
    assert all(layer["level"] is None for layer in annealing["levels"])
    assert annealing["trace"] and not any(step["accepted"] for step in annealing["trace"])
    assert model.report["kept_fraction"] > 0.99  # everything rolled back to the exact delta
    ids = exact[2].input_ids[:4]
    finetuned = AutoModelForCausalLM.from_pretrained(tiny_pair.finetuned)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, finetuned(input_ids=ids).logits)  # the exact delta, restored: the fine-tune


def _layer_grams(exact, names: dict[str, str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(exact delta, calibration Gram of its inputs) of real modules of the tiny fine-tune."""
    model, _, calib = exact
    modules = {k: _module(model, v) for k, v in names.items()}
    grams = GramCollector(modules).run(model, calib)
    return {k: (m.delta.to_dense(), grams[k]) for k, m in modules.items()}


def _output_error(delta: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """||(delta - approx) X^T||^2 from the Gram X^T X."""
    e = (delta - approx).double()
    return float(torch.trace(e @ gram.double() @ e.t()))


def test_compensation_beats_plain_truncation_on_a_real_layer(exact):
    names = {"up": "layers.1.mlp.up_proj", "down": "layers.1.mlp.down_proj", "q": "layers.1.self_attn.q_proj"}
    for key, (delta, gram) in _layer_grams(exact, names).items():
        r = max(1, min(delta.shape) // 8)
        u, v, _ = weighted_lowrank(delta, gram.double())
        pu, pv, _ = weighted_lowrank(delta, None)
        assert _output_error(delta, u[:, :r] @ v[:r], gram) < 0.9 * _output_error(delta, pu[:, :r] @ pv[:r], gram), key


@pytest.mark.parametrize("weighted", [True, False])
def test_tall_matrices_factor_through_their_gram_as_the_svd_does(weighted, monkeypatch):
    """A head-shaped delta (rank 6 plus noise) factored through its Gram: the same singular values, and every
    truncation as good as the SVD's, as `_output_error` weighs it."""
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(9000, 6, generator=g) @ torch.randn(6, 96, generator=g) + 0.05 * torch.randn(9000, 96, generator=g)
    x = torch.randn(400, 96, generator=g) * torch.linspace(0.1, 3.0, 96)
    gram = x.t() @ x if weighted else None
    tall = weighted_lowrank(delta, gram)
    monkeypatch.setattr(annealing, "TALL", 10**9)
    svd = weighted_lowrank(delta, gram)
    assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(tall, svd))
    assert torch.allclose(tall[2], svd[2], rtol=0, atol=1e-5 * float(svd[2][0]))
    weight = torch.eye(96) if gram is None else gram
    for r in (1, 6, 40, 96):
        errors = [_output_error(delta, u[:, :r] @ v[:r], weight) for u, v, _ in (tall, svd)]
        assert errors[0] <= errors[1] * (1 + 1e-4) + 1e-6 * _output_error(delta, torch.zeros_like(delta), weight), r


@pytest.mark.parametrize("rows", [9000, 200])
def test_factors_cut_to_the_ranks_levels_keep_are_the_whole_factors_leading_columns(rows):
    """A candidate holds (and stores) only the directions a level of the ladder keeps: bit for bit the whole factors'
    leading ones, tall (`_tall_svd`) or not, so every level is the same; mixed levels keep every direction."""
    from hf_decompose.parts import TensorDelta

    g = torch.Generator().manual_seed(6)
    delta = torch.randn(rows, 6, generator=g) @ torch.randn(6, 96, generator=g) + 0.05 * torch.randn(rows, 96, generator=g)
    x = torch.randn(400, 96, generator=g) * torch.linspace(0.1, 3.0, 96)
    whole = weighted_lowrank(delta, x.t() @ x)
    cut = weighted_lowrank(delta, x.t() @ x, rank=lambda s: 7)
    assert torch.equal(cut[0], whole[0][:, :7]) and torch.equal(cut[1], whole[1][:7]) and torch.equal(cut[2], whole[2])
    full = TensorDelta("model.layers.0.mlp.down_proj.weight", tuple(delta.shape), False, [DensePart(delta)])
    ladder = annealing._Candidate(full, x.t() @ x, DecomposedConfig(mode="anneal"), cut=True)
    kept = ladder.rank_needed(whole[2])
    assert 0 < kept < 96 and ladder.factors[0].shape == (rows, kept) and ladder.factors[1].shape == (kept, 96)
    (eps,) = {level.eps for level in ladder.config.annealing_levels() if level.eps is not None}  # the default ladder's one eps
    assert kept == annealing.rank_for(whole[2], eps, ladder.floor)
    mixed = annealing._Candidate(full, x.t() @ x, DecomposedConfig(mode="anneal", annealing={"levels": ["int8", "mix2"]}), cut=True)
    assert mixed.factors[0].shape == (rows, 96)
    assert annealing._Candidate(full, x.t() @ x, ladder.config).factors[0].shape == (rows, 96)  # not cut: any level
    with pytest.raises(ValueError, match="cut to its config's ladder"):  # a level past the ladder's ranks, not fewer directions
        annealing._level_delta(ladder, annealing.Level.parse("mix8"))
    for level in (f"lr{eps}+step1.5", f"lr{eps}+int1", f"lr{eps}"):
        level = annealing.Level.parse(level)
        want = annealing._level_delta(annealing._Candidate(full, x.t() @ x, ladder.config, _factors=whole), level)
        assert torch.equal(annealing._level_delta(ladder, level).to_dense(), want.to_dense())


def test_bad_calibration_is_refused_before_any_checkpoint_is_read(tiny_pair, tmp_path, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError("a checkpoint was read")

    monkeypatch.setattr("hf_decompose.checkpoints.CheckpointReader.__init__", no_reads)
    for calibration, message in (([], "empty"), (tmp_path / "missing.txt", "does not exist"), (42, "not int")):
        with pytest.raises(PromptError, match=message):
            decompose(tiny_pair.finetuned, tiny_pair.base, DecomposedConfig(mode="anneal", calibration=calibration), progress=False)
        with pytest.raises(PromptError, match=message):
            AutoModelForCausalLM.from_pretrained(
                tiny_pair.finetuned, quantization_config=DecomposedConfig(base_model=str(tiny_pair.base), mode="anneal", calibration=calibration)
            )


def test_calibration_from_a_list_a_file_or_a_dataset_column(tmp_path):
    import datasets

    prompts = ["To be, or not to be", "Once upon a time", "The sea was calm"]
    (tmp_path / "calib.txt").write_text("\n".join(prompts))
    dataset = datasets.Dataset.from_dict({"question": prompts, "answer": ["a", "b", "c"]})
    for source, column, described in ((prompts, None, "3 prompts given"), (tmp_path / "calib.txt", None, "file calib.txt"), (dataset, "question", "Dataset (3 rows)")):
        assert DecomposedConfig(calibration=source, calibration_column=column).calibration_prompts() == (prompts, described)
    with pytest.raises(PromptError, match="no 'prompt' column"):
        DecomposedConfig(calibration=dataset, calibration_column="prompt").calibration_prompts()
    assert "calibration" not in DecomposedConfig(calibration=prompts).to_dict()  # run-time input, never saved


def test_anneal_through_the_hook_with_the_default_calibration_set(tiny_pair):
    prompts, source = DecomposedConfig().calibration_prompts()
    assert source == "built-in default set" and len(prompts) == 32 and len(set(prompts)) == 32
    config = DecomposedConfig(base_model=str(tiny_pair.base), mode="anneal", annealing={"levels": ["int8"], "calibration_prompts": 4, "calibration_tokens": 8})
    model = AutoModelForCausalLM.from_pretrained(tiny_pair.finetuned, quantization_config=config)
    assert model.report["mode"] == "anneal" and model.report["annealing"]["calibration"] == "built-in default set"
    assert model.report["annealing"]["trace"]  # the guard ran


def test_calibration_and_evaluation_sets_are_disjoint(tiny_pair):
    from hf_decompose.equivalence import check_disjoint

    check_disjoint(tiny_pair.calib_prompts, tiny_pair.eval_prompts)
    with pytest.raises(PromptError, match="overlap"):
        check_disjoint(tiny_pair.calib_prompts, tiny_pair.eval_prompts[:3] + tiny_pair.calib_prompts[:1])


def test_default_ladder_stores_fewer_bytes_and_keeps_calibration_exact(tiny_pair, exact, tmp_path):
    # the tiny model has many near-ties: a guard budget for 128 unseen positions lets some levels pass
    config = DecomposedConfig(mode="anneal", annealing={"calibration_prompts": 8, "calibration_tokens": 16, "positions": 128})
    model = decompose(tiny_pair.finetuned, tiny_pair.base, config, calibration=tiny_pair.calib_prompts, progress=False)
    report, annealing = model.report, model.report["annealing"]
    assert [layer for layer in annealing["levels"] if layer["level"] is not None]
    assert report["stored_fraction"] < 1.0 and report["size_bytes"]["artifact"] < 4 * report["delta_params"]
    assert any(d.get("quant") is not None or d.get("quantfull") is not None for d in model.deltas.values())
    ok, stats = guard(model, exact[2], positions=128)
    assert ok, stats  # what the guard accepted on calibration still holds
    loaded = type(model).from_pretrained(model.save_pretrained(tmp_path / "annealed"))
    ids = exact[2].input_ids[:2]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_error_feedback_beats_plain_rounding_on_a_real_layer(exact):
    from hf_decompose.quantize import codes_of, dequantize, quantize

    names = {"up": "layers.1.mlp.up_proj", "down": "layers.1.mlp.down_proj", "o": "layers.1.self_attn.o_proj"}
    for key, (delta, gram) in _layer_grams(exact, names).items():

        def rounded(packed, scales):
            return dequantize(codes_of(packed, delta.shape), scales)

        fed, plain = rounded(*quantize(delta, 3, 16, gram=gram)), rounded(*quantize(delta, 3, 16))
        assert _output_error(delta, fed, gram) < 0.9 * _output_error(delta, plain, gram), key


def test_tie_rule_and_flips_above_the_tolerance():
    """Teacher-forced tie-equivalence accepts a swapped near-tie only; flips expected above a
    tolerance are fewer than at any margin, and the same at tolerance 0."""
    from hf_decompose.annealing import Calibration, expected_flips, tie_equivalent

    ref = torch.tensor([[[5.0, 4.9995, 0.0], [3.0, 1.0, 0.0], [2.0, 1.9999, 1.0]]])  # margins 5e-4, 2, 1e-4
    top2 = ref.topk(2, dim=-1)
    calib = Calibration(torch.zeros(1, 1), torch.ones(1, 1), 0, top2.indices[..., 0], top2.indices[..., 1], top2.values[..., 0] - top2.values[..., 1], ref)
    swapped = ref.clone()
    swapped[0, 0, :2] = torch.tensor([4.9995, 5.0])  # the near-tie resolved the other way
    assert tie_equivalent(calib, swapped, 1e-3).tolist() == [[True, True, True]]
    assert tie_equivalent(calib, swapped, 1e-4).tolist() == [[False, True, True]]  # 5e-4 is no tie at 1e-4
    large = ref.clone()
    large[0, 1, :2] = torch.tensor([1.0, 3.0])  # a margin of 2 flipped
    assert tie_equivalent(calib, large, 1e-3).tolist() == [[True, False, True]]
    third = ref.clone()
    third[0, 2, 2] = 3.0  # the near-tie lost to a third token
    assert tie_equivalent(calib, third, 1e-3).tolist() == [[True, True, False]]
    noisy = ref + 0.01 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
    assert expected_flips(calib, noisy, 100, 0.0) > expected_flips(calib, noisy, 100, 1e-2) > expected_flips(calib, noisy, 100, 1e-1) > 0
    assert expected_flips(calib, ref, 100, 1e-3) == 0.0


def test_head_rows_coarser_for_tokens_far_below_the_top():
    """`head_row_steps`: a token's multiplier is its least distance below the top-1 over the calibration positions,
    over the gap, between 1 and the cap; tokens of the prompts and continuations keep 1 (padding is no token)."""
    from hf_decompose.annealing import HEAD_ROW_CAP, Calibration, head_row_steps

    ref = torch.tensor([[[9.0, 8.0, 1.0, -30.0, 5.0, -30.0], [2.0, 9.0, 3.0, -30.0, 7.0, -30.0]],
                        [[9.0, 0.0, 0.0, -30.0, 1.0, -30.0], [0.0, 0.0, 9.0, -30.0, 1.0, -30.0]]])  # least distances 0, 0, 0, 39, 2, 39
    top2 = ref.topk(2, dim=-1)
    ids, mask = torch.tensor([[3, 0, 1, 2], [0, 1, 2, 0]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # token 3 only as padding
    calib = Calibration(ids, mask, 2, top2.indices[..., 0], top2.indices[..., 1], top2.values[..., 0] - top2.values[..., 1], ref)
    cap = HEAD_ROW_CAP
    assert head_row_steps(calib, 1.0).tolist() == [1.0, 1.0, 1.0, cap, 2.0, cap]
    assert head_row_steps(calib, 0.5).tolist() == [1.0, 1.0, 1.0, cap, cap, cap]
    assert head_row_steps(calib, 8.0).tolist() == [1.0, 1.0, 1.0, cap, 1.0, cap]
    calib.input_ids = torch.tensor([[3, 0, 1, 5], [0, 1, 2, 4]])  # tokens 4 and 5 in the inputs
    assert head_row_steps(calib, 1.0).tolist() == [1.0, 1.0, 1.0, cap, 1.0, 1.0]


def test_targets_exact_is_lossless_and_floor_is_bounded_by_bf16(tiny_pair, exact):
    _, _, calib = exact
    config = DecomposedConfig(mode="anneal", annealing={"target": "exact", "calibration_prompts": 4, "calibration_tokens": 8})
    model = decompose(tiny_pair.finetuned, tiny_pair.base, config, calibration=tiny_pair.calib_prompts, progress=False)
    assert model.report["annealing"]["target"] == "exact" and not model.report["annealing"]["trace"]
    ids = calib.input_ids[:4]
    finetuned = AutoModelForCausalLM.from_pretrained(tiny_pair.finetuned)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, finetuned(input_ids=ids).logits)  # exact: the lossless artifact
    floor_config = DecomposedConfig(mode="anneal", annealing={"target": "floor", "calibration_prompts": 8, "calibration_tokens": 16, "positions": 128})
    floored = decompose(tiny_pair.finetuned, tiny_pair.base, floor_config, calibration=tiny_pair.calib_prompts, progress=False)
    annealing = floored.report["annealing"]
    assert annealing["target"] == "floor" and annealing["floor"]["mean_kl"] > 0
    assert annealing["schedule"] == "knapsack" and annealing["ladder"] == TARGET_SCHEDULES["floor"]["levels"]  # the floor target's own schedule
    assert floored.report["stored_fraction"] < model.report["stored_fraction"]
    for t in annealing["trace"]:  # every accepted level keeps within the bf16 floor
        if t["accepted"]:
            assert t["mean_kl"] <= annealing["floor"]["mean_kl"] and t["expected_flips_above_tolerance"] <= annealing["floor"]["expected_flips"]
    with pytest.raises(ConfigError, match="target"):
        DecomposedConfig(mode="anneal", annealing={"target": "close"})


def test_levels_and_schedule_left_unset_are_the_targets():
    """None is the target's: the floor target's knapsack, the ladder otherwise; what a user sets wins, and a
    saved config keeps None (a config re-targeted after loading, as the CLI's --target does, follows)."""
    tie = DecomposedConfig(mode="anneal")
    assert tie.annealing["schedule"] is None and tie.annealing_options()["schedule"] == "ladder"
    assert tie.annealing_options()["levels"] == LADDER["levels"]
    floor = DecomposedConfig(mode="anneal", annealing={"target": "floor"})
    assert floor.annealing_options() == floor.annealing | TARGET_SCHEDULES["floor"]
    mine = DecomposedConfig(mode="anneal", annealing={"target": "floor", "schedule": "ladder", "levels": ["int8"]})
    assert mine.annealing_options()["schedule"] == "ladder" and mine.annealing_options()["levels"] == ["int8"]
    reloaded = DecomposedConfig.from_dict(tie.to_dict())
    reloaded.annealing["target"] = "floor"
    assert reloaded.annealing_options()["schedule"] == "knapsack"
    with pytest.raises(ConfigError, match="schedule"):
        DecomposedConfig(mode="anneal", annealing={"schedule": "greedy"})


def test_knapsack_spends_damage_where_it_buys_most_bytes():
    """Two layers, one sensitive: the budget goes to the insensitive one (a ladder walked in order
    heats the first layer first); every budget's allocation stays within it."""
    import itertools

    from hf_decompose.allocation import solve, weighted_error

    costs = [[100.0, 50.0, 10.0], [100.0, 50.0, 10.0]]
    damages = [[0.0, 0.5, 4.0], [0.0, 0.01, 0.2]]  # layer 0 is 20x as sensitive
    assert solve(costs, damages, 0.25) == [0, 2]
    assert solve(costs, damages, 0.75) == [1, 2]
    assert solve(costs, damages, 0.0) == [0, 0] and solve(costs, damages, 10.0) == [2, 2]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        c = (torch.rand(4, 4, generator=gen) * 100).tolist()
        d = [[0.0, *row] for row in torch.rand(4, 3, generator=gen).tolist()]
        budget = float(torch.rand(1, generator=gen)) * 2
        choice = solve(c, d, budget)
        assert sum(d[i][j] for i, j in enumerate(choice)) <= budget
        best = min(sum(c[i][j] for i, j in enumerate(ch)) for ch in itertools.product(range(4), repeat=4) if sum(d[i][j] for i, j in enumerate(ch)) <= budget)
        assert sum(c[i][j] for i, j in enumerate(choice)) <= 1.5 * best  # the Lagrangian sweep is near the optimum
    e = torch.randn(3, 5, generator=gen)
    x = torch.randn(50, 5, generator=gen)
    assert weighted_error(e, x.t() @ x) == pytest.approx(float((x @ e.t()).square().sum()), rel=1e-6)
    assert weighted_error(e, None) == pytest.approx(float(e.square().sum()), rel=1e-6)


def test_a_layer_left_behind_keeps_its_error_feedback_factor_for_the_next_visit(tmp_path, monkeypatch):
    """With a store, only the layer last asked for stays in memory; a revisit (every heating round visits each
    layer) reads the Cholesky factor of its Grams back rather than recomputing it, and quantizes identically."""
    from hf_decompose import annealing
    from hf_decompose.config import Level
    from hf_decompose.layerwise import DeltaStore
    from hf_decompose.parts import TensorDelta

    gen = torch.Generator().manual_seed(0)
    layers = {f"model.layers.{i}": [f"model.layers.{i}.mlp.down_proj.weight"] for i in range(2)}
    exact = {n: TensorDelta(n, (8, 16), False, [DensePart(torch.randn(8, 16, generator=gen))]) for names in layers.values() for n in names}
    x = torch.randn(64, 16, generator=gen)
    made, of = [], annealing.Feedback.of
    monkeypatch.setattr(annealing.Feedback, "of", lambda gram: made.append(gram) or of(gram))
    cands = annealing._Candidates(layers, lambda layer: {n: exact[n] for n in layers[layer]}, lambda layer, names: {n: x.t() @ x for n in names},
                                  DecomposedConfig(mode="anneal"), DeltaStore(tmp_path))
    first, second = (names[0] for names in layers.values())
    level = Level.parse("lr0.5+step1.2")
    before = annealing._level_delta(cands[first], level).to_dense()
    annealing._level_delta(cands[second], level)  # the first layer leaves memory
    assert torch.equal(annealing._level_delta(cands[first], level).to_dense(), before)
    assert len(made) == 2  # once per matrix, not once per visit


@pytest.mark.parametrize("levels", [None, ["int8", "mix2"]])
def test_a_layer_left_behind_stores_its_gram_only_where_a_later_visit_may_use_it(tmp_path, levels):
    """The ladder's levels use a Gram only to build factors, the error-feedback factor and their 8-bit factors, kept
    from the first visit: the Gram stays out of the store (a third of it on the 1.5B synthetic Llama); mixed levels
    refit on it, so it is kept."""
    from hf_decompose import annealing
    from hf_decompose.config import Level
    from hf_decompose.layerwise import DeltaStore
    from hf_decompose.parts import TensorDelta

    gen = torch.Generator().manual_seed(0)
    layers = {f"model.layers.{i}": [f"model.layers.{i}.mlp.down_proj.weight"] for i in range(2)}
    exact = {n: TensorDelta(n, (8, 16), False, [DensePart(torch.randn(8, 16, generator=gen))]) for names in layers.values() for n in names}
    x = torch.randn(64, 16, generator=gen)
    store = DeltaStore(tmp_path)
    config = DecomposedConfig(mode="anneal", annealing={"levels": levels})
    cands = annealing._Candidates(layers, lambda layer: {n: exact[n] for n in layers[layer]}, lambda layer, names: {n: x.t() @ x for n in names},
                                  config, store)
    first, second = (names[0] for names in layers.values())
    level = Level.parse("lr0.5+step1.2")
    before = annealing._level_delta(cands[first], level).to_dense()
    annealing._level_delta(cands[second], level)  # the first layer leaves memory
    saved = store.get_tensors("candidates:model.layers.0")
    assert {f"{first}.u", f"{first}.feedback"} <= set(saved)
    assert saved[f"{first}.feedback"].numel() == 16 * 17 // 2  # the upper-triangular factor's rows from the diagonal on
    assert (f"{first}.gram" in saved) == (levels is not None)
    assert any(k.startswith(f"{first}.rounded.") for k in saved) == (levels is None)  # the default ladder's 8-bit factors, rounded instead
    assert torch.equal(annealing._level_delta(cands[first], level).to_dense(), before)
    assert torch.equal(cands[first].feedback.factor, annealing.Feedback.of(x.t() @ x).factor)  # read back whole


@pytest.mark.parametrize("levels", [["lr0.3q8+step1.2", "lr0.5q8+step1.2"], ["int8", "mix2"]])
def test_matrices_sharing_a_gram_share_its_error_feedback_factor_and_store_both_once(tmp_path, monkeypatch, levels):
    """An expert's gate and up rows weigh by one Gram (its tokens' hidden states): one error-feedback factor is made
    for both and, when their layer is left behind, it and the Gram (where kept) are stored once; a revisit reads
    them back shared and makes the same levels (a mixture's every expert holds an input-sized square of each). A
    ladder lets go of the Grams once a level is made, its 8-bit factors rounded on them first (mixed levels refit
    on them: kept)."""
    from hf_decompose import annealing
    from hf_decompose.config import Level
    from hf_decompose.layerwise import DeltaStore
    from hf_decompose.parts import TensorDelta

    gen = torch.Generator().manual_seed(0)
    layers = {f"model.layers.{i}": [f"model.layers.{i}.mlp.experts.0.{m}_proj.weight" for m in ("gate", "up")] for i in range(2)}
    exact = {n: TensorDelta(n, (8, 16), False, [DensePart(torch.randn(8, 16, generator=gen))]) for names in layers.values() for n in names}
    x = torch.randn(64, 16, generator=gen)
    config = DecomposedConfig(mode="anneal", annealing={"levels": levels})
    first, later = Level.parse("lr0.3q8+step1.2"), Level.parse("lr0.5q8+step1.2")  # two widths of 8-bit factors

    def grams(layer, names):  # one tensor for both, as `GramCollector` gives an expert's gate and up rows
        gram = x.t() @ x
        return dict.fromkeys(names, gram)

    def candidates(directory):
        return annealing._Candidates(layers, lambda layer: {n: exact[n] for n in layers[layer]}, grams, config, DeltaStore(directory))

    fresh = candidates(tmp_path / "fresh")  # what a candidate that kept its Gram makes
    want = {(n, level): annealing._level_delta(fresh[n], level).to_dense() for level in (first, later) for n in layers["model.layers.0"]}
    made, of = [], annealing.Feedback.of
    monkeypatch.setattr(annealing.Feedback, "of", lambda gram: made.append(gram) or of(gram))
    cands = candidates(tmp_path / "store")
    (gate, up), (other, _) = layers.values()
    assert all(torch.equal(annealing._made_once(cands, n, first).to_dense(), want[n, first]) for n in (gate, up))
    assert cands[gate].feedback is cands[up].feedback and len(made) == 1
    assert (cands[gate].gram is None) == ("mix2" not in levels)  # let go once its level is made, unless a mixed level refits on it
    assert all(torch.equal(annealing._level_delta(cands[n], later).to_dense(), want[n, later]) for n in (gate, up))
    annealing._level_delta(cands[other], first)  # the first layer leaves memory
    saved = cands.store.get_tensors("candidates:model.layers.0")
    assert f"{gate}.feedback" in saved and f"{up}.feedback" not in saved
    assert (f"{gate}.gram" in saved) == ("mix2" in levels) and f"{up}.gram" not in saved
    assert cands[gate].feedback is cands[up].feedback and ("mix2" not in levels or cands[gate].gram is cands[up].gram)  # read back shared
    assert all(torch.equal(annealing._level_delta(cands[n], level).to_dense(), want[n, level]) for n in (gate, up) for level in (first, later))
    assert len(made) == 2  # the second layer's; none on the revisit


def test_ladder_heats_in_rounds_so_a_time_cap_leaves_the_layers_alike(monkeypatch):
    """After the global bisection every layer still heating goes one level further per round (frozen at its first
    refusal): run to the end each layer stops where the guard refused it; stopped by the time cap mid-round no
    layer is more than a level above another (heating in model order would have spent it all on the first)."""
    from hf_decompose import annealing

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    order = [f"model.layers.{i}" for i in range(4)]
    highest = dict(zip(order, (5, 2, 5, 5)))  # the highest level the guard takes per layer; the whole model: level 1
    clock, installed = [0.0], {}
    monkeypatch.setattr(annealing.time, "perf_counter", lambda: clock[0])

    def check(label, level):
        clock[0] += 1.0  # each guard check takes a second
        return level <= 1 if label == "*" else all(installed[layer] <= highest[layer] for layer in order)

    def run(seconds):
        clock[0], bar = 0.0, Bar()
        levels = annealing._ladder(order, 6, installed.__setitem__, check, seconds, bar)
        assert installed == levels and bar.n == len(order)
        return list(levels.values())

    assert run(100.0) == [5, 2, 5, 5]
    assert run(9.0) == [3, 2, 2, 2]  # 3 bisection checks, a round of 4, layer 0 heated; then no room for a check and the precision step's


def test_ladder_heats_a_round_in_groups_and_splits_a_refused_one(monkeypatch):
    """A round's layers try their next level in groups, one check a group the guard takes; a refused group is split
    in halves down to the layer that refused (frozen), the others heat on: the same levels as one layer a check, in
    18 checks instead of 32. The first round starts from halves (all layers together are what the bisection refused);
    after its three refused checks, the next round goes a layer at a time; once none is refused, all together."""
    from hf_decompose import annealing

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    order = [f"model.layers.{i}" for i in range(8)]
    highest = dict.fromkeys(order, 5) | {"model.layers.5": 1}  # the highest level the guard takes per layer
    installed, calls = {}, []
    monkeypatch.setattr(annealing.time, "perf_counter", lambda: 0.0)

    def check(group, level):
        calls.append(group)
        return all(installed[layer] <= highest[layer] for layer in order)

    bar = Bar()
    levels = annealing._ladder(order, 6, installed.__setitem__, check, 100.0, bar)
    assert levels == installed == highest and bar.n == len(order)
    assert [len(g) if g != "*" else "*" for g in calls] == ["*"] * 3 + [4, 4, 2, 1, 1, 2] + [1] * 7 + [7] + [7]
    assert annealing._group_size(31, 0) == 31 and annealing._group_size(31, 1) == 16 and annealing._group_size(31, 3) == 8
    assert annealing._group_size(31, 10) == 2 and annealing._group_size(31, 12) == 1 and annealing._group_size(31, 16) == 1


@pytest.mark.parametrize("tied, annealing", [
    (True, {"levels": ["lr0.003", "lr0.01", "lr0.03"]}),  # low-rank-only levels: the bfloat16 precision step is accepted
    (False, {"schedule": "knapsack"}),
    (False, {"schedule": "knapsack", "levels": ["mix16", "mix8", "mix2"]}),  # low-bit low rank (`qlowrank`; the tiny deltas are full rank)
    (False, {"levels": ["lr0.3q8+int8", "lr0.3q8+step0.8"]}),  # 8-bit factors beside the codes (their refit on the Grams)
])  # fmt: skip
def test_layer_by_layer_anneal_matches_the_model_in_memory(tiny_pair, tiny_pair_untied, tied, annealing):
    """`decompose` anneals one decoder layer at a time (`layerwise`); annealing the whole model held in
    memory makes the same guard calls with the same statistics and keeps the same deltas."""
    streamed, kept, report = _annealed_both_ways(tiny_pair if tied else tiny_pair_untied, annealing)
    annealed = streamed.report["annealing"]
    assert [x["level"] for x in annealed["levels"]] == [x["level"] for x in report["levels"]]
    assert any(x["level"] is not None for x in report["levels"])  # something was annealed
    keys = ("accepted", "level", "layer", "expected_flips", "mean_kl", "max_abs_logit_diff", "top1_agreement", "tie_agreement")
    assert [{k: t.get(k) for k in keys} for t in annealed["trace"]] == [{k: t.get(k) for k in keys} for t in report["trace"]]
    assert annealed["precision"] == report["precision"]
    assert report["precision"]["accepted"] == tied
    if any("mix" in level or "q8" in level for level in annealing.get("levels", [])):  # the artifact stores and runs the low-bit factors
        assert any(p.kind == "qlowrank" for d in streamed.deltas.values() for p in d.parts)
        ids = torch.tensor([[1, 5, 9, 13]])
        with torch.no_grad():
            merged = streamed(input_ids=ids).logits
            split = streamed.set_execution("split")(input_ids=ids).logits
        torch.testing.assert_close(split, merged, rtol=0, atol=1e-4 * float(merged.abs().max()))
    assert set(streamed.deltas) == set(kept)
    for name, delta in kept.items():
        assert torch.equal(streamed.deltas[name].to_dense(), delta.to_dense()), name


def _annealed_both_ways(pair, annealing: dict):
    """`pair` annealed (8 calibration prompts x 16 tokens, then `annealing`) layer by layer through `decompose`, and as a
    whole model in memory (`anneal_model`): (the decomposed model, the kept deltas and report of the second)."""
    from hf_decompose.annealing import anneal_model
    from hf_decompose.checkpoints import CheckpointPair, CheckpointReader
    from hf_decompose.model import build_model, compute_deltas

    config = DecomposedConfig(mode="anneal", annealing={"calibration_prompts": 8, "calibration_tokens": 16, "positions": 128, **annealing})
    streamed = decompose(pair.finetuned, pair.base, config, calibration=pair.calib_prompts, progress=False)
    checkpoints = CheckpointPair(CheckpointReader(pair.base), CheckpointReader(pair.finetuned))
    deltas, _ = compute_deltas(checkpoints, config, progress=False)
    model = build_model(pair.base, pair.finetuned, deltas, config, checkpoints.dtype)
    kept, report = anneal_model(model, deltas, pair.finetuned, pair.base, pair.calib_prompts, config, progress=False)
    return streamed, kept, report


def test_head_row_steps_reach_the_tied_heads_codes_in_both_engines(tiny_pair):
    """With ``head_row_steps``, the tied head's step level scales each token's row step (`head_row_steps`): against
    the same anneal without them, rows of tokens off the calibration text and never its top-1 take the cap, the others
    keep theirs; layer by layer and in memory alike."""
    from hf_decompose.annealing import HEAD_ROW_CAP

    def head_scales(head_rows: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The tied head's scales, layer by layer and in memory."""
        streamed, kept, _ = _annealed_both_ways(tiny_pair, {"target": "kl", "tolerance": 1e9, "levels": ["lr0.3+step1.5"], "head_row_steps": head_rows})
        return tuple(d["model.embed_tokens.weight"].get("quant").scales.float()[:, 0] for d in (streamed.deltas, kept))

    model = AutoModelForCausalLM.from_pretrained(tiny_pair.finetuned)
    calib = calibrate(model, AutoTokenizer.from_pretrained(tiny_pair.finetuned), tiny_pair.calib_prompts[:8], 16)
    kept = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    kept[calib.input_ids[calib.attention_mask.bool()]] = True
    kept[calib.top1] = True
    for coarse, plain in zip(head_scales(1e-6), head_scales(0.0)):  # layer by layer, then in memory
        ratio = coarse / plain
        assert bool(kept.any()) and not bool(kept.all())
        torch.testing.assert_close(ratio[kept], torch.ones(int(kept.sum())), rtol=0, atol=0)
        torch.testing.assert_close(ratio[~kept], torch.full((int((~kept).sum()),), HEAD_ROW_CAP), rtol=2**-7, atol=0)


def test_calibration_batches_drop_only_the_padding_every_row_of_a_batch_has():
    """Each batch loses the leading columns that are padding in all its rows (prompts left-padded to the longest
    of the set), and nothing else: a runner sees the tokens a batch of its own would have."""
    from hf_decompose.layerwise import batches

    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    ids = torch.arange(24).view(4, 6) * mask
    (ids0, mask0), (ids1, mask1) = batches(ids, mask, 2)
    assert torch.equal(mask0, mask[:2, 2:]) and torch.equal(ids0, ids[:2, 2:])
    assert torch.equal(mask1, mask[2:]) and torch.equal(ids1, ids[2:])  # a full row keeps every column


def test_kl_is_exact_for_a_model_close_to_the_reference():
    """The guard's and `verify`'s KL agree with float64 to 1e-4 where the difference of two float32 log-softmaxes
    is off by percents (a close model's KL of 5e-7 over 49152 tokens)."""
    from hf_decompose.equivalence import kl_divergence

    gen = torch.Generator().manual_seed(0)
    ref = 3 * torch.randn(4, 49152, generator=gen)
    logits = ref + 1e-3 * torch.randn(ref.shape, generator=gen)
    lr, lm = ref.double().log_softmax(-1), logits.double().log_softmax(-1)
    want = (lr.exp() * (lr - lm)).sum(-1)
    log_softmaxes = torch.nn.functional.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert (log_softmaxes.double() / want - 1).abs().max() > 1e-2
    torch.testing.assert_close(kl_divergence(ref, logits).double(), want, rtol=1e-4, atol=0)


def test_annealed_levels_stay_decoded_within_a_budget_latest_layers_first(tmp_path):
    """A check re-materialises every layer after the one it changed: their levels stay decoded in memory up to a
    budget, the latest layers' first and at most two levels a layer (the installed one and the one tried); what
    leaves memory is read back from the store, equal."""
    from hf_decompose.annealing import _StoredLevels
    from hf_decompose.layerwise import DeltaStore
    from hf_decompose.parts import TensorDelta

    gen = torch.Generator().manual_seed(0)
    layers = {f"model.layers.{i}": [f"model.layers.{i}.mlp.down_proj.weight"] for i in range(3)}
    delta = {n: TensorDelta(n, (8, 16), False, [DensePart(torch.randn(8, 16, generator=gen))]) for names in layers.values() for n in names}
    made = _StoredLevels(DeltaStore(tmp_path), {}, layers, held_bytes=2 * 8 * 16 * 4)  # two matrices' worth
    for layer in layers:
        for level in (0, 1, 2):
            made[(layer, level)] = {n: delta[n] for n in layers[layer]}
    assert sorted(made.held) == [("model.layers.2", 1), ("model.layers.2", 2)]
    made.held_bytes = 4 * 8 * 16 * 4
    back = made.get(("model.layers.1", 2), None)
    assert sorted(made.held) == [("model.layers.1", 2), ("model.layers.2", 1), ("model.layers.2", 2)]
    name = layers["model.layers.1"][0]
    assert back[name] is not delta[name] and torch.equal(back[name].to_dense(), delta[name].to_dense())
    made[("model.layers.0", 3)] = {n: delta[n] for n in layers["model.layers.0"]}
    assert sorted(made.held) == [("model.layers.0", 3), ("model.layers.1", 2), ("model.layers.2", 1), ("model.layers.2", 2)]
    made[("model.layers.0", 4)] = {n: delta[n] for n in layers["model.layers.0"]}  # over budget: the earliest layer's oldest goes
    assert sorted(made.held) == [("model.layers.0", 4), ("model.layers.1", 2), ("model.layers.2", 1), ("model.layers.2", 2)]


def test_reference_logits_held_in_bfloat16_score_as_their_float32_values():
    """A bfloat16 model's reference logits are held as they come (bfloat16 values: half the memory of a float32
    copy, 96 MiB of the 1.5B synthetic Llama's calibration); the guard's statistics are those of their float32 values."""
    from hf_decompose.annealing import Calibration, _scores

    gen = torch.Generator().manual_seed(3)
    ref = (4 * torch.randn(6, 5, 300, generator=gen)).bfloat16()
    top2 = ref.float().topk(2, dim=-1)
    held = [Calibration(torch.zeros(6, 9, dtype=torch.long), torch.ones(6, 9, dtype=torch.long), 4, top2.indices[..., 0], top2.indices[..., 1],
                        top2.values[..., 0] - top2.values[..., 1], logits) for logits in (ref, ref.float())]
    model = [ref.float() + 0.05 * torch.randn(6, 5, 300, generator=gen)]
    scores = [_scores(calib, [model[0][:3], model[0][3:]], 2048, 1e-3) for calib in held]
    assert scores[0] == scores[1] and scores[0]["mean_kl"] > 0


def test_an_experts_gram_is_of_the_inputs_its_tokens_bring():
    """Each expert's matrices weigh by their own inputs: its gate and up rows by the hidden states of the tokens that
    chose it (one Gram, shared), its down projection by what its gate makes of them; padding left out; an expert no
    token chose by its layer's experts' mean."""
    from transformers import AutoConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

    config = AutoConfig.for_model("qwen2_moe", hidden_size=16, moe_intermediate_size=8, num_experts=4)
    torch.manual_seed(0)
    experts = Qwen2MoeExperts(config)
    torch.nn.init.normal_(experts.gate_up_proj)
    torch.nn.init.normal_(experts.down_proj)
    names = {"gate": ("in", 1), "up": ("in", 1), "down": ("down", 1), "down0": ("down", 0), "down3": ("down", 3)}
    collector = GramCollector(dict.fromkeys(names, experts), names)
    hidden = torch.randn(6, 16)  # two rows of three tokens, flattened
    index = torch.tensor([[1, 0], [2, 1], [0, 2], [1, 2], [0, 1], [2, 0]])  # expert 3 never chosen
    collector.mask = torch.tensor([[1, 1, 1], [0, 1, 1]])  # the second row's first token is padding
    with torch.no_grad():
        experts(hidden, index, torch.full((6, 2), 0.5))
    grams = collector.close()

    def inputs(expert):
        x = hidden[[0, 1, 2, 4, 5]][(index[[0, 1, 2, 4, 5]] == expert).any(-1)]
        gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
        return x, experts.act_fn(gate) * up

    x, h = inputs(1)
    assert len(x) == 3  # tokens 0, 1 and 4 (token 3, padding, chose it too)
    torch.testing.assert_close(grams["gate"], x.t() @ x)
    assert grams["up"] is grams["gate"]
    torch.testing.assert_close(grams["down"], h.t() @ h, rtol=1e-5, atol=1e-6)
    h0 = inputs(0)[1]
    torch.testing.assert_close(grams["down3"], (h.t() @ h + h0.t() @ h0) / 2, rtol=1e-5, atol=1e-6)


def test_a_dense_experts_gram_is_of_the_inputs_its_tokens_bring():
    """Llama 4's experts take every token once per expert, each scaled by its router score (zero where the expert was
    not chosen): an expert's Grams are of its own block's rows of the chosen tokens, padding left out, as for the
    experts interface's experts."""
    from transformers import AutoConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    config = AutoConfig.for_model("llama4_text", hidden_size=16, intermediate_size=8, num_local_experts=4)
    torch.manual_seed(0)
    experts = Llama4TextExperts(config)
    torch.nn.init.normal_(experts.gate_up_proj)
    torch.nn.init.normal_(experts.down_proj)
    names = {"gate_up": ("in", 1), "down": ("down", 1), "down0": ("down", 0), "down3": ("down", 3)}
    collector = GramCollector(dict.fromkeys(names, experts), names)
    hidden = torch.randn(6, 16)  # two rows of three tokens, flattened
    scores = torch.zeros(6, 4)
    scores[[0, 1, 3, 4, 5], [1, 1, 1, 0, 2]] = torch.rand(5) + 0.1  # top 1: expert 1 for tokens 0, 1 and 3; none chose 3
    collector.mask = torch.tensor([[1, 1, 1], [0, 1, 1]])  # the second row's first token (3) is padding
    routed = hidden.repeat(4, 1) * scores.t().reshape(-1, 1)  # as Llama4TextMoe calls its experts
    with torch.no_grad():
        experts(routed)
    grams = collector.close()

    def inputs(expert, tokens):
        x = routed.view(4, 6, 16)[expert, tokens]
        gate, up = (x @ experts.gate_up_proj[expert]).chunk(2, dim=-1)
        return x, experts.act_fn(gate) * up

    x, h = inputs(1, [0, 1])
    torch.testing.assert_close(grams["gate_up"], x.t() @ x)
    torch.testing.assert_close(grams["down"], h.t() @ h, rtol=1e-5, atol=1e-6)
    h0 = inputs(0, [4])[1]
    torch.testing.assert_close(grams["down0"], h0.t() @ h0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grams["down3"], (h.t() @ h + h0.t() @ h0) / 2, rtol=1e-5, atol=1e-6)
