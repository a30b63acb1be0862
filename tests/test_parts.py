"""Substructure kinds: the registry, and a new kind as one class that the artifact and both executions use."""

import pytest
import torch
from torch import nn

from hf_decompose import ArtifactError, ConfigError, artifact, kernels
from hf_decompose.modules import DecomposedModule
from hf_decompose.annealing import _Candidate, _level_delta, mixed_widths
from hf_decompose.config import DecomposedConfig, Level
from hf_decompose.parts import PART_KINDS, DensePart, LowRankPart, Part, QuantLowRankPart, QuantPart, TensorDelta, register_part
from hf_decompose.parts.base import expect


class DiagonalPart(Part):
    """A toy kind: a diagonal delta of a square matrix, stored as ``diagonal.values``."""

    kind, order, fields = "diagonal", 35, ("values",)

    def __init__(self, values: torch.Tensor, shape: tuple[int, ...]):
        super().__init__(shape)
        self.register_buffer("values", values)

    def state(self):
        return {"values": self.values}

    @classmethod
    def from_state(cls, shape, tensors):
        return cls(tensors["values"], shape)

    def check(self):
        expect(self.values, (min(self.shape),), values=True)

    def add_to(self, out):
        out.diagonal().add_(self.values.float())

    def forward(self, x, lookup=False):
        return x[..., : self.shape[0]] * self.values.to(x.dtype)


@pytest.fixture
def diagonal_kind():
    register_part(DiagonalPart)
    yield DiagonalPart
    PART_KINDS.pop("diagonal")


def test_kinds_are_registered_in_storage_and_summation_order():
    assert list(PART_KINDS) == ["dense", "block", "sparse", "override", "lowrank", "qlowrank", "quant", "quantfull"]
    with pytest.raises(ValueError, match="already registered"):
        register_part(type("Another", (DensePart,), {}))
    delta = TensorDelta("w", (4, 4), parts=[LowRankPart(torch.ones(4, 1), torch.ones(1, 4)), DensePart(torch.ones(4, 4))])
    assert [p.kind for p in delta.parts] == ["dense", "lowrank"]  # parts sorted by their kind's order


def test_a_new_kind_is_one_class_stored_read_merged_and_run(diagonal_kind, tmp_path):
    gen = torch.Generator().manual_seed(0)
    diagonal = torch.randn(8, generator=gen)
    lowrank = LowRankPart(torch.randn(8, 2, generator=gen), torch.randn(2, 8, generator=gen))
    delta = TensorDelta("weight", (8, 8), parts=[lowrank, diagonal_kind(diagonal, (8, 8))])
    expected = torch.diag(diagonal) + lowrank.u @ lowrank.v
    torch.testing.assert_close(delta.to_dense(), expected)

    artifact.save(tmp_path / "a", {"weight": delta}, _index(), {})
    _, read = artifact.load(tmp_path / "a")
    assert [p.kind for p in read["weight"].parts] == ["diagonal", "lowrank"]
    assert torch.equal(read["weight"].to_dense(), delta.to_dense())

    base = nn.Linear(8, 8, bias=False)
    x = torch.randn(3, 8, generator=gen)
    merged, split, _ = _merged_and_split(base, read["weight"], x)
    torch.testing.assert_close(merged, x @ (base.weight + expected).t())
    torch.testing.assert_close(split, merged)


