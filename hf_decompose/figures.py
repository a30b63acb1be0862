"""`hf-decompose inspect`: a Markdown report with figures (matplotlib, Agg) of decomposed artifacts.

For each artifact: bits per delta parameter and substructures per layer, the block structure of chosen
tensors (support permuted so that each component is a contiguous block), histograms of the entry
test statistic z against its N(0, 1) null, the annealing trace per layer, and the first-divergence
and max |logit diff| histograms of the equivalence run with its three grades beside the noise floor.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, MaxNLocator, NullFormatter  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402

from . import artifact  # noqa: E402
from .criterion import Z_HIST_BINS, Z_HIST_RANGE  # noqa: E402
from .errors import ArtifactError  # noqa: E402
from .report import bits_per_param, floor_rows, stored_bytes, summary_table  # noqa: E402
from .parts import TensorDelta  # noqa: E402
from .substructures import _bipartite_components  # noqa: E402

FIGSIZE = (10.0, 4.0)
DPI = 100
MAX_PIXELS = 400  # block pictures are max-pooled down to at most this many rows / columns


def artifact_dirs(directory: Path) -> list[Path]:
    """`directory` itself when it is an artifact, else its artifact subfolders (a demo output)."""
    if (directory / artifact.INDEX).is_file():
        return [directory]
    found = sorted(p for p in directory.iterdir() if (p / artifact.INDEX).is_file()) if directory.is_dir() else []
    if not found:
        raise ArtifactError(f"{directory}: neither a decomposed artifact nor a folder of artifacts")
    return found


def write_report(directory: str | Path, output: str | Path | None = None, tensors: list[str] | None = None, max_blocks: int = 3) -> Path:
    """Write `<output or DIR/report>/report.md` and its PNGs; return the Markdown file's path.

    `tensors` picks the block pictures by substring of tensor names; by default the `max_blocks`
    matrices with the most substructures.
    """
    directory = Path(directory)
    out = Path(output) if output else directory / "report"
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# hf-decompose report: {directory.name}", ""]
    for art in artifact_dirs(directory):
        report = artifact.read_report(art)
        _, deltas = artifact.load(art)
        prefix = art.name if art != directory else "artifact"
        figures = {
            "Bits per delta parameter and substructures per layer": plot_layers(report, out / f"{prefix}_layers.png"),
            "Block structure (support, components permuted into blocks)": plot_blocks(deltas, out / f"{prefix}_blocks.png", tensors, max_blocks),
            "Entry test statistic z against its N(0, 1) null": plot_z_histograms(report, out / f"{prefix}_z.png"),
            "Annealing trace per layer": plot_annealing(report, out / f"{prefix}_annealing.png"),
            "Equivalence: first divergence and max |logit diff| per prompt": plot_equivalence(report, out / f"{prefix}_equivalence.png"),
        }
        lines += [f"## {art.name}", "", "```", summary_table(report), "```", ""]
        for title, path in figures.items():
            lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines))
    return md


def _placeholder(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=14, transform=ax.transAxes)
    ax.set_axis_off()


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _short(name: str) -> str:
    """`model.layers.12` -> `L12`, `model.embed_tokens.weight` -> `embed_tokens`."""
    if m := re.search(r"(?:layers|h)\.(\d+)", name):
        return f"L{m.group(1)}"
    return name.removesuffix(".weight").split(".")[-1]


def bits_scale(bits: np.ndarray) -> str:
    """The bits axis's scale: log where the nonzero bars span more than a decade (a float32 norm's 32 bits beside
    layers of 1-2 bits left those a row of equal stubs), else linear."""
    positive = bits[bits > 0]
    return "log" if len(positive) and positive.min() < positive.max() / 10 else "linear"


def plot_layers(report: dict, path: Path) -> Path:
    """Bars: stored bits per delta parameter (`bits_scale`) and number of substructures per layer."""
    layers = report.get("layers", [])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(FIGSIZE[0], 6), sharex=True)
    if not layers:
        _placeholder(top, "no per-layer statistics")
        bottom.set_axis_off()
        return _save(fig, path)
    x = np.arange(len(layers))
    bits = np.array([bits_per_param(layer.get("stored_bytes", 4 * layer["kept_params"]), layer["delta_params"]) for layer in layers])
    top.bar(x, np.maximum(bits, 1e-6), color="tab:blue")
    scale = bits_scale(bits)
    top.set_yscale(scale)
    if scale == "log":  # bits read as powers of two (1, 2, 4, ..., 32), at most 8 of them
        positive = bits[bits > 0]
        lo, hi = math.floor(math.log2(positive.min())), math.ceil(math.log2(positive.max()))
        top.set_yticks([2.0**k for k in range(hi, lo - 1, -math.ceil((hi - lo + 1) / 8))], minor=False)
        top.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        top.yaxis.set_minor_formatter(NullFormatter())
    top.set_ylabel("bits per delta parameter")
    stored = stored_bytes(report)
    top.set_title(f"mode {report.get('mode')}: {bits_per_param(stored, report.get('delta_params', 0)):.2f} bits per delta parameter, "
                  f"{stored / 2**20:,.1f} MiB stored")
    bottom.bar(x, [layer["num_substructures"] for layer in layers], color="tab:orange")
    bottom.set_ylabel("substructures")
    bottom.set_xticks(x, [_short(layer["name"]) for layer in layers], rotation=90, fontsize=7)
    return _save(fig, path)


def block_order(support: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
    """Row and column permutations that make each component of the support a contiguous block
    (largest first, unused rows/columns last), and the number of components."""
    n_rows, n_cols = support.shape
    if support.all():  # a dense delta (lossless mode): one block, no graph to build
        return np.arange(n_rows), np.arange(n_cols), 1
    rows, cols = support.nonzero(as_tuple=True)
    _, labels = _bipartite_components(rows.numpy(), cols.numpy(), n_rows, n_cols)
    used = np.zeros(n_rows + n_cols, dtype=bool)
    used[rows.numpy()] = used[n_rows + cols.numpy()] = True
    comps, sizes = np.unique(labels[used], return_counts=True)
    rank = np.full(labels.max() + 1, len(comps))  # unused nodes sort last
    rank[comps[np.argsort(-sizes, kind="stable")]] = np.arange(len(comps))
    key = np.where(used, rank[labels], len(comps))
    return np.argsort(key[:n_rows], kind="stable"), np.argsort(key[n_rows:], kind="stable"), len(comps)


def _pool(mask: np.ndarray, size: int = MAX_PIXELS) -> np.ndarray:
    """Max-pool a boolean matrix down to at most size x size cells (a cell is on if any entry is)."""
    fr, fc = max(1, math.ceil(mask.shape[0] / size)), max(1, math.ceil(mask.shape[1] / size))
    padded = np.zeros((math.ceil(mask.shape[0] / fr) * fr, math.ceil(mask.shape[1] / fc) * fc), dtype=bool)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    return padded.reshape(padded.shape[0] // fr, fr, padded.shape[1] // fc, fc).any(axis=(1, 3))


def plot_blocks(deltas: dict[str, TensorDelta], path: Path, tensors: list[str] | None = None, max_blocks: int = 3) -> Path:
    """The support of chosen matrices after the permutation that groups their components."""
    matrices = {n: d for n, d in deltas.items() if len(d.shape) == 2 and any(p.kind in ("dense", "block", "sparse") for p in d.parts)}
    if tensors:
        chosen = [n for n in matrices if any(t in n for t in tensors)][:max_blocks]
    else:
        # most components first; among equals, partial supports before fully dense ones
        chosen = sorted(matrices, key=lambda n: (matrices[n].rank - matrices[n].num_substructures(), matrices[n].get("dense") is not None))[:max_blocks]
    fig, axes = plt.subplots(1, max(len(chosen), 1), figsize=FIGSIZE, squeeze=False)
    if not chosen:
        _placeholder(axes[0, 0], "no entry-level support to show\n(empty or low-rank only)")
        return _save(fig, path)
    for ax, name in zip(axes[0], chosen):
        support = matrices[name].support()
        row_order, col_order, n_comp = block_order(support)
        pooled = _pool(support.numpy()[row_order][:, col_order])
        ax.imshow(pooled, cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto", extent=(0, support.shape[1], support.shape[0], 0))
        ax.set_title(f"{name.removesuffix('.weight').removeprefix('model.')}\n{n_comp} components, {support.float().mean():.2%} of entries", fontsize=8)
        ax.set_xlabel(f"inputs (permuted, {support.shape[1]})", fontsize=8)
        ax.set_ylabel(f"outputs (permuted, {support.shape[0]})", fontsize=8)
        ax.tick_params(labelsize=6)
    return _save(fig, path)


def _role(tensor_name: str) -> str:
    return tensor_name.removesuffix(".weight").removesuffix(".bias").split(".")[-1].removesuffix("_proj")


def plot_z_histograms(report: dict, path: Path) -> Path:
    """Observed counts of entry z (all layers pooled, per module type) against the N(0, 1) null."""
    by_role: dict[str, np.ndarray] = {}
    for layer in report.get("layers", []):
        for name, stat in (layer.get("tensors") or {}).items():
            if "z_hist" in stat:
                by_role[_role(name)] = by_role.get(_role(name), 0) + np.asarray(stat["z_hist"], dtype=np.float64)
    if not by_role:
        fig, ax = plt.subplots(figsize=FIGSIZE)
        _placeholder(ax, "no criterion statistics (lossless mode, or a report without z histograms)")
        return _save(fig, path)
    roles = sorted(by_role)
    ncols = min(len(roles), 4)
    nrows = math.ceil(len(roles) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(FIGSIZE[0], 2.6 * nrows), squeeze=False)
    edges = np.linspace(-Z_HIST_RANGE, Z_HIST_RANGE, Z_HIST_BINS + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    cdf = stats.norm.cdf(edges)
    cdf[0], cdf[-1] = 0.0, 1.0  # the outer bins hold the clipped tails
    for ax, role in zip(axes.flat, roles):
        counts = by_role[role]
        expected = counts.sum() * np.diff(cdf)
        ax.bar(centers, counts, width=edges[1] - edges[0], color="tab:blue", label="observed")
        ax.plot(centers, expected, color="tab:red", label="N(0, 1) null")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.5)
        ax.set_title(f"{role[:20]}: {counts[np.abs(centers) > 3].sum() / counts.sum():.2%} |z| > 3", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(roles) :]:
        ax.set_axis_off()
    axes[0, 0].legend(fontsize=7)
    return _save(fig, path)


def plot_annealing(report: dict, path: Path) -> Path:
    """Per layer: the levels tried (accepted o, rolled back x; column "*" is the whole-model
    temperature) and the level kept, and the bytes each layer's delta keeps against float32."""
    annealing = report.get("annealing") or {}
    layers = annealing.get("levels") or []
    fig, (left, right) = plt.subplots(1, 2, figsize=FIGSIZE)
    if not layers:
        _placeholder(left, "not annealed")
        right.set_axis_off()
        return _save(fig, path)
    ladder = [str(x) for x in annealing.get("ladder") or sorted({t["level"] for t in annealing.get("trace", [])}, key=str)]
    rank = {level: i for i, level in enumerate(ladder)}
    names = ["*"] + [r["layer"] for r in layers]
    column = {name: i for i, name in enumerate(names)}
    for t in annealing.get("trace", []):
        if t.get("probe") or str(t["level"]) not in rank:  # knapsack probes and budget checks are no ladder steps
            continue
        ok = t["accepted"]
        for layer in t.get("layers", [t["layer"]]):  # a group's check marks each of its layers
            left.plot(column[layer], rank[str(t["level"])], "o" if ok else "x", color="tab:green" if ok else "tab:red", ms=5)
    for i, record in enumerate(layers, start=1):
        if record.get("level") is not None:
            left.plot([i - 0.4, i + 0.4], [rank[str(record["level"])]] * 2, color="black", lw=2)
    left.plot([], [], "o", color="tab:green", label="accepted")
    left.plot([], [], "x", color="tab:red", label="rolled back")
    left.plot([], [], color="black", lw=2, label="kept level")
    left.set_yticks(np.arange(len(ladder)), ladder, fontsize=7)
    left.set_ylabel("level (more aggressive upwards)")
    left.legend(fontsize=7)
    left.set_xticks(np.arange(len(names)), [_short(n) for n in names], rotation=90, fontsize=7)
    bits = [bits_per_param(r.get("bytes", 4 * r["kept_params"]), r["delta_params"]) if r.get("delta_params") else np.nan for r in layers]
    right.bar(np.arange(1, len(layers) + 1), bits, color="tab:blue")
    right.set_ylabel("bits per delta parameter")
    right.set_title(f"{8 * sum(r.get('bytes', 0) for r in layers) / max(sum(r.get('delta_params', 0) for r in layers), 1):.2f} bits per annealed "
                    f"delta parameter ({report.get('stored_fraction', 0):.1%} of the float32 delta overall)", fontsize=9)
    right.set_xticks(np.arange(1, len(layers) + 1), [_short(r["layer"]) for r in layers], rotation=90, fontsize=7)
    return _save(fig, path)


