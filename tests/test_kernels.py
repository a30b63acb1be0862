"""hf_decompose's compiled CPU kernel: base matrix, 4-bit codes and low-rank factors in one pass."""

import numpy as np
import pytest
import torch

from hf_decompose import kernels
from hf_decompose.modules import DecomposedModule
from hf_decompose.parts import DensePart, LowRankPart, QuantPart, TensorDelta
from hf_decompose.quantize import dequantize, quantize_codes

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="hf_decompose's CPU kernel is not available here")


def _codes(shape, escaped: float, gen) -> torch.Tensor:
    """Codes mostly in -1..1 (annealing's), a share `escaped` of them anywhere in -8..7."""
    codes = torch.randint(-1, 2, shape, dtype=torch.int8, generator=gen)
    where = torch.rand(shape, generator=gen) < escaped
    codes[where] = torch.randint(-8, 8, (int(where.sum()),), dtype=torch.int8, generator=gen)
    return codes


def _held(codes: torch.Tensor, layout: str) -> kernels.HeldCodes:
    """Codes in the kernel's layout `layout` ("nibbles", "escaped" or "masked")."""
    return {"nibbles": lambda: kernels.HeldCodes(kernels.pack_nibbles(codes)), "escaped": lambda: kernels.pack_escaped(codes),
            "masked": lambda: kernels.pack_masked(codes)}[layout]()


