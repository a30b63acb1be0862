"""Many fine-tunes over one base: per-row routing equals each fine-tune alone; storage is shared."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_decompose import ArtifactError, ConfigError, DecomposedConfig, DecomposedModel, MultiDecomposedModel, decompose
from hf_decompose import kernels, placement
from hf_decompose.multi import TenantModule, TenantParameters, _Stacked
from hf_decompose.parts import LowRankPart, QuantLowRankPart, QuantPart, TensorDelta
from hf_decompose.quantize import quantize, quantize_codes

from .emulated_device import emulated_device
from .synthetic import perturb, random_model

NAMES = ("a", "b", "c")
GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
MODES = {"llama": "criterion", "gpt2": "lossless"}  # tied head + blocks/sparse; Conv1D, biases, LayerNorm, wpe


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models gain nothing from threads


@pytest.fixture(scope="module", params=sorted(MODES))
def family(request, tmp_path_factory):
    arch, root = request.param, tmp_path_factory.mktemp(request.param)
    random_model(arch).save_pretrained(root / "base")
    for i, name in enumerate(NAMES):
        _finetune(arch, seed=10 + i).save_pretrained(root / name)
        decompose(root / name, root / "base", DecomposedConfig(mode=MODES[arch], q=0.2), progress=False).save_pretrained(root / f"art_{name}")
    return root


def _finetune(arch: str, seed: int):
    """Noise everywhere plus a strong rank-1 update of every matrix and a shift of every vector:
    structure the criterion keeps, different per seed."""
    model = perturb(random_model(arch), 1e-3, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.outer(torch.randn(p.shape[0], generator=gen), torch.randn(p.shape[1], generator=gen)) * 0.05)
            else:
                p.add_(0.05)
    return model


def _ids(rows: int):
    return torch.randint(1, 128, (rows, 6), generator=torch.Generator().manual_seed(0))


def test_mixed_batch_equals_each_finetune_alone(family):
    multi = DecomposedModel.from_pretrained({n: family / f"art_{n}" for n in NAMES})
    assert any(isinstance(m, TenantParameters) for m in multi.modules()), "norm / bias deltas are per fine-tune"
    rows = ["a", "b", None, "c", "a"]
    ids = _ids(len(rows))
    out = multi.generate(input_ids=ids, attention_mask=torch.ones_like(ids), decomposed_names=rows, **GEN)
    # RMS norms ran once with each row's weight; LayerNorm (one weight in F.layer_norm) ran per fine-tune
    assert all(m._per_row is type(m.base).__name__.endswith("RMSNorm") for m in multi.modules() if isinstance(m, TenantParameters))
    base = AutoModelForCausalLM.from_pretrained(family / "base").eval()
    alone = {n: DecomposedModel.from_pretrained(family / f"art_{n}", execution="split") for n in NAMES}
    for i, name in enumerate(rows):
        model = alone[name] if name else base
        expected = model.generate(input_ids=ids[i : i + 1], attention_mask=torch.ones_like(ids[i : i + 1]), **GEN)
        assert torch.equal(out[i], expected[0]), (i, name)
    with torch.no_grad():  # the fine-tunes differ from each other and from the base, so a mix-up would show
        logits = [multi(input_ids=ids[:1], decomposed_names=[n]).logits for n in (*NAMES, None)]
    assert all((a - b).abs().max() > 0.1 for i, a in enumerate(logits) for b in logits[i + 1 :])


def test_every_execution_runs_on_an_emulated_accelerator_as_on_cpu(family):
    """Merged, split and several fine-tunes in one batch, moved to an accelerator emulated on CPU (`emulated_device`: an
    operation mixing its tensors with CPU tensors fails, as on CUDA): the CPU's logits within 1e-5, the same tokens."""
    ids, rows = _ids(3), ["a", None, "c"]
    mask = torch.ones_like(ids)
    models = {execution: DecomposedModel.from_pretrained(family / "art_a", execution=execution) for execution in ("merged", "split")}
    models["multi"] = DecomposedModel.from_pretrained({n: family / f"art_{n}" for n in NAMES})
    kwargs = {"multi": {"decomposed_names": rows}}
    with torch.no_grad():
        expected = {k: (m(input_ids=ids, **kwargs.get(k, {})).logits, m.generate(input_ids=ids, attention_mask=mask, **kwargs.get(k, {}), **GEN))
                    for k, m in models.items()}
    with emulated_device() as device, torch.no_grad():
        for k, m in models.items():
            m.to(device)
            logits = m(input_ids=ids.to(device), **kwargs.get(k, {})).logits
            tokens = m.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs.get(k, {}), **GEN)
            assert logits.device == device and tokens.device == device, k
            torch.testing.assert_close(logits.cpu(), expected[k][0], rtol=0, atol=1e-5, msg=k)
            assert torch.equal(tokens.cpu(), expected[k][1]), k


