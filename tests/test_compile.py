"""Split and multi-tenant models under `torch.compile` and transformers' static cache: the same tokens."""

import pytest
import torch

from hf_decompose import DecomposedConfig, MultiDecomposedModel, decompose
from hf_decompose.multi import TenantParameters
from hf_decompose.parts import DensePart, TensorDelta

from .synthetic import perturb, random_model
from .test_multi import _low_bit_lowrank, _lowrank_quant

GEN = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
ROWS = ["a", None, "b"]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    random_model("llama").save_pretrained(root / "base")
    model = perturb(random_model("llama"), 1e-3, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.outer(torch.randn(p.shape[0]), torch.randn(p.shape[1])) * 0.05)
    model.save_pretrained(root / "ft")
    decomposed = decompose(root / "ft", root / "base", DecomposedConfig(mode="criterion"), progress=False)
    return decomposed.set_execution("split")


@pytest.fixture(scope="module")
def multi():
    base = random_model("llama")
    deltas = {"a": _lowrank_quant(base, seed=0), "b": _low_bit_lowrank(base, seed=1)}  # b: low-bit factors, held as int8 codes
    for i, d in enumerate(deltas.values()):  # norm weights that differ per fine-tune: one run with each row's weight
        d.update({n: TensorDelta(n, tuple(p.shape), parts=[DensePart(torch.full_like(p, 0.05 * (i + 1)))])
                  for n, p in base.named_parameters() if n.endswith("norm.weight")})
    multi = MultiDecomposedModel(base, {})
    for name, d in deltas.items():
        multi.add_decomposed(name, d)
    return multi


def _ids(rows: int) -> torch.Tensor:
    return torch.randint(1, 128, (rows, 6), generator=torch.Generator().manual_seed(0))


def test_static_cache_generates_the_same_tokens(split, multi):
    ids = _ids(len(ROWS))
    assert torch.equal(split.generate(input_ids=ids, cache_implementation="static", **GEN), split.generate(input_ids=ids, **GEN))
    expected = multi.generate(input_ids=ids, decomposed_names=ROWS, **GEN)
    assert torch.equal(multi.generate(input_ids=ids, decomposed_names=ROWS, cache_implementation="static", **GEN), expected)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])  # inductor: > 60 s of compiling
def test_compiled_forward_equals_eager(split, multi, backend):
    torch._dynamo.reset()
    ids = _ids(len(ROWS))
    with torch.no_grad():
        eager = split(input_ids=ids).logits
        torch.testing.assert_close(torch.compile(split, backend=backend)(input_ids=ids).logits, eager, rtol=1e-5, atol=1e-5)
        eager = multi(input_ids=ids, decomposed_names=ROWS).logits
        assert {m._per_row for m in multi.modules() if isinstance(m, TenantParameters)} == {True}
        compiled = torch.compile(multi, backend=backend)  # the model itself: rows routed inside the compiled call
        torch.testing.assert_close(compiled(input_ids=ids, decomposed_names=ROWS).logits, eager, rtol=1e-5, atol=1e-5)
        multi.set_active("b")
        try:
            eager = multi(input_ids=ids).logits
            torch.testing.assert_close(compiled(input_ids=ids).logits, eager, rtol=1e-5, atol=1e-5)
        finally:
            multi.set_active(None)


@pytest.mark.slow
def test_compiled_static_cache_generation_gives_the_same_tokens(split, multi):
    torch._dynamo.reset()
    ids = _ids(len(ROWS))
    expected = split.generate(input_ids=ids, **GEN)
    split.forward = torch.compile(split.forward)
    try:
        assert torch.equal(split.generate(input_ids=ids, cache_implementation="static", **GEN), expected)
    finally:
        del split.forward
    expected = multi.generate(input_ids=ids, decomposed_names=ROWS, **GEN)
    multi.forward = torch.compile(multi.forward)
    try:
        assert torch.equal(multi.generate(input_ids=ids, decomposed_names=ROWS, cache_implementation="static", **GEN), expected)
    finally:
        del multi.forward