def test_nibble_packing_round_trips_every_code():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 4)[:, torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    nibbles = kernels.pack_nibbles(codes)
    assert nibbles.shape == (3, 32) and nibbles.dtype == torch.uint8
    assert torch.equal(kernels.unpack_nibbles(nibbles), codes)
    assert torch.equal(kernels.unpack(kernels.HeldCodes(nibbles)), codes)


@pytest.mark.parametrize("escaped", [0.0, 0.07, 0.6])
@pytest.mark.parametrize("layout", ["escaped", "masked"])
def test_two_bit_packings_round_trip_whole_and_by_rows(escaped, layout):
    gen = torch.Generator().manual_seed(0)
    codes = _codes((9, 64), escaped, gen)
    codes[2, 5:40] = 0  # a run of zeros across chunks
    held = _held(codes, layout)
    escapes = held.offsets if layout == "escaped" else held.offsets[:, 0]
    assert held.shape == (9, 64) and escapes.tolist()[-1] == int((codes.abs() > 1).sum())
    if layout == "masked":  # a bit per code, a sign per -1 and 1
        assert held.q.shape == (9, 8) and held.offsets[-1, 1] == int((codes.abs() == 1).sum())
    assert torch.equal(kernels.unpack(held), codes)
    rows = torch.tensor([8, 0, 3, 3, 2])
    assert torch.equal(kernels.unpack(held, rows), codes[rows])


def test_masked_escapes_step_along_rows_wider_than_an_entrys_step():
    """Escapes' entries hold a 12-bit step from the previous escape's column: a wider gap takes entries of steps alone."""
    codes = torch.zeros(3, 8192, dtype=torch.int8)
    codes[0, 8000] = 5  # a row's first escape 8000 columns in: one step alone (4095), then its entry (3905)
    codes[1, [0, 4095, 8190]] = torch.tensor([-3, 2, 7], dtype=torch.int8)  # steps 0, 4095 and 4095: no entries alone
    codes[2, ::7] = 1
    held = kernels.pack_masked(codes)
    assert held.offsets[:, 0].tolist() == [0, 2, 5, 5]
    assert torch.equal(kernels.unpack(held), codes)
    assert torch.equal(kernels.unpack(held, torch.tensor([1, 0])), codes[[1, 0]])
    if kernels.available():
        scales, x = torch.rand(3, 128).bfloat16(), torch.randn(2, 8192, generator=torch.Generator().manual_seed(0))
        ref = x @ dequantize(codes, scales).t()
        torch.testing.assert_close(kernels.codes_matmul(x, held, scales), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_pack_takes_the_smallest_layout_the_kernel_reads():
    gen = torch.Generator().manual_seed(1)
    held = kernels.pack(_codes((32, 64), 0.07, gen))  # a third of them 0, 6% escaped: 2.3 bits two each, 3.1 masked
    assert held.escapes is not None and held.signs is None
    sparse = _codes((32, 64), 0.02, gen) * (torch.rand(32, 64, generator=gen) < 0.3)  # 80% zeros (an embedding's): 1.3 bits masked
    held = kernels.pack(sparse)
    assert held.signs is not None and held.nbytes() < kernels.pack_escaped(sparse).nbytes()
    assert kernels.pack(torch.randint(-8, 8, (32, 64), dtype=torch.int8, generator=gen)).escapes is None  # uniform: 5.5 against 4
    dense = _codes((2, 32), 0.0, gen)
    dense[1, 16:] = 5  # 16 escaped codes in a row: more than one 64-bit word of escapes, which the kernel reads per 16 codes
    assert kernels.pack(dense).escapes is None
    with pytest.raises(ValueError, match="at most 15"):
        kernels.pack_escaped(dense)
    assert torch.equal(kernels.unpack(kernels.pack_masked(dense)), dense)  # a list of escapes: any number of them


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9])
@pytest.mark.parametrize("shape,group", [((45, 32), 16), ((96, 128), 64), ((40, 576), 576)])  # 45: a block of outputs short of 8
@pytest.mark.parametrize("layout", ["nibbles", "escaped", "masked"])
def test_codes_matmul_equals_the_reference(rows, shape, group, layout):
    gen = torch.Generator().manual_seed(rows)
    n_out, n_in = shape
    codes = _codes(shape, 0.3, gen)
    codes[torch.rand(shape, generator=gen) < 0.5] = 0  # and zeros, some chunks all of them
    codes[:, :16] = 0
    scales = torch.rand(n_out, n_in // group, generator=gen).bfloat16()
    held = _held(codes, layout)
    x, w, bias = torch.randn(rows, n_in, generator=gen), torch.randn(shape, generator=gen), torch.randn(n_out, generator=gen)
    u, v = torch.randn(n_out, 3, generator=gen), torch.randn(3, n_in, generator=gen)
    delta = dequantize(codes, scales)
    close = lambda y, ref: torch.testing.assert_close(y, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))  # noqa: E731
    close(kernels.codes_matmul(x, held, scales), x @ delta.t())
    close(kernels.codes_matmul(x, held, scales, w), x @ (w + delta).t())
    for ut in (u.t(), u.t().contiguous()):  # u as a transposed view (an embedding's) or laid out as its transpose's rows
        close(kernels.codes_matmul(x, held, scales, w, (kernels.Factors(ut, v),), bias), x @ (w + delta + u @ v).t() + bias)
    half, low_bit = _half_codes(n_out, n_in, 5, gen)
    close(kernels.codes_matmul(x, held, scales, w, (kernels.Factors(u.t(), v), half), bias), x @ (w + delta + u @ v + low_bit).t() + bias)
    close(kernels.codes_matmul(x, None, None, None, (half,)), x @ low_bit.t())  # low-bit factors alone
    columns = torch.rand(n_in, generator=gen) + 0.5  # a step multiplier per column: the codes read x times them, the rest x
    scaled = dequantize(codes, scales, columns)
    close(kernels.codes_matmul(x, held, scales, columns=columns), x @ scaled.t())
    close(kernels.codes_matmul(x, held, scales, w, (kernels.Factors(u.t(), v), half), bias, columns), x @ (w + scaled + u @ v + low_bit).t() + bias)
    with pytest.raises(ValueError, match="columns"):
        kernels.codes_matmul(x, held, scales, columns=columns[1:])
    with pytest.raises(TypeError, match="bfloat16 scales"):
        kernels.codes_matmul(x, held, scales.float())
    with pytest.raises(ValueError, match="at most two sets"):
        kernels.codes_matmul(x, held, scales, w, (half,) * 3)


@needs_kernel
@pytest.mark.parametrize("n_in", [8, 24, 40, 48])
def test_a_base_matrix_of_inputs_a_multiple_of_8_not_16_runs_with_low_rank_factors(n_in):
    """Low-rank factors of inputs a multiple of 8 run in the kernel beside their base matrix, which it read 16 inputs at a
    time: of 8, 24 or 40 inputs it read past each row's end (Gemma 3n's per-layer projection, 8 inputs in the tests:
    split execution off by 1e-2, a batch of fine-tunes by name too, no error). Alone and row by row."""
    gen = torch.Generator().manual_seed(n_in)
    w, bias = torch.randn(33, n_in, generator=gen), torch.randn(33, generator=gen)
    u, v = torch.randn(33, 3, generator=gen), torch.randn(3, n_in, generator=gen)
    x = torch.randn(5, n_in, generator=gen)
    ref = x @ (w + u @ v).t() + bias
    torch.testing.assert_close(kernels.codes_matmul(x, None, None, w, (kernels.Factors(u.t(), v),), bias), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    table = kernels.codes_table([(None, None, None, (kernels.Factors(u.t(), v),))])
    y = kernels.rows_codes_matmul(x, w, bias, table, torch.tensor([0, 1, 1, 0, 1]), 3)
    want = torch.where(torch.tensor([False, True, True, False, True])[:, None], ref, x @ w.t() + bias)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-5 * float(ref.abs().max()))