def test_set_active_matches_single_model_and_base(family):
    multi = MultiDecomposedModel.from_base(family / "base")
    for name in NAMES:
        multi.load_decomposed(name, family / f"art_{name}")
    ids = _ids(3)
    base = AutoModelForCausalLM.from_pretrained(family / "base").eval()
    with torch.no_grad():
        assert torch.equal(multi.set_active(None)(input_ids=ids).logits, base(input_ids=ids).logits)
        single = DecomposedModel.from_pretrained(family / "art_b")(input_ids=ids).logits  # merged: the dense fine-tune
        torch.testing.assert_close(multi.set_active("b")(input_ids=ids).logits, single, rtol=1e-4, atol=1e-4)
        module = next(m for m in multi.modules() if isinstance(m, TenantModule) and {"a", "c"} <= set(m.tenants) and not m.lookup)
        x = torch.randn(2, 3, module.base.weight.shape[-1] if isinstance(module.base, torch.nn.Linear) else module.base.weight.shape[0])
        multi.set_active(["a", "c"])
        torch.testing.assert_close(module(x), module.base(x) + module.tenants["a"](x) + module.tenants["c"](x))


def test_storage_is_the_base_once_plus_the_artifacts(family):
    multi = MultiDecomposedModel.from_pretrained({n: family / f"art_{n}" for n in NAMES})
    base = AutoModelForCausalLM.from_pretrained(family / "base")
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    total = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*multi.parameters(), *multi.buffers()]}
    artifacts = sum((family / f"art_{n}" / "decomposition.safetensors").stat().st_size for n in NAMES)
    assert sum(total.values()) <= 1.1 * (base_bytes + artifacts)


def test_one_type(family):
    """Fine-tunes by name live on the same type as one decomposed fine-tune; the old name only constructs it."""
    multi = MultiDecomposedModel.from_pretrained({"a": family / "art_a"})
    single = DecomposedModel.from_pretrained(family / "art_a")
    assert type(multi) is type(single) and isinstance(multi, DecomposedModel)
    assert multi.decomposed_names == ["a"] and not any(isinstance(m, MultiDecomposedModel) for m in multi.modules())
    base = AutoModelForCausalLM.from_pretrained(family / "base").eval()
    assert MultiDecomposedModel(base) is base and isinstance(base, DecomposedModel)  # in place
    with pytest.raises(ConfigError, match="own fine-tune"):
        single.load_decomposed("b", family / "art_b")
    with pytest.raises(ConfigError, match="unknown"):
        single.generate(input_ids=_ids(1), decomposed_names=["a"], **GEN)
    with pytest.raises(ConfigError, match="no artifact of its own"):
        multi.set_execution("merged")
    with pytest.raises(ConfigError, match="no artifact of its own"):
        multi.save_pretrained(family / "never")
    assert not (family / "never").exists()


def test_errors(family, tmp_path):
    multi = MultiDecomposedModel.from_pretrained({"a": family / "art_a"})
    with pytest.raises(ConfigError, match="unknown"):
        multi.set_active("zzz")
    with pytest.raises(ConfigError, match="unknown"):
        multi.generate(input_ids=_ids(1), decomposed_names=["zzz"], **GEN)
    with pytest.raises(ConfigError, match="taken"):
        multi.load_decomposed("a", family / "art_a")
    with pytest.raises(ConfigError, match="entries"):
        multi.generate(input_ids=_ids(3), decomposed_names=["a", None], **GEN)
    random_model("llama", seed=5).save_pretrained(tmp_path / "other")
    with pytest.raises(ArtifactError, match="another base"):
        MultiDecomposedModel.from_base(tmp_path / "other").load_decomposed("a", family / "art_a")