def test_a_stored_part_that_does_not_fit_its_shape_is_refused(diagonal_kind, tmp_path):
    delta = TensorDelta("weight", (8, 8), parts=[diagonal_kind(torch.ones(5), (8, 8))])
    artifact.save(tmp_path / "a", {"weight": delta}, _index(), {})
    with pytest.raises(ArtifactError, match="'weight' is malformed.*expected \\(8,\\)"):
        artifact.load(tmp_path / "a")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_stored_part_holding_one_nan_or_inf_anywhere_is_refused(tmp_path, dtype):
    """Parts are checked on their exponent bits (`checkpoints.all_finite`), not by `torch.isfinite`: one bad value in
    any position of any float dtype, its largest and smallest finite values and its subnormals passing."""
    info = torch.finfo(dtype)
    values = torch.linspace(-1, 1, 4096).to(dtype)
    values[:4] = torch.tensor([info.max, -info.max, info.tiny, info.tiny / 4]).to(dtype)
    expect(values, (4096,), values=True)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in (0, 2047, 4095):
            spoiled = values.clone()
            spoiled[where] = bad
            with pytest.raises(ValueError, match="NaN/Inf"):
                expect(spoiled, (4096,), values=True)
    delta = TensorDelta("weight", (64, 64), parts=[DensePart(values.view(64, 64).clone().index_fill_(1, torch.tensor([7]), float("nan")))])
    artifact.save(tmp_path / "a", {"weight": delta}, _index(), {})
    with pytest.raises(ArtifactError, match="'weight' is malformed.*NaN/Inf"):
        artifact.load(tmp_path / "a")


def test_a_kind_stored_incompletely_is_refused(tmp_path):
    delta = TensorDelta("weight", (4, 4), parts=[LowRankPart(torch.ones(4, 1), torch.ones(1, 4))])
    tensors = delta.state()
    del tensors["weight.lowrank.v"]
    with pytest.raises(ValueError, match="lowrank part is stored incompletely .*'lowrank.v'"):
        TensorDelta.from_state("weight", (4, 4), False, tensors)


def test_low_bit_low_rank_is_stored_read_merged_and_run(tmp_path):
    """`qlowrank`: factors in a few bits per direction, one part per width; the artifact holds the packed
    bytes it counts, reads back the same factors, and both executions run them."""
    gen = torch.Generator().manual_seed(1)
    u, v = torch.randn(32, 6, generator=gen), torch.randn(6, 48, generator=gen)
    parts = [QuantLowRankPart.quantize(u[:, :2], v[:2], 8), QuantLowRankPart.quantize(u[:, 2:], v[2:], 2)]
    delta = TensorDelta("weight", (32, 48), parts=parts)
    assert delta.rank == 6 and delta.nbytes() == (2 * 80 * 8 + 4 * 80 * 2) // 8 + 2 * 2 * 6
    torch.testing.assert_close(delta.to_dense(), sum(p.factors()[0] @ p.factors()[1] for p in parts))
    assert float((parts[0].factors()[0] @ parts[0].factors()[1] - u[:, :2] @ v[:2]).norm()) < 0.01 * float((u[:, :2] @ v[:2]).norm())
    artifact.save(tmp_path / "a", {"weight": delta}, _index(), {})
    assert (tmp_path / "a" / artifact.WEIGHTS).stat().st_size < delta.nbytes() + 4096  # packed, not int8 codes
    _, read = artifact.load(tmp_path / "a")
    assert [p.kind for p in read["weight"].parts] == ["qlowrank", "qlowrank"]
    assert torch.equal(read["weight"].to_dense(), delta.to_dense())
    merged, split, module = _merged_and_split(nn.Linear(48, 32, bias=False), read["weight"], torch.randn(3, 48, generator=gen))
    torch.testing.assert_close(split, merged)
    assert [name for name, _ in module.ops.named_children()] == ["qlowrank"]  # every width's directions in one module
    held = module.ops.qlowrank
    assert held.u_codes is None and held.u_half.dtype == held.v_half.dtype == torch.int8  # one byte a code, the 8-bit ones too
    dense = read["weight"].to_dense()
    x = torch.randn(3, 48, generator=gen, requires_grad=True)  # a gradient to carry: PyTorch's matmuls, not the kernel
    torch.testing.assert_close(held(x), x @ dense.t())
    ids = torch.tensor([[0, 31], [5, 5]])
    torch.testing.assert_close(held(ids, lookup=True), dense[ids])
    y = held(x.detach().bfloat16())  # 16-bit inputs: float factors in their dtype, dequantized once
    assert y.dtype == torch.bfloat16 and held._float[0] == (x.device, torch.bfloat16)
    torch.testing.assert_close(y.float(), x.detach() @ dense.t(), rtol=2e-2, atol=2e-2 * float((x @ dense.t()).abs().max()))
    assert "_float" not in vars(held.to(torch.float64))  # a cast drops them


