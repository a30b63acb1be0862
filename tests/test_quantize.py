"""Low-bit deltas: packing is lossless, rounding is within half a step, every path agrees."""

import math

import pytest
import torch
from torch import nn

from hf_decompose import ArtifactError, DecomposedConfig, DecomposedModel, artifact, decompose
from hf_decompose.artifact import WEIGHTS
from hf_decompose.modules import DecomposedModule
from hf_decompose.parts import FullQuantPart, LowRankPart, QuantPart, TensorDelta
from hf_decompose.parts.quant import run_with_base
from hf_decompose.quantize import (BITS, Feedback, _huffman, bits_of, codes_of, column_steps, dequantize, huffman_code, huffman_codes_of, huffman_scales,
                                   huffman_scales_of, pack, pack_codes, quantize, quantize_codes, row_codes, scaled_by_columns, unpack)


def output_error(w: torch.Tensor, gram: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, grid: str = "signed") -> float:
    """``tr(E H E^T)``: the output error the codes' rounding error E of `w` leaves on inputs of Gram H."""
    e = (w - dequantize(codes_of(packed, w.shape, grid), scales)).double()
    return float(torch.trace(e @ gram.double() @ e.t()))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [8, 13, 1000])
def test_packing_round_trips_and_takes_bits_per_value(bits, n):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack(packed, bits, n), codes)
    assert bits_of(packed, (n,)) == bits


