"""Substructure kinds: the registry, and a new kind as one class that the artifact and both executions use."""

import pytest
import torch
from torch import nn

from hf_decompose import ArtifactError, artifact
from hf_decompose.modules import DecomposedModule
from hf_decompose.parts import PART_KINDS, DensePart, LowRankPart, Part, TensorDelta, register_part
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
    assert list(PART_KINDS) == ["dense", "block", "sparse", "override", "lowrank", "quant", "quantfull"]
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
    module = DecomposedModule(base, read["weight"])
    x = torch.randn(3, 8, generator=gen)
    with torch.no_grad():
        merged = module(x)
        module.execution = "split"
        split = module(x)
    torch.testing.assert_close(merged, x @ (base.weight + expected).t())
    torch.testing.assert_close(split, merged)


def test_a_stored_part_that_does_not_fit_its_shape_is_refused(diagonal_kind, tmp_path):
    delta = TensorDelta("weight", (8, 8), parts=[diagonal_kind(torch.ones(5), (8, 8))])
    artifact.save(tmp_path / "a", {"weight": delta}, _index(), {})
    with pytest.raises(ArtifactError, match="'weight' is malformed.*expected \\(8,\\)"):
        artifact.load(tmp_path / "a")


def test_a_kind_stored_incompletely_is_refused(tmp_path):
    delta = TensorDelta("weight", (4, 4), parts=[LowRankPart(torch.ones(4, 1), torch.ones(1, 4))])
    tensors = delta.state()
    del tensors["weight.lowrank.v"]
    with pytest.raises(ValueError, match="lowrank part is stored incompletely .*'lowrank.v'"):
        TensorDelta.from_state("weight", (4, 4), False, tensors)


def _index() -> dict:
    return {"config": {}, "base_model": {"id": "base", "sha256": {"model.safetensors": "0" * 64}}}