def test_placed_with_offloaded_substructures(family, tmp_path):
    multi = MultiDecomposedModel.from_pretrained({n: family / f"art_{n}" for n in NAMES})
    rows = ["c", None, "a", "b"]
    ids = _ids(len(rows))
    expected = multi.generate(input_ids=ids, decomposed_names=rows, **GEN)
    names = sorted(n for n in placement.substructures(multi) if ".tenants." in n)
    assert len(names) >= 2, names  # some substructures stay, some go to disk
    multi.dispatch({"": "cpu", **dict.fromkeys(names[::2], "disk")}, offload_folder=tmp_path)
    assert torch.equal(multi.generate(input_ids=ids, decomposed_names=rows, **GEN), expected)
    with pytest.raises(ConfigError, match="before placing"):
        multi.load_decomposed("d", family / "art_a")


def test_a_layer_offloaded_to_disk_runs_each_finetunes_own_values(family, tmp_path):
    """A whole decoder layer on disk: its norms' (and GPT-2's biases') fine-tune values and the base's come back where
    they run, for a mixed batch and for one fine-tune. (Accelerate's hook loaded the base's values over the swapped-in
    ones: a layer's norms silently ran the base's, logits 2.6e-3 off on a tiny Llama; a mixed batch crashed.)"""
    rows = ["c", None, "a", "b"]
    ids = _ids(len(rows))
    multi = MultiDecomposedModel.from_pretrained({n: family / f"art_{n}" for n in NAMES})
    with torch.no_grad():
        expected = {"mixed": multi(input_ids=ids, decomposed_names=rows).logits, "one": multi(input_ids=ids, decomposed_names=["b"] * 4).logits}
    layer = next(n for n, _ in multi.named_modules() if n.endswith(("layers.1", "h.1")))
    multi.dispatch({"": "cpu", layer: "disk"}, offload_folder=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(multi(input_ids=ids, decomposed_names=rows).logits, expected["mixed"], rtol=0, atol=1e-5)
        torch.testing.assert_close(multi(input_ids=ids, decomposed_names=["b"] * 4).logits, expected["one"], rtol=0, atol=1e-5)


def _lowrank_quant(base, seed: int, rank: int = 2, bits: int = 3, group: int = 32, step: float | None = None) -> dict[str, TensorDelta]:
    """A fine-tune as annealing stores one: low rank plus a low-bit residual on every matrix (`step`: a step per row of
    that many standard deviations, annealing's coarser levels, whose codes are mostly 0)."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, p in base.named_parameters():
        if p.dim() == 2:
            u, v = torch.randn(p.shape[0], rank + seed % 2, generator=gen) * 0.05, torch.randn(rank + seed % 2, p.shape[1], generator=gen)
            residual = torch.randn(p.shape, generator=gen) * 1e-2
            if step is None:
                codes, scales = quantize(residual, bits, group)
                quant = QuantPart.from_packed(codes, scales, tuple(p.shape))
            else:
                quant = QuantPart(*quantize_codes(residual, bits, 0, step=step), bits)
            deltas[name] = TensorDelta(name, tuple(p.shape), parts=[LowRankPart(u, v), quant])
    return deltas


def test_mixed_rows_run_batched_and_equal_each_finetune_alone(quant_layout, monkeypatch):
    layout = quant_layout
    base = random_model("llama")
    deltas = {name: _lowrank_quant(base, seed=i, step=1.9 if name == "c" else None) for i, name in enumerate(NAMES)}
    merged_c = copy.deepcopy(base)  # "c" merged into a plain model: the reference its rows must give
    for name, p in merged_c.named_parameters():
        if name in deltas["c"]:
            p.data = deltas["c"][name].merge(p.data)
    multi = MultiDecomposedModel(base, {})
    for name in NAMES:
        multi.add_decomposed(name, deltas[name])
    monkeypatch.undo()
    assert any(p.fused(torch.zeros(1)) for p in multi.modules() if isinstance(p, QuantPart)), "the fused low-bit kernel runs"
    rows = ["b", None, "a", "c", "a"]
    ids = _ids(len(rows))
    with torch.no_grad():
        alone = torch.cat([multi(input_ids=ids[i : i + 1], decomposed_names=[n]).logits for i, n in enumerate(rows)])
        monkeypatch.setattr(LowRankPart, "forward", None)  # mixed rows: low rank in stacked bmm, never per fine-tune
        stacked = []
        if layout == "kernel":  # the base once, each row's own parts, in one call per matrix: never per fine-tune
            monkeypatch.setattr(QuantPart, "matmul", None)
            call = _Stacked.__call__
            monkeypatch.setattr(_Stacked, "__call__", lambda self, x, lookup, used: stacked.append(lookup) or call(self, x, lookup, used))
        mixed = multi(input_ids=ids, decomposed_names=rows).logits
        reference = merged_c(input_ids=ids[3:4]).logits
    assert all(stacked)  # with the kernel, only the embedding's lookups run outside it
    # PyTorch's int4 kernel rounds activations to bfloat16: a reassociated float32 sum can move them a step
    tol = 1e-3 if layout == "int4" else 1e-4
    torch.testing.assert_close(mixed, alone, rtol=tol, atol=tol)
    torch.testing.assert_close(alone[3:4], reference, rtol=10 * tol, atol=10 * tol)  # int4: activations in bfloat16 against float32
    monkeypatch.undo()
    held = {t.untyped_storage().data_ptr() for t in multi.buffers()}
    stacks = [m._batched[1][1] for m in multi.modules() if isinstance(m, TenantModule) and m._batched is not None]
    assert stacks and all(s.u.untyped_storage().data_ptr() in held for s in stacks if s.u is not None)  # factors held once, in the stacks
    assert all((s.table is not None) == (layout == "kernel") for s in stacks)
    held = [p.kernel_layout() for p in multi.modules() if isinstance(p, QuantPart) and p.kernel_layout() is not None]
    assert (layout == "kernel") == any(h.escapes is not None for h in held)  # serving many: each fine-tune's codes compact
    assert (layout == "kernel") == any(h.signs is not None for h in held)  # "c"'s codes, mostly 0: masked
    out = multi.generate(input_ids=ids, decomposed_names=rows, **GEN)
    for i, name in enumerate(rows):
        assert torch.equal(out[i], multi.generate(input_ids=ids[i : i + 1], decomposed_names=[name], **GEN)[0]), (i, name)
    assert (mixed[0] - mixed[2]).abs().max() > 0.1 and (mixed[1] - mixed[2]).abs().max() > 0.1


def _low_bit_lowrank(base, seed: int) -> dict[str, TensorDelta]:
    """A fine-tune as the floor target stores one: low-bit low rank (8- and 2-bit directions), beside an exact direction
    or low-bit codes on some matrices."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for i, (name, p) in enumerate(base.named_parameters()):
        if p.dim() == 2:
            u, v = torch.randn(p.shape[0], 5, generator=gen) * 0.05, torch.randn(5, p.shape[1], generator=gen)
            parts = [QuantLowRankPart.quantize(u[:, :2], v[:2], 8), QuantLowRankPart.quantize(u[:, 2:], v[2:], 2)]
            if (i + seed) % 3 == 1:
                parts.insert(0, LowRankPart(torch.randn(p.shape[0], 1, generator=gen) * 0.05, torch.randn(1, p.shape[1], generator=gen)))
            if (i + seed) % 3 == 2:
                codes, scales = quantize(torch.randn(p.shape, generator=gen) * 1e-2, 3, 32)
                parts.append(QuantPart.from_packed(codes, scales, tuple(p.shape)))
            deltas[name] = TensorDelta(name, tuple(p.shape), parts=parts)
    return deltas


def test_low_bit_low_rank_rows_run_in_the_kernel_held_one_byte_a_code(monkeypatch):
    if not kernels.available():
        pytest.skip("hf_decompose's CPU kernel is not available here")
    base = random_model("llama")
    deltas = {name: _low_bit_lowrank(base, seed=i) for i, name in enumerate(NAMES)}
    multi = MultiDecomposedModel(base, {})
    for name in NAMES:
        multi.add_decomposed(name, deltas[name])
    held = [p for p in multi.modules() if isinstance(p, QuantLowRankPart)]
    assert held and all(p.u_codes is None and p.u_half.dtype == torch.int8 for p in held)  # a quarter of float32 factors' bytes
    rows = ["b", None, "a", "c", "a"]
    ids = _ids(len(rows))
    with torch.no_grad():
        alone = torch.cat([multi(input_ids=ids[i : i + 1], decomposed_names=[n]).logits for i, n in enumerate(rows)])
        stacked = []
        call = _Stacked.__call__
        monkeypatch.setattr(_Stacked, "__call__", lambda self, x, lookup, used: stacked.append(lookup) or call(self, x, lookup, used))
        forward = QuantLowRankPart.forward
        monkeypatch.setattr(QuantLowRankPart, "forward", lambda self, x, lookup=False: forward(self, x, lookup) if lookup else pytest.fail("ran outside the kernel"))
        mixed = multi(input_ids=ids, decomposed_names=rows).logits
        monkeypatch.undo()
    assert stacked and all(stacked)  # only the embedding's lookups run outside the kernel
    torch.testing.assert_close(mixed, alone, rtol=1e-4, atol=1e-4)
    assert (mixed[0] - mixed[2]).abs().max() > 0.1
    out = multi.generate(input_ids=ids, decomposed_names=rows, **GEN)
    for i, name in enumerate(rows):
        assert torch.equal(out[i], multi.generate(input_ids=ids[i : i + 1], decomposed_names=[name], **GEN)[0]), (i, name)


def test_low_bit_low_rank_rows_without_the_kernel_equal_each_finetune_alone(monkeypatch):
    """With the compiled kernel off, low-bit factors run dequantized (once) through PyTorch's matmuls."""
    monkeypatch.setattr(kernels, "available", lambda: False)
    base = random_model("llama")
    deltas = {name: _low_bit_lowrank(base, seed=i) for i, name in enumerate(NAMES)}
    multi = MultiDecomposedModel(base, {})
    for name in NAMES:
        multi.add_decomposed(name, deltas[name])
    rows = ["b", None, "a", "c", "a"]
    ids = _ids(len(rows))
    with torch.no_grad():
        alone = torch.cat([multi(input_ids=ids[i : i + 1], decomposed_names=[n]).logits for i, n in enumerate(rows)])
        mixed = multi(input_ids=ids, decomposed_names=rows).logits
    torch.testing.assert_close(mixed, alone, rtol=1e-3, atol=1e-3)  # PyTorch's int4 kernel: bfloat16 activations
    assert any("_float" in vars(p) for p in multi.modules() if isinstance(p, QuantLowRankPart))  # dequantized once, kept


def test_low_bit_parts_offloaded_to_disk_give_the_same_tokens(tmp_path):
    """Codes held as nibbles (no escapes) and low-bit factors held as int8, half of the substructures offloaded."""
    base = random_model("llama")
    deltas = {name: _low_bit_lowrank(base, seed=i) for i, name in enumerate(NAMES)}
    multi = MultiDecomposedModel(base, {})
    for name in NAMES:
        multi.add_decomposed(name, deltas[name])
    rows = ["c", None, "a", "b"]
    ids = _ids(len(rows))
    expected = multi.generate(input_ids=ids, decomposed_names=rows, **GEN)
    held = [p.kernel_layout() for p in multi.modules() if isinstance(p, QuantPart) and p.kernel_layout() is not None]
    assert any(h.escapes is None for h in held) or not kernels.available()  # uniform 3-bit codes: nibbles the smaller layout
    names = sorted(n for n in placement.substructures(multi) if ".tenants." in n)
    multi.dispatch({"": "cpu", **dict.fromkeys(names[::2], "disk")}, offload_folder=tmp_path)
    assert torch.equal(multi.generate(input_ids=ids, decomposed_names=rows, **GEN), expected)


def test_offloaded_parts_leave_the_stacks(family, tmp_path):
    rows = ["c", None, "a", "b"]
    ids = _ids(len(rows))
    expected = MultiDecomposedModel.from_pretrained({n: family / f"art_{n}" for n in NAMES}).generate(input_ids=ids, decomposed_names=rows, **GEN)
    multi = MultiDecomposedModel.from_pretrained({n: family / f"art_{n}" for n in NAMES})
    names = sorted(n for n in placement.substructures(multi) if ".tenants." in n)
    multi.dispatch({"": "cpu", **dict.fromkeys(names[1::2], "disk")}, offload_folder=tmp_path)  # placed before any step
    assert torch.equal(multi.generate(input_ids=ids, decomposed_names=rows, **GEN), expected)


def test_rows_all_with_a_finetune_gather_contributions_in_row_order(monkeypatch):
    """When every row has a fine-tune, contributions are gathered in row order (no scatter): each row
    still equals its fine-tune alone, in any order of the rows."""
    base = random_model("llama")
    deltas = {name: _lowrank_quant(base, seed=i) for i, name in enumerate(NAMES)}
    multi = MultiDecomposedModel(base, {})
    for name in NAMES:
        multi.add_decomposed(name, deltas[name])
    rows = ["c", "a", "b", "a"]
    ids = _ids(len(rows))
    routing = type(next(m.routing for m in multi.modules() if isinstance(m, TenantModule)))
    layouts, layout = [], routing.layout
    monkeypatch.setattr(routing, "layout", lambda self, *a: layouts.append(layout(self, *a)) or layouts[-1])
    with torch.no_grad():
        alone = torch.cat([multi(input_ids=ids[i : i + 1], decomposed_names=[n]).logits for i, n in enumerate(rows)])
        mixed = multi(input_ids=ids, decomposed_names=rows).logits
    assert layouts and all(rows_ is None for _, _, rows_, _ in layouts)
    torch.testing.assert_close(mixed, alone, rtol=1e-3, atol=1e-3)
    assert (mixed[0] - mixed[1]).abs().max() > 0.1


class _Experts(torch.nn.Module):
    """Fused experts as transformers' experts interface declares them (4 experts, 6 outputs, 5 inputs)."""

    def __init__(self, is_transposed: bool):
        super().__init__()
        shape = (4, 5, 6) if is_transposed else (4, 6, 5)
        self.gate_up_proj = torch.nn.Parameter(torch.zeros(shape))
        self.is_transposed = is_transposed


def test_expert_deltas_write_bands_of_whole_output_rows():
    """An expert's delta runs as parts where it writes a band of that expert's outputs over its whole input (gate rows,
    up rows, a whole expert; an (in, out) layout's columns from a delta stored transposed); any other layout is held
    whole (None)."""
    from hf_decompose.experts import Outputs, outputs
    from hf_decompose.names import Target, _strided

    rows = _Experts(is_transposed=False)
    fused = torch.arange(rows.gate_up_proj.numel()).view(rows.gate_up_proj.shape)  # each entry's position, as transformers' conversion maps it
    up = _strided("gate_up_proj", fused[2, 3:, :])
    assert outputs(rows, "gate_up_proj", up) == Outputs("gate_up_proj", 2, 3, 6)
    whole = Target("gate_up_proj").matrix(1, tuple(fused.shape))  # matrix 1 of a 3-D tensor on disk
    assert outputs(rows, "gate_up_proj", whole) == Outputs("gate_up_proj", 1, 0, 6)
    interleaved = _strided("gate_up_proj", fused[0, ::2, :])
    part_of_input = _strided("gate_up_proj", fused[0, :, 1:])
    assert outputs(rows, "gate_up_proj", interleaved) is None
    assert outputs(rows, "gate_up_proj", part_of_input) is None
    assert outputs(rows, "gate_up_proj", Target("gate_up_proj")) is None  # the 3-D tensor whole

    columns = _Experts(is_transposed=True)  # (experts, in, out), as gpt-oss
    stored = Target("gate_up_proj").matrix(3, tuple(columns.gate_up_proj.shape))  # on disk (in, out) as the parameter
    assert outputs(columns, "gate_up_proj", stored) is None  # its canonical rows are inputs
    assert outputs(columns, "gate_up_proj", stored, transposed=True) == Outputs("gate_up_proj", 3, 0, 6)


def test_experts_of_two_finetunes_run_as_parts_and_add_up(tmp_path):
    """Two fine-tunes of a mixture of experts by name: each one's changed experts are parts beside the shared experts
    (not a copy of them), and both active give the base plus both deltas."""
    from hf_decompose import decompose_to_disk
    from hf_decompose.experts import TenantExperts

    from .test_architectures import _pair

    base, a, b = _pair(tmp_path, "qwen2_moe", {"a": 1, "b": 2})
    artifacts = {n: decompose_to_disk(p, base, DecomposedConfig(mode="lossless"), output_dir=tmp_path / f"art_{n}", progress=False)
                 for n, p in (("a", a), ("b", b))}  # fmt: skip
    multi = DecomposedModel.from_pretrained(artifacts, dtype=torch.float32).eval()
    wrappers = [m for m in multi.modules() if isinstance(m, (TenantExperts, TenantParameters)) and hasattr(m.base, "gate_up_proj")]
    assert len(wrappers) == 2 and all(isinstance(m, TenantExperts) for m in wrappers)
    assert not any(p.dim() == 3 for m in wrappers for p in m.tenants.parameters())  # no fine-tune holds a stack of experts
    both = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    changed = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).state_dict() for p in (a, b)]
    with torch.no_grad():
        for name, p in both.state_dict().items():
            p.copy_(changed[0][name] + changed[1][name] - p)
        ids = torch.arange(2, 14)[None].repeat(2, 1)
        torch.testing.assert_close(multi(input_ids=ids, decomposed_names=[None, None]).logits,
                                   AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(input_ids=ids).logits, rtol=0, atol=1e-5)
        multi.set_active(["a", "b"])
        torch.testing.assert_close(multi(input_ids=ids).logits, both(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_experts_placed_with_offloaded_parts_and_base_give_the_same_tokens(tmp_path):
    """A mixture's fine-tunes by name placed by a device map: some of each fine-tune's expert parts, one layer's shared
    experts and the other layer whole on disk (Accelerate loads them where they run) give the tokens they give in
    memory (the loop once read the offloaded experts' empty weights: other tokens, silently)."""
    from hf_decompose import decompose_to_disk
    from hf_decompose.experts import TenantExperts

    from .test_architectures import CALIBRATION, _pair

    base, a, b = _pair(tmp_path, "qwen2_moe", {"a": 1, "b": 2})
    config = DecomposedConfig(mode="anneal", annealing={"target": "top1", "calibration_prompts": 4, "calibration_tokens": 4})
    artifacts = {n: decompose_to_disk(p, base, config, output_dir=tmp_path / f"art_{n}", calibration=CALIBRATION, progress=False)
                 for n, p in (("a", a), ("b", b))}  # fmt: skip
    multi = DecomposedModel.from_pretrained(artifacts, dtype=torch.float32).eval()
    ids, gen = torch.arange(2, 14)[None].repeat(3, 1), dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    rows = ["a", "b", None]
    expected = {"mixed": multi.generate(ids, decomposed_names=rows, **gen), "one": multi.generate(ids[:1], decomposed_names=["b"], **gen)}
    experts = [n for n, m in multi.named_modules() if isinstance(m, TenantExperts)]
    parts = sorted(n for n in placement.substructures(multi) if ".experts.tenants." in n)
    assert experts and len(parts) >= 2
    multi.dispatch({"": "cpu", f"{experts[0]}.base": "disk", **dict.fromkeys(parts[::2], "disk"), "model.layers.1": "disk"},
                   offload_folder=tmp_path / "offload")  # fmt: skip
    assert torch.equal(multi.generate(ids, decomposed_names=rows, **gen), expected["mixed"])
    assert torch.equal(multi.generate(ids[:1], decomposed_names=["b"], **gen), expected["one"])