@pytest.mark.parametrize("bits,group,g", [(8, 0, 48), (4, 16, 16), (3, 16, 16), (2, 0, 48), (5, 7, 6), (4, 64, 48)])
def test_rounding_stays_within_half_a_step(bits, group, g):
    """`g`: the group used, the largest divisor of the row of at most `group` entries."""
    x = torch.randn(12, 48, generator=torch.Generator().manual_seed(0)) * torch.logspace(-6, 0, 12)[:, None]
    x[3] = 0.0  # an untouched row stays exactly zero
    packed, scales = quantize(x, bits, group)
    assert scales.shape == (12, 48 // g) and scales.dtype == torch.bfloat16
    y = dequantize(codes_of(packed, x.shape), scales)
    step = scales.float().repeat_interleave(g, 1)
    assert ((y - x).abs() <= step / 2 * 1.0001 + 1e-12).all()
    assert torch.equal(y[3], torch.zeros(48))
    assert (y - x).abs().max() < x.abs().max() / (2 ** (bits - 1) - 1)


def test_a_step_quantizer_scales_each_row_by_its_rms_and_its_size_follows_the_step():
    """One scale per row, `step` x its RMS; codes within +-7 (the int4 kernel's), within half a step unless clipped
    at 7 steps; Huffman-coded, a coarser step stores fewer bits, about the codes' entropy."""
    x = torch.randn(256, 576, generator=torch.Generator().manual_seed(0)) * torch.logspace(-4, 0, 256)[:, None]
    x[0, 0] = 40 * x[0].square().mean().sqrt()  # an outlier beyond 7 steps: clipped
    sizes = []
    for step in (0.8, 1.7, 2.4):
        packed, scales = quantize(x, 4, 0, step=step)
        codes = codes_of(packed, x.shape)
        assert scales.shape == (256, 1) and torch.equal(scales, (step * x.square().mean(-1, keepdim=True).sqrt()).bfloat16())
        assert int(codes.abs().max()) == 7
        err = (dequantize(codes, scales) - x).abs() <= scales.float() / 2 * 1.0001
        assert not err[0, 0] and err.flatten()[1:].all()
        sizes.append(8 * QuantPart.from_packed(packed, scales, x.shape).nbytes() / x.numel())
    assert sizes == sorted(sizes, reverse=True) and 1.3 < sizes[1] < 1.6 and sizes[2] < 1.2
    with pytest.raises(ValueError, match="step"):
        quantize(x, 4, 64, step=1.0)


def test_a_step_quantizer_beats_group_absmax_codes_at_their_size():
    """At the size of 2-bit codes with absmax scales per 64 (three levels, most entries rounded to zero), a step
    quantizer with error feedback leaves a smaller output error (measured on the default pair: a layer's flips 1.75x
    lower at the same bits)."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(128, 256, generator=gen)
    x = torch.randn(2000, 32, generator=gen) @ torch.randn(32, 256, generator=gen) + 0.3 * torch.randn(2000, 256, generator=gen)
    gram = x.t() @ x

    def error_and_bits(packed, scales):
        return output_error(w, gram, packed, scales), 8 * QuantPart.from_packed(packed, scales, w.shape).nbytes() / w.numel()

    absmax_error, absmax_bits = error_and_bits(*quantize(w, 2, 64, gram=gram))
    step_error, step_bits = error_and_bits(*quantize(w, 4, 0, gram=gram, step=2.6))
    assert step_bits <= absmax_bits and step_error < 0.8 * absmax_error


def test_one_bit_stores_signs_with_the_mean_magnitude():
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    x[2] = 0.0
    packed, scales = quantize(x, 1, 16)
    assert packed.numel() == 6 * 32 // 8 and bits_of(packed, x.shape) == 1
    codes = codes_of(packed, x.shape)
    assert set(codes.unique().tolist()) == {-1, 1} and torch.equal(codes[x > 0], torch.ones_like(codes[x > 0]))
    assert torch.allclose(scales.float(), x.abs().unflatten(1, (2, 16)).mean(-1).bfloat16().float())
    y = dequantize(codes, scales)
    assert torch.equal(y[2], torch.zeros(32))
    assert (y - x).square().sum() < x.square().sum()  # the sign with its mean magnitude beats dropping


@pytest.mark.parametrize("grid", ["signed", "full"])
@pytest.mark.parametrize("bits", BITS)
def test_huffman_coded_codes_round_trip(bits, grid):
    packed, _ = quantize(torch.randn(24, 64, generator=torch.Generator().manual_seed(bits)), bits, 16, grid=grid)
    codes = codes_of(packed, (24, 64), grid)
    decoded, width = huffman_codes_of(huffman_code(codes, bits, grid), (24, 64), grid)
    assert width == bits and decoded.dtype == codes.dtype and torch.equal(decoded, codes)


def test_huffman_coding_stores_gaussian_codes_near_their_entropy():
    """3-bit codes of Gaussian values (absmax scales per 64) carry ~2.4 bits of information each; packed they take 3."""
    packed, scales = quantize(torch.randn(512, 576, generator=torch.Generator().manual_seed(0)), 3, 64)
    codes = codes_of(packed, (512, 576))
    p = torch.bincount(codes.flatten().long() + 3).double() / codes.numel()
    entropy = float(-(p[p > 0] * p[p > 0].log2()).sum())
    coded_bits = 8 * huffman_code(codes, 3).numel() / codes.numel()
    assert entropy < 2.6 and coded_bits < entropy + 0.1
    part = QuantPart.from_packed(packed, scales, (512, 576))
    state = part.state()
    assert set(state) == {"codes_huffman", "scales_huffman"} and part.nbytes() == sum(t.numel() for t in state.values())
    assert part.nbytes() < 0.85 * (packed.numel() + 2 * scales.numel()) and state["scales_huffman"].numel() < 0.8 * 2 * scales.numel()
    one_bit = QuantPart.from_packed(*quantize(torch.randn(32, 64), 1, 64), (32, 64))
    assert "codes" in one_bit.state()  # one-bit codes stay packed


def test_huffman_coded_scales_round_trip_bit_for_bit():
    scales = (torch.randn(48, 9).abs() * 1e-3).bfloat16()
    scales[0, 0], scales[1, 1] = 0.0, -0.0
    read = huffman_scales_of(huffman_scales(scales), (48, 576))
    assert read.shape == (48, 9) and read.dtype == torch.bfloat16 and torch.equal(read.view(torch.int16), scales.view(torch.int16))
    for shape in [(48, 577), (47, 576), (48, 4)]:  # no whole number of groups per row, or more scales than entries
        with pytest.raises(ValueError, match="divide|at most"):
            huffman_scales_of(huffman_scales(scales), shape)


def test_hostile_huffman_streams_are_refused():
    codes = torch.randint(-3, 4, (16, 64), dtype=torch.int8)
    stream = huffman_code(codes, 3)
    bomb = huffman_code(torch.zeros(4096, 4096, dtype=torch.int8), 3)  # 16M codes in a few kB: decoding stops at the shape's count
    for bad, match in [(stream[:-3], "exactly"), (bomb, "exactly"), (torch.cat([stream[:1], torch.full((40,), 255, dtype=torch.uint8)]), "corrupt|exactly"),
                       (torch.cat([torch.tensor([7], dtype=torch.uint8), stream[1:]]), "bit width"), (torch.cat([stream, stream[1:]]), "exactly"),
                       (torch.empty(0, dtype=torch.uint8), "bit width")]:
        with pytest.raises(ValueError, match=match):
            huffman_codes_of(bad, (16, 64))
    with pytest.raises(ValueError, match="exceed"):  # unsigned 3: a full-grid code, beyond the signed grid's -1..1
        huffman_codes_of(huffman_code(torch.full((4, 8), 3, dtype=torch.int8), 2, "full"), (4, 8), "signed")
    padded = torch.frombuffer(bytearray(bytes([4]) + _huffman(bytes([0x77, 0x77]))), dtype=torch.uint8)  # 3 codes, two to a byte
    assert torch.equal(huffman_codes_of(huffman_code(torch.full((1, 3), -7, dtype=torch.int8), 4), (1, 3))[0], torch.full((1, 3), -7, dtype=torch.int8))
    with pytest.raises(ValueError, match="exceed"):  # the last byte's padding is not zero
        huffman_codes_of(padded, (1, 3))
    with pytest.raises(ValueError, match="exactly one form"):
        QuantPart.from_state((16, 64), dict.fromkeys(QuantPart.fields) | {"scales": torch.ones(16, 1, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match="exactly one form"):
        QuantPart.from_state((16, 64), dict.fromkeys(QuantPart.fields) | {"codes_huffman": stream, "scales": torch.ones(16, 1, dtype=torch.bfloat16),
                                                                         "scales_huffman": huffman_scales(torch.ones(16, 1, dtype=torch.bfloat16))})


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_full_grid_uses_every_code_and_stays_within_half_a_step(bits):
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(bits)) * torch.logspace(-6, 0, 12)[:, None]
    x[3] = 0.0
    packed, scales = quantize(x, bits, 32, grid="full")
    assert packed.numel() == math.ceil(x.numel() * bits / 8)
    codes = codes_of(packed, x.shape, "full")
    assert set(codes.unique().tolist()) <= set(range(-(2**bits) + 1, 2**bits, 2))  # odd codes: 2^bits levels, none at zero
    if bits <= 3:
        assert len(codes.unique()) == 2**bits  # every code in use
    y = dequantize(codes, scales)
    assert torch.equal(y[3], torch.zeros(64))
    step = 2 * scales.float().repeat_interleave(32, 1)
    clipped = x.abs() > (2**bits - 1) * scales.float().repeat_interleave(32, 1)  # clipped outliers sit on the outermost code
    assert ((y - x).abs()[~clipped] <= step[~clipped] / 2 * 1.0001 + 1e-12).all()
    assert torch.equal(y[clipped].sign(), x[clipped].sign())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("feedback", [False, True])
def test_the_full_grid_rounds_closer_than_the_signed_grid(bits, feedback):
    """Measured on Gaussian values: 2-bit signed codes (3 levels at absmax) lose to 1-bit signs; the full grid does not."""
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 256, generator=gen), torch.randn(1024, 256, generator=gen)
    gram = x.t() @ x if feedback else None

    def error(grid, b):
        return output_error(w, x.t() @ x, *quantize(w, b, 64, gram=gram, grid=grid), grid)

    assert error("full", bits) < 0.8 * error("signed", bits)
    assert error("full", bits) < error("full", bits - 1) / 2.5  # each bit more at least 2.5x less output error


def _quantized(module_delta: TensorDelta, bits: int, group: int, grid: str) -> TensorDelta:
    d = module_delta
    packed, scales = quantize(d.to_dense(), bits, group, grid=grid)
    kind = FullQuantPart if grid == "full" else QuantPart
    return TensorDelta(d.name, d.shape, d.transposed, [kind.from_packed(packed, scales, d.shape)])


@pytest.fixture(scope="module", params=[("signed", 4), ("full", 3)], ids=["signed4", "full3"])
def quantized_model(request, tiny_pair, tmp_path_factory):
    """The tiny fine-tune with every matrix delta (embedding and tied head included) in 4 bits (3 on the full grid)."""
    grid, bits = request.param
    exact = decompose(tiny_pair.finetuned, tiny_pair.base, DecomposedConfig(mode="lossless"), progress=False)
    deltas = {n: _quantized(d, bits, 16, grid) if len(d.shape) == 2 and not d.is_empty() else d for n, d in exact.deltas.items()}
    kind = "quantfull" if grid == "full" else "quant"
    assert sum(d.get(kind) is not None for d in deltas.values()) == 1 + 7 * 2  # the embedding and every projection of the 2 layers
    d = exact.decomposition
    out = artifact.save(tmp_path_factory.mktemp("q") / "artifact", deltas, d.index, d.report, d.artifact_dir)
    return DecomposedModel.from_pretrained(out)


def test_split_matches_merged_and_the_dense_equivalent(quantized_model):
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        merged = quantized_model(input_ids=ids).logits
        quantized_model.set_execution("split")
        split = quantized_model(input_ids=ids).logits
        embed = next(m for m in quantized_model.modules() if isinstance(m, DecomposedModule) and isinstance(m.base, nn.Embedding))
        rows = getattr(embed.ops, embed.delta.parts[0].kind)(ids, lookup=True)
        assert torch.equal(rows, embed.delta.to_dense()[ids])
        quantized_model.set_execution("merged")
        assert torch.equal(quantized_model(input_ids=ids).logits, merged)
    torch.testing.assert_close(split, merged, rtol=1e-4, atol=1e-4)


def test_quantized_artifact_round_trips_and_is_smaller(quantized_model, tmp_path):
    out = quantized_model.save_pretrained(tmp_path / "q4")
    loaded = DecomposedModel.from_pretrained(out)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, quantized_model(input_ids=ids).logits)
    dense_bytes = sum(4 * math.prod(d.shape) for d in quantized_model.deltas.values())
    assert (out / WEIGHTS).stat().st_size < 0.3 * dense_bytes


def test_a_truncated_code_stream_is_refused(quantized_model, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from hf_decompose.artifact import INDEX, _write_index, sha256_files

    out = quantized_model.save_pretrained(tmp_path / "cut")
    tensors = load_file(out / WEIGHTS)
    name = next(k for k in tensors if k.endswith((".codes", ".codes_huffman")))
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    index = json.loads((out / INDEX).read_text())
    index["files"] = sha256_files(sorted(p for p in out.iterdir() if p.name in index["files"]))
    _write_index(out, index)  # a consistent index: only the code stream itself is wrong
    with pytest.raises(ArtifactError, match=name.rsplit(".quant", 1)[0].replace(".", r"\.")):
        DecomposedModel.from_pretrained(out)


@pytest.mark.parametrize("bits,group", [(4, 16), (3, 0)])
def test_error_feedback_lowers_output_error_on_correlated_inputs(bits, group):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(40, 64, generator=gen)
    x = torch.randn(500, 8, generator=gen) @ torch.randn(8, 64, generator=gen) + 0.1 * torch.randn(500, 64, generator=gen)
    gram = x.t() @ x

    plain, fed = quantize(w, bits, group), quantize(w, bits, group, gram=gram)
    assert output_error(w, gram, *fed) < 0.7 * output_error(w, gram, *plain)
    # with uncorrelated inputs there is nothing to compensate: the same codes as plain rounding
    assert torch.equal(quantize(w, bits, group, gram=torch.eye(64))[0], plain[0])


# (shape, bits, group, grid, runs fused through hf_decompose's kernel, through PyTorch's int4 kernel)
FUSED_CASES = [((48, 64), 3, 32, "signed", True, True), ((32, 256), 4, 64, "signed", True, True), ((16, 64), 4, 16, "signed", True, False),
               ((16, 64), 5, 32, "signed", False, False), ((10, 64), 3, 32, "signed", True, False), ((48, 64), 3, 32, "full", True, True),
               ((32, 128), 2, 64, "full", True, True), ((32, 64), 4, 32, "full", False, False), ((16, 40), 3, 8, "signed", False, False),
               # groups wider than PyTorch's kernel takes (whole rows, a 576-wide row's 192): their scales repeated there
               ((32, 192), 1, 0, "signed", True, True), ((32, 576), 3, 256, "signed", True, True), ((32, 96), 2, 0, "full", True, True),
               ((32, 576), 4, 0, "signed", True, True)]  # a step quantizer's codes: +-7, a scale per row


@pytest.mark.parametrize("shape,bits,group,grid,by_kernel,by_int4", FUSED_CASES)
def test_quant_part_fused_kernel_agrees_with_the_reference(shape, bits, group, grid, by_kernel, by_int4, quant_layout):
    layout = quant_layout
    fused = by_kernel if layout == "kernel" else by_int4
    gen = torch.Generator().manual_seed(bits)
    packed, scales = quantize(torch.randn(*shape, generator=gen), bits, group, grid=grid)
    codes = codes_of(packed, shape, grid)
    kind = FullQuantPart if grid == "full" else QuantPart
    stored = kind.from_packed(packed, scales, shape)
    part = stored.runtime(torch.zeros(shape), lambda: torch.zeros(shape))  # as a split linear module runs it
    x = torch.randn(3, 5, shape[1], generator=gen)
    assert part.fused(x) == fused
    state = stored.state()  # codes and scales in one stored form each, never the fused copy
    assert len(state) == 2 and {"codes", "codes_huffman"} & set(state) and {"scales", "scales_huffman"} & set(state)
    read = kind.from_state(shape, dict.fromkeys(kind.fields) | state)
    assert torch.equal(read.codes, codes) and torch.equal(read.scales.view(torch.int16), scales.view(torch.int16))
    assert (part.codes is None) == fused  # run fused, a matrix holds the fused copy alone
    reference = x @ dequantize(codes, scales).t()
    y = part(x)
    assert y.shape == reference.shape and y.dtype == x.dtype
    if fused:  # PyTorch's kernel multiplies in bfloat16 (within its rounding of the reference), ours in float32
        tol = 8e-3 if layout == "int4" else 1e-5
        torch.testing.assert_close(y, reference, rtol=0, atol=tol * float(reference.abs().max()))
        torch.testing.assert_close(part(x.bfloat16()).float(), reference, rtol=0, atol=1e-2 * float(reference.abs().max()))
        last = x.bfloat16()[:, -1:]  # a bf16 model's head sees its last position: a view, not contiguous
        torch.testing.assert_close(part(last).float(), reference[:, -1:], rtol=0, atol=1e-2 * float(reference.abs().max()))
        part.fused = lambda x: False  # where the kernel cannot run (another device), the codes come back from the fused copy
        torch.testing.assert_close(part(x), reference)
    else:
        torch.testing.assert_close(y, reference)


@pytest.mark.parametrize("shape,bits,grid,fused", [((64, 96), 3, "signed", True), ((32, 64), 1, "signed", True), ((32, 64), 2, "full", True),
                                                  ((48, 128), 4, "signed", True), ((16, 36), 3, "full", False)])  # the last not fused (rows of 36): int8 codes
def test_embedding_rows_are_looked_up_from_the_one_packed_copy(shape, bits, grid, fused, quant_layout):
    """A fused embedding holds its codes once (no int8 copy): in the kernel's layout, or with PyTorch's kernel its int4 copy
    and the stored bit-packing per row (every row ends on a byte), and a looked-up row is exactly the dequantized stored row."""
    layout = quant_layout
    gen = torch.Generator().manual_seed(bits)
    packed, scales = quantize(torch.randn(*shape, generator=gen), bits, 32 if shape[1] % 32 == 0 else 0, grid=grid)
    codes = codes_of(packed, shape, grid)
    stored = (FullQuantPart if grid == "full" else QuantPart).from_packed(packed, scales, shape)
    part = stored.runtime(torch.zeros(shape), lambda: torch.zeros(shape), lookup=True)
    ids = torch.randint(0, shape[0], (3, 5), generator=gen)
    assert (part.codes is None) == fused and ("rows" in part._buffers) == (fused and layout == "int4")
    assert torch.equal(part(ids, lookup=True), dequantize(codes, scales)[ids])
    if fused and layout == "int4":
        assert part.rows.numel() == packed.numel()  # the stored bytes, nothing more
        assert torch.equal(row_codes(part.rows[ids], bits, grid), codes[ids])
    if fused and layout == "kernel":
        assert part.kernel_layout().escapes is None and part.kernel_layout().nbytes() == codes.numel() // 2  # nibbles: half a byte per code


def test_codes_whose_huffman_coding_is_not_smaller_stay_bit_packed():
    """Uniform 2-bit codes on the full grid fill every byte value evenly: Huffman coding cannot shrink them, so the
    stored form is the bit-packed one, the bytes `pack_codes` gives."""
    codes = (2 * torch.randint(0, 4, (64, 256), generator=torch.Generator().manual_seed(3)) - 3).to(torch.int8)
    packed = pack_codes(codes, 2, "full")
    assert huffman_code(codes, 2, "full").numel() >= packed.numel()
    part = FullQuantPart.from_packed(packed, torch.ones(64, 4, dtype=torch.bfloat16), (64, 256))
    state = part.state()
    assert set(state) == {"codes", "scales_huffman"} and torch.equal(state["codes"], packed)
    assert torch.equal(FullQuantPart.from_state((64, 256), dict.fromkeys(FullQuantPart.fields) | state).codes, codes)


@pytest.mark.parametrize(("bits", "group", "grid", "step"), [(3, 64, "signed", None), (4, 0, "signed", 1.5), (2, 32, "full", None)])
def test_error_feedback_by_blocks_of_rows_and_in_place_gives_the_same_codes(bits, group, grid, step):
    """The update of later columns and a row-wide scale taken a few rows at a time, and the values overwritten instead
    of copied, change no code and no scale; without `overwrite` the values are left as they were."""
    from hf_decompose.quantize import Feedback, _error_feedback, _Grid, group_size, quantize_codes

    g = torch.Generator().manual_seed(bits)
    x = torch.randn(400, 160, generator=g) @ torch.randn(160, 256, generator=g)
    values = torch.randn(37, 256, generator=g) * 0.01
    feedback = Feedback.of(x.T @ x)
    whole = _error_feedback(values.clone(), feedback, _Grid(bits, grid, step), group_size(values.shape, group))
    by_rows = _error_feedback(values.clone(), feedback, _Grid(bits, grid, step), group_size(values.shape, group), rows=5)
    assert torch.equal(whole[0], by_rows[0]) and torch.equal(whole[1].view(torch.int16), by_rows[1].view(torch.int16))
    kept = values.clone()
    copied = quantize_codes(values, bits, group, gram=feedback, grid=grid, step=step)
    assert torch.equal(values, kept) and torch.equal(copied[0], whole[0])
    overwritten = quantize_codes(values, bits, group, gram=feedback, grid=grid, step=step, overwrite=True)
    assert torch.equal(overwritten[0], whole[0]) and not torch.equal(values, kept)


@pytest.mark.parametrize("bits", [8, 3])
def test_huffman_coding_across_its_chunks_round_trips(bits):
    """Codes past `huffman_code`'s chunk of 4M symbols (an odd count: the last symbol padded) decode to themselves."""
    n = 2**22 * (8 // bits) + 2 * (8 // bits) + 1
    q = 2 ** (bits - 1) - 1
    codes = torch.randint(-q, q + 1, (n,), generator=torch.Generator().manual_seed(bits)).to(torch.int8)
    decoded, width = huffman_codes_of(huffman_code(codes, bits), (n,))
    assert width == bits and torch.equal(decoded, codes)


def test_feedback_factors_are_pytorchs_computed_in_the_grams_own_memory(monkeypatch):
    """`Feedback.of`'s and `weighted_lowrank`'s factors run LAPACK in place on CPU (one float64 copy of the Gram, not
    two): PyTorch's factors, in the matrix's own memory; a dead input and a matrix that is not positive-definite are
    handled as before."""
    from hf_decompose import quantize
    from hf_decompose.quantize import Feedback, cholesky_lower, inverse_cholesky_upper

    monkeypatch.setattr(quantize, "IN_PLACE_FROM", 100)  # these 200 inputs in place too
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 200, generator=gen) * torch.rand(200, generator=gen) ** 3
    gram = x.T @ x
    gram[:, 7] = gram[7, :] = 0.0
    h = gram.double()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(1e-2 * h.diagonal().mean())
    want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    got = Feedback.of(gram)
    torch.testing.assert_close(got.factor, want.float(), rtol=1e-6, atol=1e-7)
    assert got.factor.is_contiguous() and got.dead.tolist() == dead.tolist()
    for compute, reference in ((inverse_cholesky_upper, want), (cholesky_lower, torch.linalg.cholesky(h))):
        mine = h.clone()
        out = compute(mine)
        torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-12)  # the other triangle cleared too
        assert out.data_ptr() == mine.data_ptr()  # no copy was made
    with pytest.raises(torch.linalg.LinAlgError, match="not positive-definite"):
        cholesky_lower(-torch.eye(3, dtype=torch.float64))