def _half_codes(n_out: int, n_in: int, rank: int, gen) -> tuple[kernels.Factors, torch.Tensor]:
    """Low-bit factors as the kernel reads them (int8 half codes h of the odd codes 2h + 1, up to 8 bits, each direction's
    scale) and the float32 matrix they stand for."""
    ut, v = (torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen) for shape in ((rank, n_out), (rank, n_in)))
    scale = torch.rand(rank, generator=gen) * 1e-3
    return kernels.Factors(ut, v, scale), (2 * ut.float() + 1).t() @ ((2 * v.float() + 1) * scale[:, None])


@needs_kernel
@pytest.mark.parametrize("rows", [1, 4, 7])
def test_rows_codes_matmul_runs_each_rows_own_parts(rows):
    """Each row its own fine-tune's parts (codes in either layout, with or without a step multiplier per column, float
    and low-bit low rank, any of them together) or the base alone, in one call."""
    gen = torch.Generator().manual_seed(rows)
    shape = (43, 64)  # the last block of outputs short of 8
    w, bias = torch.randn(shape, generator=gen), torch.randn(shape[0], generator=gen)
    tenants, deltas = [], [torch.zeros(shape)]
    for layout, rank, low_bit, by_column in (("escaped", 0, 0, True), ("nibbles", 2, 0, False), (None, 3, 0, False), ("escaped", 1, 2, False),
                                            (None, 0, 4, False), ("nibbles", 0, 1, True), ("masked", 1, 0, False), ("masked", 0, 0, True)):
        codes, scales = _codes(shape, 0.1, gen), torch.rand(shape[0], 2, generator=gen).bfloat16()
        columns = torch.rand(shape[1], generator=gen) + 0.5 if by_column else None
        u, v = torch.randn(shape[0], rank, generator=gen), torch.randn(rank, shape[1], generator=gen)
        half, product = _half_codes(*shape, low_bit, gen)
        held = None if layout is None else _held(codes, layout)
        factors = ((kernels.Factors(u.t(), v),) if rank else ()) + ((half,) if low_bit else ())
        tenants.append((held, None if held is None else scales, columns, factors))
        deltas.append((0 if held is None else dequantize(codes, scales, columns)) + u @ v + product)
    table = kernels.codes_table(tenants)
    assert kernels.table_rank(table) == 4
    which = torch.randint(0, len(deltas), (rows,), generator=gen)
    x = torch.randn(rows, 2, shape[1], generator=gen)  # two positions per row
    y = kernels.rows_codes_matmul(x.flatten(0, 1), w, bias, table, which, 4).view(rows, 2, -1)
    for i, t in enumerate(which.tolist()):
        ref = x[i] @ (w + deltas[t]).t() + bias
        torch.testing.assert_close(y[i], ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


@needs_kernel
def test_rows_codes_matmul_decodes_a_finetunes_rows_together_in_any_order():
    """Rows of one fine-tune interleaved with others' (row i -> table row i mod 4, row 0 the base alone) give what the
    same rows give grouped, bit for bit, and each its fine-tune's product; a row naming no table row is refused."""
    gen = torch.Generator().manual_seed(0)
    shape = (40, 96)
    w = torch.randn(shape, generator=gen)
    parts, deltas = [], [torch.zeros(shape)]
    for layout in ("escaped", "nibbles", "masked"):
        codes, scales = _codes(shape, 0.1, gen), torch.rand(shape[0], 3, generator=gen).bfloat16()
        parts.append((_held(codes, layout), scales, None, ()))
        deltas.append(dequantize(codes, scales))
    table = kernels.codes_table(parts)
    which = torch.tensor([i % 4 for i in range(20)])  # five rows each: a run of four, then a lone row
    x = torch.randn(20, shape[1], generator=gen)
    y = kernels.rows_codes_matmul(x, w, None, table, which, 0)
    order = torch.sort(which, stable=True).indices
    grouped = kernels.rows_codes_matmul(x[order], w, None, table, which[order].contiguous(), 0)
    assert torch.equal(y[order], grouped)
    for i, t in enumerate(which.tolist()):
        ref = x[i] @ (w + deltas[t]).t()
        torch.testing.assert_close(y[i], ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="no table row|beyond"):
        kernels.rows_codes_matmul(x, w, None, table, torch.tensor([0, 4] * 10), 0)
    assert kernels.rows_codes_matmul(x[:0], w, None, table, which[:1], 0).shape == (0, shape[0])  # no rows


def _module(bias: bool = False) -> DecomposedModule:
    """A split linear module holding what annealing stores: a low-rank part and 4-bit codes."""
    gen = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(128, 96, bias=bias)
    codes, scales = quantize_codes(torch.randn(96, 128, generator=gen) * 1e-2, 4, 0, step=1.2)
    lowrank = LowRankPart(torch.randn(96, 2, generator=gen) * 0.05, torch.randn(2, 128, generator=gen))
    delta = TensorDelta("weight", (96, 128), parts=[lowrank, QuantPart(codes, scales, 4)])
    return DecomposedModule(base, delta)


@needs_kernel
@pytest.mark.parametrize("bias", [False, True])
def test_split_runs_the_base_and_its_parts_in_one_kernel_call(bias, monkeypatch):
    module = _module(bias)
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        merged = module(x)
        module.execution = "split"
        calls = []
        run = kernels._run
        monkeypatch.setattr(kernels, "_run", lambda *a: calls.append(a[3] is not None) or run(*a))  # the base matrix (weight) passed
        monkeypatch.setattr(torch.nn.Linear, "forward", None)  # the base matrix runs inside the kernel
        split = module(x)
    assert calls == [True]
    torch.testing.assert_close(split, merged, rtol=0, atol=1e-5 * float(merged.abs().max()))


@needs_kernel
def test_compact_holds_the_smaller_layout_and_gives_the_same_products():
    module = _module()
    module.execution = "split"
    part = module.ops.quant
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        nibbles = module(x)
        assert part.kernel_layout().escapes is None  # one split model: four bits, the faster to decode
        part.compact()
        held = part.kernel_layout()
        assert held.escapes is not None and held.nbytes() < 96 * 128 // 2
        assert torch.equal(module(x), nibbles)  # the same codes in the same order of sums


@needs_kernel
def test_low_rank_alone_runs_in_the_kernel_and_a_kind_it_does_not_run_keeps_pytorchs_path(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    base = torch.nn.Linear(64, 48)
    lowrank = LowRankPart(torch.randn(48, 2, generator=gen), torch.randn(2, 64, generator=gen))
    dense = DensePart(torch.randn(48, 64, generator=gen) * 0.01)
    x = torch.randn(5, 64, generator=gen)
    calls = []
    run = kernels._run
    monkeypatch.setattr(kernels, "_run", lambda *a: calls.append(a[1] is None) or run(*a))
    for parts, in_kernel in (([lowrank], [True]), ([dense, lowrank], []), ([lowrank, dense], [])):
        module = DecomposedModule(base, TensorDelta("weight", (48, 64), parts=parts))
        with torch.no_grad():
            merged = module(x)
            module.execution = "split"
            split = module(x)
        assert calls == in_kernel, [p.kind for p in parts]
        torch.testing.assert_close(split, merged, rtol=0, atol=1e-5 * float(merged.abs().max()))
        calls.clear()


def test_split_with_gradients_runs_pytorch_kernels():
    """The kernel has no backward: where a gradient is needed, split takes PyTorch's path and the gradient flows."""
    module = _module()
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(2), requires_grad=True)
    module(x).square().sum().backward()
    merged_grad = x.grad.clone()
    x.grad = None
    module.execution = "split"
    module(x).square().sum().backward()
    torch.testing.assert_close(x.grad, merged_grad, rtol=0, atol=1e-4 * float(merged_grad.abs().max()))


def test_why_the_kernel_is_off_is_said(monkeypatch):
    monkeypatch.setenv("HF_DECOMPOSE_KERNELS", "0")
    assert kernels._unavailable() == ""  # turned off on purpose: no warning
    monkeypatch.delenv("HF_DECOMPOSE_KERNELS")
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert "no-such-compiler-here" in kernels._unavailable()


@needs_kernel
def test_a_cpu_without_the_instructions_warns_and_pytorchs_kernels_run(monkeypatch):
    load = kernels.ctypes.CDLL

    def without(path):  # the library as a CPU without BMI2 would report
        lib = load(path)
        lib.hfd_supported = lambda: 0
        return lib

    monkeypatch.setattr(kernels.ctypes, "CDLL", without)
    with pytest.warns(UserWarning, match="kernels are off: the CPU lacks one of AVX2, FMA and BMI2"):
        assert kernels._library.__wrapped__() is None


@needs_kernel
def test_a_failed_build_warns_and_pytorchs_kernels_run(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    monkeypatch.setenv("HF_DECOMPOSE_CACHE", str(tmp_path))
    with pytest.warns(UserWarning, match="kernels are off: compiling codes_matmul.c, bits16.c, feedback.c, select.c failed"):
        assert kernels._library.__wrapped__() is None
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left in place


def _bf16_pair(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bfloat16 (base, fine-tune) with small changes, unchanged entries, signed zeros, subnormals, far exponents
    (deltas that do not merge back) and sums past bfloat16's range."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).mul_(0.02)
    ft = base + torch.randn(shape, generator=g).mul_(2e-4)
    flat_b, flat_f = base.view(-1), ft.view(-1)
    n = flat_b.numel()
    pick = torch.randperm(n, generator=g)
    specials = [(0.0, -0.0), (-0.0, 0.0), (1e-40, -1e-40), (3e-39, 1e-40), (3e38, -3e38), (-3e38, 3e38), (1.0, 1e-3), (1.0, 1.0),
                (0.000370025634765625, 0.00010251998901367188)]
    for k, (b, f) in enumerate(specials):
        at = pick[k :: 4 * len(specials)]
        flat_b[at], flat_f[at] = b, f
    return base.bfloat16(), ft.bfloat16()


@needs_kernel
@pytest.mark.parametrize("shape", [(67, 1029), (4, 3), (1000,), (3, 5, 7)])
def test_exact_delta_kernel_equals_pytorchs_path_bit_for_bit(shape, monkeypatch):
    """The compiled exact delta gives PyTorch's bfloat16 difference, the same mismatched positions and the same support
    counts (`deltas.support_counts`), bit for bit, on every kind of entry; here about one entry in nine mismatches, more
    than the kernel's first room for them (one in sixteen), so its second call is taken too."""
    from hf_decompose import deltas

    base, ft = _bf16_pair(shape, seed=len(shape))
    delta, flat, rows, cols = kernels.exact_delta_bf16(base, ft)
    monkeypatch.setattr(kernels, "available", lambda: False)
    want, want_flat, none = deltas._difference(base, ft, torch.bfloat16, torch.bfloat16)
    assert none is None and torch.equal(delta.view(torch.int16), want.view(torch.int16))
    assert torch.equal(flat, want_flat) and flat.numel() > base.numel() // 16
    assert torch.equal(want, ft - base)  # PyTorch's path is PyTorch's own subtraction
    want_rows, want_cols = deltas.support_counts(want.view(shape[0], -1).contiguous())
    assert rows.tolist() == want_rows.tolist() and cols.tolist() == want_cols.tolist()


@needs_kernel
@pytest.mark.parametrize("shape", [(67, 1029), (5, 3, 7)])
def test_exact_delta_kernel_split_over_threads_or_without_its_delta_finds_the_same(shape, monkeypatch):
    """Rows split in blocks over threads, and a survey that writes no delta, give the same mismatches and counts."""
    base, ft = _bf16_pair(shape, seed=3)
    delta, flat, rows, cols = kernels.exact_delta_bf16(base, ft)
    monkeypatch.setattr(kernels, "PARALLEL_VALUES", 1)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        split = kernels.exact_delta_bf16(base, ft)
        survey = kernels.exact_delta_bf16(base, ft, with_delta=False)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(split[0].view(torch.int16), delta.view(torch.int16)) and survey[0] is None
    for got in (split, survey):
        assert torch.equal(got[1], flat) and torch.equal(got[2], rows) and torch.equal(got[3], cols)


@needs_kernel
def test_difference_kernel_gives_the_float32_difference_bit_for_bit():
    """Over a million values (split over threads), signed zeros, subnormals, far exponents and sums past bfloat16's range:
    PyTorch's float32 subtraction of the upcast tensors; anything else is refused."""
    base, ft = _bf16_pair((1100, 1000), seed=4)
    assert torch.equal(kernels.difference_bf16(base, ft).view(torch.int32), (ft.float() - base.float()).view(torch.int32))
    with pytest.raises(ValueError, match="two contiguous bfloat16 CPU tensors of one shape"):
        kernels.difference_bf16(base.t(), ft.t())


@needs_kernel
@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D weights, transposed to (out, in)
def test_the_criterions_deltas_of_a_bfloat16_pair_are_pytorchs(tmp_path, arch, monkeypatch):
    """`model._delta` of every tensor of a sharded bfloat16 pair: through the kernel where it runs, the values and
    layout of PyTorch's float32 path."""
    from hf_decompose import model as model_module
    from hf_decompose.checkpoints import CheckpointPair, CheckpointReader
    from hf_decompose.groups import describe

    from .test_architectures import _pair

    base_dir, ft_dir = _pair(tmp_path, arch)
    pair = CheckpointPair(CheckpointReader(base_dir), CheckpointReader(ft_dir))
    infos = [describe(name, pair.finetuned.shape(name), arch) for name in pair.names()]
    calls = []
    monkeypatch.setattr(kernels, "difference_bf16", lambda b, f, _real=kernels.difference_bf16: calls.append(b.shape) or _real(b, f))
    fast = {i.name: model_module._delta(pair, i, torch.device("cpu")) for i in infos}
    assert len(calls) == len(infos)
    monkeypatch.setattr(kernels, "available", lambda: False)
    for i in infos:
        want = model_module._delta(pair, i, torch.device("cpu"))
        assert fast[i.name].stride() == want.stride() and torch.equal(fast[i.name], want), i.name


@needs_kernel
def test_exact_delta_refuses_what_it_does_not_read():
    with pytest.raises(ValueError, match="two bfloat16 CPU tensors of one shape"):
        kernels.exact_delta_bf16(torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.float16))
    with pytest.raises(ValueError, match="two bfloat16 CPU tensors of one shape"):
        kernels.exact_delta_bf16(torch.zeros(4, dtype=torch.bfloat16), torch.zeros(5, dtype=torch.bfloat16))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_all_finite_16_finds_one_nan_or_inf_anywhere(dtype):
    from hf_decompose.checkpoints import EXPONENT_BITS

    exponent = EXPONENT_BITS[dtype][1]
    values = torch.randn(70001).to(dtype)
    assert kernels.all_finite_16(values, exponent)
    for at in (0, 4095, 4096, 70000):  # block edges and the last value
        for bad in (float("nan"), float("inf"), float("-inf")):
            spoiled = values.clone()
            spoiled[at] = bad
            assert not kernels.all_finite_16(spoiled, exponent)
    assert kernels.all_finite_16(torch.tensor([65504.0, -65504.0, 6e-8], dtype=dtype), exponent)  # largest, smallest finite


@needs_kernel
def test_z_histogram_kernel_counts_as_pytorchs_path(monkeypatch):
    """The compiled z histogram and PyTorch's blocks give the same counts, bin edges, the range's ends, values beyond
    them, infinities and NaN (in no bin) included; and both put each value where a float64 reading of the bins does,
    away from the edges."""
    from hf_decompose import criterion

    g = torch.Generator().manual_seed(3)
    sigma = 0.0123
    edges = torch.linspace(-criterion.Z_HIST_RANGE, criterion.Z_HIST_RANGE, criterion.Z_HIST_BINS + 1) * sigma
    residual = torch.cat([torch.randn(300_000, generator=g) * sigma * 3, edges, edges.nextafter(torch.tensor(1.0)),
                          torch.tensor([1.0, -1.0, float("inf"), float("-inf"), float("nan")])]).reshape(-1, 5)
    got = criterion.z_histogram(residual, sigma)
    monkeypatch.setattr(kernels, "available", lambda: False)
    monkeypatch.setattr(criterion, "CHUNK_BYTES", 4096)  # PyTorch's path in many blocks of rows
    want = criterion.z_histogram(residual, sigma)
    assert torch.equal(got, want) and int(got.sum()) == residual.numel() - 1
    z = (residual.double().reshape(-1) / sigma).clamp(-criterion.Z_HIST_RANGE, criterion.Z_HIST_RANGE)
    position = (z + criterion.Z_HIST_RANGE) * criterion.Z_HIST_BINS / (2 * criterion.Z_HIST_RANGE)
    clear = (position - position.round()).abs() > 1e-3  # not at an edge: no rounding decides the bin
    bins = position[clear].floor().long().clamp(max=criterion.Z_HIST_BINS - 1)
    assert torch.equal(criterion.z_histogram(residual.reshape(-1)[clear], sigma), torch.bincount(bins, minlength=criterion.Z_HIST_BINS))


@needs_kernel
@pytest.mark.parametrize("n", [1, 2, 5, 1000, 300_001, 4_000_001])
def test_select_kernel_gives_numpys_partition_and_the_robust_sigma_of_pytorchs_path(n, monkeypatch):
    """The compiled k-th smallest is `np.partition`'s at any k, of values and of their distances from a center (ties, signed
    zeros, infinities and NaN among them; a subsample too), and `robust_sigma` through it equals its numpy path bit for bit."""
    from hf_decompose import criterion

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 3e-4
    if n > 5:
        x[::7] = torch.randint(-3, 4, x[::7].shape, generator=g).float() * 1e-4  # runs of ties
        x[:6] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), -float("nan")])
    for view in (x, x[:: max(1, n // 1000)].contiguous()):
        values = view.numpy()
        center = float(np.float32(np.median(values[np.isfinite(values)]))) if np.isfinite(values).any() else 0.0
        for k in sorted({0, view.numel() // 3, (view.numel() - 1) // 2, view.numel() - 1}):
            want = np.partition(values, k)[k]
            got = kernels.select_f32(view, k)
            assert got == want or (np.isnan(got) and np.isnan(want))
            want = np.partition(np.abs(values - np.float32(center)), k)[k]
            got = kernels.select_f32(view, k, center=center)
            assert got == want or (np.isnan(got) and np.isnan(want))
    finite = x[x.isfinite()]
    if finite.numel():
        got = criterion.robust_sigma(finite)
        monkeypatch.setattr(kernels, "available", lambda: False)
        assert got == criterion.robust_sigma(finite)


@needs_kernel
def test_z_candidates_kernel_gives_pytorchs_path(monkeypatch):
    """The compiled entry-test candidates are PyTorch's: the same z values, in order, over a buffer that fills (5% of a
    normal residual lies beyond 1.96), values at the threshold included."""
    from hf_decompose import criterion

    g = torch.Generator().manual_seed(5)
    sigma, threshold = 2.5e-4, 1.959963984540054
    residual = torch.randn(1000, 700, generator=g) * sigma
    residual[0, :8] = torch.tensor([threshold, -threshold, 3.0, float("inf"), float("nan"), 0.0, -0.0, 1e-45]) * sigma
    residual[5, :40] = 100 * sigma  # a dense run: more than the buffer's first guess in one chunk
    got = criterion._candidates(residual, sigma, threshold)
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert torch.equal(got, criterion._candidates(residual, sigma, threshold))
    assert 0.045 < got.numel() / residual.numel() < 0.06


@needs_kernel
@pytest.mark.parametrize(("bits", "group", "grid", "step"), [(3, 64, "signed", None), (2, 32, "full", None), (1, 64, "signed", None),
                                                             (4, 0, "signed", 1.5), (4, 0, "signed", 0.8), (8, 0, "full", None)])
def test_error_feedback_kernel_gives_pytorchs_codes(bits, group, grid, step, monkeypatch):
    """Rounding with error feedback gives the same codes and scales through the compiled column loop as through
    PyTorch's, on every grid (signed, full, one bit, step), groups within and across blocks (and a row-wide scale), a
    block that ends mid-matrix and dead inputs."""
    from hf_decompose.quantize import quantize_codes

    g = torch.Generator().manual_seed(bits)
    x = torch.randn(512, 200, generator=g) @ torch.randn(200, 320, generator=g)  # correlated inputs
    gram = x.T @ x
    gram[7], gram[:, 7] = 0.0, 0.0  # an input never seen
    values = torch.randn(48, 320, generator=g) * 0.01
    got = quantize_codes(values, bits, group, gram=gram, grid=grid, step=step)
    monkeypatch.setattr(kernels, "available", lambda: False)
    want = quantize_codes(values, bits, group, gram=gram, grid=grid, step=step)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1].view(torch.int16), want[1].view(torch.int16))
    assert len(got[0].unique()) > 2 or bits == 1