def plot_grades(ax, eq: dict, floor: dict) -> None:
    """Grouped bars: prompts identical / tie-equivalent / vLLM-close, the artifact beside each floor variant."""
    rows = floor_rows(eq, floor)
    x = np.arange(len(rows))
    for i, (key, label, color) in enumerate((("exact_match_rate", "identical", "tab:green"), ("tie_equivalent_rate", "tie-equivalent", "tab:blue"),
                                             ("logprobs_close_rate", "vLLM-close", "tab:gray"))):
        ax.bar(x + (i - 1) * 0.27, [r.get(key, np.nan) * r["num_prompts"] for _, r in rows], width=0.27, color=color, label=label)
    ax.set_xticks(x, [label.removeprefix("floor: ") for label, _ in rows], rotation=30, fontsize=7, ha="right")
    ax.set_ylabel("prompts")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("artifact and noise floor vs the fine-tune", fontsize=8)
    ax.legend(fontsize=6)


def plot_equivalence(report: dict, path: Path) -> Path:
    """Histograms of the first divergent token per prompt and of each prompt's max |logit diff|, and
    the three grades beside the noise floor's."""
    eq = report.get("equivalence") or {}
    fig, (left, right, grades) = plt.subplots(1, 3, figsize=FIGSIZE)
    if not eq:
        _placeholder(left, "no equivalence run")
        right.set_axis_off()
        grades.set_axis_off()
        return _save(fig, path)
    plot_grades(grades, eq, report.get("noise_floor") or {})
    n_new = eq["max_new_tokens"]
    divergent = [d for d in eq["first_divergence"] if d is not None]
    left.hist(divergent, bins=np.linspace(0, n_new, min(n_new, 32) + 1), color="tab:orange", label="diverged")
    left.bar([n_new + 2], [len(eq["first_divergence"]) - len(divergent)], width=2, color="tab:green", label="identical")
    left.set_xlabel("first divergent new token")
    left.set_ylabel("prompts")
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    n = eq["num_prompts"]
    title = f"{round(eq['exact_match_rate'] * n)} / {n} identical"
    if "tie_equivalent_rate" in eq:
        title += f"\n{round(eq['tie_equivalent_rate'] * n)} tie-equivalent, {round(eq['logprobs_close_rate'] * n)} vLLM-close"
    left.set_title(title, fontsize=8)
    left.legend(fontsize=7)
    diffs = np.asarray(eq.get("per_prompt_max_abs_logit_diff") or [], dtype=np.float64)
    if diffs.size:
        positive = diffs[diffs > 0]
        lo, hi = (positive.min(), positive.max()) if positive.size else (1e-6, 1.0)
        bins = np.logspace(math.log10(lo) - 0.1, math.log10(hi) + 0.1, 20)
        right.hist(np.maximum(diffs, lo), bins=bins, color="tab:blue")
        right.set_xscale("log")
        right.set_xlabel("max |logit diff| per prompt (teacher-forced)")
        right.yaxis.set_major_locator(MaxNLocator(integer=True))
        right.set_title(f"{int((diffs == 0).sum())} prompts at exactly 0 (left edge)", fontsize=8)
    else:
        _placeholder(right, f"per-prompt logit diffs not recorded\n(max {eq.get('max_abs_logit_diff', 0):.3g})")
    return _save(fig, path)
