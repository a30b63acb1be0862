"""`hf-decompose inspect`: every figure is written, readable, of the expected size, and linked."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from hf_decompose import DecomposedConfig, artifact, decompose
from hf_decompose.cli import main
from hf_decompose.figures import DPI, bits_scale, block_order
from tests.synthetic import perturb, random_model


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    """A demo-like output: one criterion artifact with planted blocks, an equivalence run and an annealing trace."""
    root = tmp_path_factory.mktemp("demo")
    model = random_model("llama")
    model.save_pretrained(root / "base")
    perturb(model, 1e-3)
    with torch.no_grad():
        up = model.model.layers[0].mlp.up_proj.weight  # (64, 32): two planted blocks
        up[:8, :4] += 0.05
        up[20:30, 10:18] -= 0.05
    model.save_pretrained(root / "ft")
    decomposed = decompose(root / "ft", root / "base", DecomposedConfig(mode="criterion", spectral_test=False), progress=False)
    decomposed.report["equivalence"] = {
        "exact_match_rate": 0.75, "num_prompts": 4, "max_new_tokens": 16, "first_divergence": [None, 3, None, None],
        "max_abs_logit_diff": 0.5, "mean_kl": 1e-3, "top1_agreement": 0.9, "perplexity_reference": 10.0,
        "perplexity_candidate": 10.5, "per_prompt_max_abs_logit_diff": [0.0, 0.5, 1e-3, 2e-2],
    }  # fmt: skip
    decomposed.report["annealing"] = {  # the layout `annealing.anneal` reports
        "ladder": ["int8", "int4g64", "lr0.5+int3g64"],
        "trace": [{"layer": "*", "level": "int4g64", "accepted": False}, {"layer": "*", "level": "int8", "accepted": True},
                  {"layer": "0-1", "layers": ["model.layers.0", "model.layers.1"], "level": "int4g64", "accepted": False},  # a group
                  {"layer": "model.layers.0", "level": "int4g64", "accepted": False}],
        "levels": [{"layer": "model.layers.0", "level": "int8", "kept_params": 1000, "delta_params": 1000, "bytes": 1010},
                   {"layer": "model.layers.1", "level": None, "kept_params": 1000, "delta_params": 1000, "bytes": 4000}],
        "precision": {"dtype": "bfloat16", "accepted": True},
    }  # fmt: skip
    decomposed.save_pretrained(root / "out" / "criterion")
    return root / "out"


def test_inspect_writes_linked_readable_figures(demo_output):
    assert main(["inspect", str(demo_output)]) == 0
    md = demo_output / "report" / "report.md"
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text())
    assert len(links) == 5
    expected = {"layers": (1000, 600), "blocks": (1000, 400), "annealing": (1000, 400), "equivalence": (1000, 400)}
    for link in links:
        path = md.parent / link
        assert path.is_file(), link
        with Image.open(path) as image:
            kind = link.removesuffix(".png").split("_")[-1]
            assert image.format == "PNG"
            if kind in expected:
                assert image.size == expected[kind], (link, image.size)
            else:  # z histograms: one 260 px row of panels per 4 module types
                assert image.size[0] == 1000 and image.size[1] % int(2.6 * DPI) == 0
            pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 5, f"{link} looks blank"
    text = md.read_text()
    assert "criterion" in text and "kept" in text


def test_inspect_placeholders_without_statistics(demo_output, tmp_path):
    """A lossless-looking report (no z histograms, no annealing, no equivalence) still gets every figure."""
    art = demo_output / "criterion"
    report = artifact.read_report(art)
    with_statistics = [layer.pop("tensors") for layer in report["layers"] if "tensors" in layer]
    assert with_statistics, "the criterion report had no per-tensor statistics to remove"
    report.pop("annealing")
    report.pop("equivalence")
    copy = tmp_path / "plain"
    copy.mkdir()
    for file in art.iterdir():
        if file.is_file():
            (copy / file.name).write_bytes(file.read_bytes())
    artifact.update_report(copy, report)
    assert main(["inspect", str(copy), "--output", str(tmp_path / "rep")]) == 0
    assert len(list((tmp_path / "rep").glob("*.png"))) == 5


def test_block_order_makes_components_contiguous():
    gen = torch.Generator().manual_seed(0)
    sizes = [(6, 4), (3, 7), (5, 5), (1, 1)]
    support = torch.block_diag(*[torch.ones(h, w, dtype=torch.bool) for h, w in sizes])
    support = torch.cat([support, torch.zeros(3, support.shape[1], dtype=torch.bool)])  # unused rows
    rows, cols = torch.randperm(support.shape[0], generator=gen), torch.randperm(support.shape[1], generator=gen)
    shuffled = support[rows][:, cols]
    row_order, col_order, n = block_order(shuffled)
    reordered = shuffled[row_order][:, col_order]
    assert n == 4
    blocks, r, c = [], 0, 0
    while r < reordered.shape[0] and reordered[r].any():
        h = int((reordered[:, c] & (torch.arange(reordered.shape[0]) >= r)).sum())
        w = int(reordered[r, c:].sum())
        assert reordered[r : r + h, c : c + w].all()
        blocks.append((h, w))
        r, c = r + h, c + w
    assert sorted(blocks) == sorted(sizes) and int(reordered.sum()) == sum(h * w for h, w in sizes)
    assert not reordered[r:].any()  # unused rows come last


def test_bits_axis_turns_log_where_bars_span_a_decade():
    """An annealed artifact's layers at 1-2 bits beside a float32 norm's 32: a linear axis showed them as equal stubs."""
    assert bits_scale(np.array([1.07, 1.95, 1.26, 32.0])) == "log"
    assert bits_scale(np.array([0.0, 3.76, 2.04, 4.15])) == "linear"  # a layer storing nothing does not count
    assert bits_scale(np.array([0.0, 0.0])) == "linear"