def test_mixed_precision_spends_bits_where_the_energy_is():
    """Reverse water-filling: within the budget, never more bits for a weaker direction, none for a silent one;
    on a planted low-rank delta with noise, ``mix1`` leaves far less output error than ``lr0.5+int1`` at fewer bytes."""
    s = torch.tensor([10.0, 5.0, 1.0, 0.1, 0.0])
    for bits in (0.05, 0.2, 1.0, 4.0):
        widths = mixed_widths(s, (100, 200), bits)
        assert widths == sorted(widths, reverse=True) and widths[-1] == 0
        assert sum(w * 300 + (32 if w else 0) for w in widths) <= bits * 100 * 200
    assert mixed_widths(s, (100, 200), 4.0)[0] == 8 and mixed_widths(s, (100, 200), 0.05)[1:] == [0, 0, 0, 0]
    gen = torch.Generator().manual_seed(0)
    d = (torch.randn(96, 8, generator=gen) @ torch.randn(8, 192, generator=gen)) * 1e-2 + torch.randn(96, 192, generator=gen) * 1e-3
    x = torch.randn(500, 192, generator=gen) * torch.linspace(0.1, 3, 192)
    full, config = TensorDelta("w", (96, 192), parts=[DensePart(d)]), DecomposedConfig(mode="anneal")

    def level(spec: str) -> tuple[float, int]:
        t = _level_delta(_Candidate(full, x.t() @ x, config), Level.parse(spec))
        return float((x @ (t.to_dense() - d).t()).square().sum() / (x @ d.t()).square().sum()), t.nbytes()

    (mixed, mixed_bytes), (residual, residual_bytes) = level("mix1"), level("lr0.5+int1")
    assert mixed_bytes <= 96 * 192 / 8 < residual_bytes and mixed < 0.1 * residual