def test_steps_per_column_spend_bits_where_the_inputs_weigh():
    """Inputs of very different scales: a step per column from the Gram's diagonal (coarser where an input is small)
    leaves a smaller output error than one step per row, in codes of no more entropy; rounding ``w / columns`` is that
    quantizer (without feedback, every value within half of its column's step)."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(64, 128, generator=gen)
    x = torch.randn(2000, 128, generator=gen) * torch.logspace(-1, 1, 128)  # inputs 0.1x to 10x
    gram = x.t() @ x
    feedback = Feedback.of(gram)
    columns = column_steps(gram.diagonal(), 0.5)
    assert abs(float(columns.float().log().mean())) < 0.01 and float(columns[-1]) < float(columns[0])  # finer steps where inputs are large
    codes, scales = quantize_codes(w, 4, gram=feedback, step=1.5)
    by_column, column_scales = quantize_codes(w / columns.float(), 4, gram=scaled_by_columns(feedback, columns), step=1.5)

    def entropy(c: torch.Tensor) -> float:
        p = torch.unique(c, return_counts=True)[1].double() / c.numel()
        return float(-(p * p.log2()).sum())

    def error(e: torch.Tensor) -> float:
        return float(torch.trace(e.double() @ gram.double() @ e.double().t()))

    assert entropy(by_column) <= entropy(codes)
    assert error(w - dequantize(by_column, column_scales, columns)) < 0.7 * error(w - dequantize(codes, scales))
    plain, plain_scales = quantize_codes(w / columns.float(), 4, step=1.5)  # without feedback: within half of each column's step
    steps = plain_scales.float() * columns.float()
    assert bool(((w - dequantize(plain, plain_scales, columns)).abs() <= steps / 2 * (1 + 1e-5)).all())


@pytest.mark.parametrize("step", [1.2, None])
@pytest.mark.parametrize("feedback", [False, True])
def test_steps_per_row_scale_each_rows_step_and_leave_the_other_rows_as_they_were(feedback, step):
    """``row_steps`` multiply a row's scales (its step), on a step quantizer and absmax scales alike: rows at 1 get the
    codes and scales they get without, the others scales that many times coarser, in codes of less entropy; with error
    feedback on a matrix taller than the rows it gathers at a time, each row's own multiplier still (rows are rounded
    independently)."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(4100, 160, generator=gen)
    x = torch.randn(400, 160, generator=gen)
    gram = Feedback.of(x.t() @ x) if feedback else None
    rows = torch.ones(4100)
    rows[:10], rows[4096:] = 2.0, 3.0  # the last rows: past the first 4096 the feedback gathers
    plain_codes, plain_scales = quantize_codes(w, 4, gram=gram, step=step)
    codes, scales = quantize_codes(w, 4, gram=gram, step=step, row_steps=rows)
    same = rows == 1
    assert torch.equal(codes[same], plain_codes[same]) and torch.equal(scales[same], plain_scales[same])
    torch.testing.assert_close(scales[~same].float(), rows[~same, None] * plain_scales[~same].float(), rtol=2**-7, atol=0)
    assert float((codes[~same] == 0).float().mean()) > 1.5 * float((plain_codes[~same] == 0).float().mean())  # 1.7-2.3x here
    for bad in ({"grid": "full"}, {"row_steps": -rows}, {"row_steps": rows[:-1]}):
        with pytest.raises(ValueError, match="row_steps take the signed grid of 2 bits or more"):
            quantize_codes(w, 4, gram=gram, **({"row_steps": rows} | bad))