def test_a_step_level_with_steps_per_column_is_smaller_stored_at_version_4_and_runs(tmp_path):
    """``column_steps``: a step level's codes take a step per column (coarser where the calibration inputs are small):
    fewer bytes at a smaller output error than one step per row on inputs of very different scales; the artifact says
    format version 4 (a reader of 3 refuses it rather than drop the multipliers) and reads back the same delta, which
    runs split as merged."""
    gen = torch.Generator().manual_seed(4)
    d = torch.randn(512, 128, generator=gen) * 1e-3  # rows enough that the multipliers' 2 bytes a column are small
    x = torch.randn(800, 128, generator=gen) * torch.logspace(-1, 1, 128)
    full = TensorDelta("weight", (512, 128), parts=[DensePart(d)])

    def level(power: float) -> tuple[TensorDelta, float]:
        config = DecomposedConfig(mode="anneal", annealing={"column_steps": power})
        t = _level_delta(_Candidate(full, x.t() @ x, config), Level.parse("step1.5"))
        return t, float((x @ (t.to_dense() - d).t()).square().sum() / (x @ d.t()).square().sum())

    (per_row, row_error), (per_column, column_error) = level(0.0), level(0.5)
    assert per_row.parts[0].columns is None and per_column.parts[0].columns.shape == (128,)
    assert per_column.nbytes() < per_row.nbytes() and column_error < 0.7 * row_error
    artifact.save(tmp_path / "a", {"weight": per_column}, _index(), {})
    assert artifact.read_index(tmp_path / "a")["format_version"] == 4
    _, read = artifact.load(tmp_path / "a")
    assert torch.equal(read["weight"].to_dense(), per_column.to_dense())
    merged, split, _ = _merged_and_split(nn.Linear(128, 512, bias=False), read["weight"], torch.randn(3, 128, generator=gen))
    torch.testing.assert_close(split, merged, rtol=0, atol=1e-5 * float(merged.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_entries_run_split_in_16_bit_on_cpu(dtype):
    """A 16-bit model's split execution runs its sparse entries (CPU's sparse matmul has no 16-bit kernel)."""
    from hf_decompose.parts import SparsePart

    rows, cols = torch.tensor([0, 2, 2, 5]), torch.tensor([1, 0, 3, 7])
    values = torch.tensor([0.5, -1.0, 0.25, 2.0])
    delta = TensorDelta("weight", (6, 8), parts=[SparsePart(rows, cols, values.to(dtype), (6, 8), torch.zeros(4, dtype=torch.int32))])
    base = nn.Linear(8, 6, bias=False).to(dtype)
    x = torch.randn(3, 8).to(dtype)
    merged, split, _ = _merged_and_split(base, delta, x)
    assert split.dtype == dtype
    torch.testing.assert_close(split.float(), merged.float(), rtol=0, atol=2e-2 * float(merged.float().abs().max()))


def _merged_and_split(base: nn.Module, delta: TensorDelta, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, DecomposedModule]:
    """`base` with `delta` run merged, then split, on `x`; and the module."""
    module = DecomposedModule(base, delta)
    with torch.no_grad():
        merged = module(x)
        module.execution = "split"
        return merged, module(x), module


def _index() -> dict:
    return {"config": {}, "base_model": {"id": "base", "sha256": {"model.safetensors": "0" * 64}}}


def test_low_rank_stored_in_bfloat16_runs_in_the_base_dtype(monkeypatch):
    """Factors stored in bfloat16 are converted once for a float32 base: the same numbers as a cast per call through
    PyTorch's kernels (within float32 rounding of them through hf_decompose's)."""
    gen = torch.Generator().manual_seed(3)
    u, v = torch.randn(24, 2, generator=gen).bfloat16(), torch.randn(2, 32, generator=gen).bfloat16()
    base = nn.Linear(32, 24, bias=False)
    module = DecomposedModule(base, TensorDelta("weight", (24, 32), parts=[LowRankPart(u, v)]), execution="split")
    assert module.ops.lowrank.u.dtype == torch.float32 and module.delta.parts[0].u.dtype == torch.bfloat16  # the stored delta keeps its own
    x = torch.randn(3, 32, generator=gen)
    with torch.no_grad():
        expected = base(x) + nn.functional.linear(nn.functional.linear(x, v.float()), u.float())
        torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
        monkeypatch.setattr(kernels, "available", lambda: False)
        assert torch.equal(module(x), expected)
        assert module.to(torch.bfloat16).ops.lowrank.u.dtype == torch.bfloat16  # a cast of the model casts the factors


def test_low_rank_runs_with_u_laid_out_as_its_transpose():
    """At run time `u` (out, r) is stored as its transpose's rows (the second product's fast operand), a
    lookup's stays row-major; the values and the stored delta are unchanged."""
    gen = torch.Generator().manual_seed(4)
    u, v = torch.randn(24, 3, generator=gen), torch.randn(3, 32, generator=gen)
    linear = DecomposedModule(nn.Linear(32, 24, bias=False), TensorDelta("weight", (24, 32), parts=[LowRankPart(u, v)]), execution="split")
    run = linear.ops.lowrank.u
    assert run.stride() == (1, 24) and torch.equal(run, u) and linear.delta.parts[0].u.is_contiguous()
    x = torch.randn(2, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(linear(x), linear.base(x) + nn.functional.linear(nn.functional.linear(x, v), u))
    embedding = DecomposedModule(nn.Embedding(24, 32), TensorDelta("weight", (24, 32), parts=[LowRankPart(u, v)]), execution="split")
    assert embedding.ops.lowrank.u.is_contiguous()


def test_parts_add_a_few_rows_at_a_time_as_they_add_whole(monkeypatch):
    """Dense, low-rank, quantized and quantized low-rank parts added to a matrix by blocks of rows (no temporary of
    its size) give the very bits of adding them whole; a 0-d delta is added whole."""
    from hf_decompose.parts import base
    from hf_decompose.quantize import quantize

    g = torch.Generator().manual_seed(0)
    shape = (70, 96)
    packed, scales = quantize(torch.randn(*shape, generator=g) * 1e-3, 4, 32)
    u, v = torch.randn(70, 5, generator=g).bfloat16(), torch.randn(5, 96, generator=g).bfloat16()
    parts = [DensePart(torch.randn(*shape, generator=g).bfloat16()), LowRankPart(u, v), QuantPart.from_packed(packed, scales, shape),
             QuantLowRankPart.quantize(u.float(), v.float(), 4)]
    whole = [TensorDelta("w", shape, False, [p]).to_dense() for p in parts]
    monkeypatch.setattr(base.row_blocks, "__defaults__", (8,))
    by_rows = [TensorDelta("w", shape, False, [p]).to_dense() for p in parts]
    assert all(torch.equal(a, b) for a, b in zip(whole, by_rows)) and len(list(base.row_blocks(whole[0]))) == 9
    assert float(TensorDelta("s", (), False, [DensePart(torch.tensor(0.25))]).merge(torch.tensor(1.0))) == 1.25


def test_a_level_with_8_bit_factors_stores_them_in_half_the_bytes_at_the_same_output_error(tmp_path):
    """``lr<eps>q8+step...``: the kept directions' factors in 8-bit codes with a scale per direction (`qlowrank`) rather
    than bfloat16, rounded before the residual so that its codes absorb their rounding: half the factors' bytes at
    the output error on the calibration inputs of bfloat16 factors (4-bit factors: 1.35x; rounded after the codes, not
    absorbed, 3.1x); the artifact reads back the same delta, which runs split as merged, in one pass of the compiled
    kernel beside the codes."""
    gen = torch.Generator().manual_seed(5)
    d = torch.randn(256, 8, generator=gen) @ torch.randn(8, 128, generator=gen) * 3e-3 + torch.randn(256, 128, generator=gen) * 2e-3
    x = torch.randn(600, 128, generator=gen) * torch.linspace(0.2, 2.0, 128)
    full, config = TensorDelta("weight", (256, 128), parts=[DensePart(d)]), DecomposedConfig(mode="anneal")

    def level(spec: str) -> tuple[TensorDelta, float]:
        t = _level_delta(_Candidate(full, x.t() @ x, config), Level.parse(spec))
        return t, float((x @ (t.to_dense() - d).t()).square().sum() / (x @ d.t()).square().sum())

    (bf16, bf16_error), (q8, q8_error) = level("lr0.3+step1.5"), level("lr0.3q8+step1.5")
    assert sorted(p.kind for p in bf16.parts) == ["lowrank", "quant"] and sorted(p.kind for p in q8.parts) == ["qlowrank", "quant"]
    low, before = q8.get("qlowrank"), bf16.get("lowrank")
    assert low.bits == 8 and low.rank == before.rank > 0 and low.nbytes() < 0.52 * before.nbytes()
    assert q8_error < 1.02 * bf16_error and level("lr0.3q4+step1.5")[1] < 2 * bf16_error < level("step1.5")[1]
    artifact.save(tmp_path / "a", {"weight": q8}, _index(), {})
    _, read = artifact.load(tmp_path / "a")
    assert torch.equal(read["weight"].to_dense(), q8.to_dense())
    merged, split, module = _merged_and_split(nn.Linear(128, 256, bias=False), read["weight"], torch.randn(3, 128, generator=gen))
    torch.testing.assert_close(split, merged, rtol=0, atol=1e-5 * float(merged.abs().max()))
    if kernels.available():
        from hf_decompose.parts.quant import kernel_parts

        assert kernel_parts(module.ops.parts()) is not None  # codes and 8-bit factors in one pass
    for spec, message in (("lr0.3q8", "beside codes"), ("lr0.3q9+step1.5", "2 to 8 bits"), ("lr0.3q1+int4", "2 to 8 bits"), ("q8+int4", "not of the form")):
        with pytest.raises(ConfigError, match=message):
            Level.parse(spec)