@pytest.mark.parametrize("lookup", [False, True])
def test_a_step_per_column_is_stored_read_and_run_by_every_path(quant_layout, lookup):
    """A part with a step per column stores its multipliers beside the codes and reads them back; merged, the fused
    kernels (alone and beside the base and low rank), the reference path and an embedding's lookup all apply them."""
    gen = torch.Generator().manual_seed(2)
    shape = (48, 64)
    codes, scales = quantize_codes(torch.randn(*shape, generator=gen), 4, step=1.2)
    columns = (torch.rand(shape[1], generator=gen) + 0.5).bfloat16()
    stored = QuantPart(codes, scales, 4, columns)
    state = stored.state()
    assert torch.equal(state["columns"], columns) and stored.nbytes() == sum(t.numel() * t.element_size() for t in state.values())
    read = QuantPart.from_state(shape, dict.fromkeys(QuantPart.fields) | state)
    dense = dequantize(codes, scales, columns)
    assert torch.equal(read.columns, columns) and torch.equal(TensorDelta("weight", shape, parts=[read]).to_dense(), dense)
    with pytest.raises(ValueError, match="expected"):  # multipliers that do not fit the rows are refused
        QuantPart.from_state(shape, dict.fromkeys(QuantPart.fields) | state | {"columns": columns[1:]}).check()
    base = torch.randn(shape, generator=gen)
    part = read.runtime(base, lambda: dense, lookup=lookup)
    if lookup:
        ids = torch.randint(0, shape[0], (3, 5), generator=gen)
        assert torch.equal(part(ids, lookup=True), dense[ids])
        return
    x = torch.randn(3, 5, shape[1], generator=gen)
    assert part.fused(x)
    tol = 8e-3 if quant_layout == "int4" else 1e-5  # PyTorch's int4 kernel multiplies in bfloat16
    reference = x @ dense.t()
    torch.testing.assert_close(part(x), reference, rtol=0, atol=tol * float(reference.abs().max()))
    if quant_layout == "kernel":
        linear = nn.Linear(shape[1], shape[0], bias=False).requires_grad_(False)
        linear.weight.data = base.clone()
        u, v = torch.randn(shape[0], 2, generator=gen), torch.randn(2, shape[1], generator=gen)
        lowrank = LowRankPart(u, v).runtime(base, lambda: u @ v)
        together = run_with_base(linear, [part, lowrank], x)
        expected = x @ (base + dense + u @ v).t()
        torch.testing.assert_close(together, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    part.fused = lambda x: False  # elsewhere (another device): the reference path
    torch.testing.assert_close(part(x), reference)
