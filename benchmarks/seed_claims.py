"""The seed's claims, measured: the paper's literal criterion on pretrained checkpoints, and the
criterion against the ground truth of small models trained here, regime by regime.

    python benchmarks/seed_claims.py [--skip-gemma] [--pretrain-steps 400 --ft-steps 200 --long-steps 800]

Writes benchmarks/results/seed_claims.json (machine named) and seed_claims.md (the tables).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _ground_truth  # noqa: E402
import _literal  # noqa: E402
from _machine import machine  # noqa: E402

from hf_decompose.pair import cache_dir, load_corpus, prepare_base, prompt_sets  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SMOLLM2_SIGMA = 1 / 24  # initializer_range of the published SmolLM2-135M config (its GGUF does not carry it)
GEMMA_SIGMA = 0.02  # initializer_range of Gemma 3


def _pct(x: float) -> str:
    return f"{100 * x:.3f}%" if 0 < abs(x) < 0.001 else f"{100 * x:.1f}%"


def literal_tables(checkpoints: list[dict]) -> list[str]:
    lines = [
        "| model | module | entries | indistinguishable entries (entry + group test) | (entry test alone) | indistinguishable groups | weight sigma / init sigma (median) | top singular value / N(0, sigma^2) edge (median) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for ck in checkpoints:
        by_type = defaultdict(list)
        for row in ck["tensors"]:
            by_type[row["type"]].append(row)
        for kind, rows in by_type.items():
            n = sum(r["entries"] for r in rows)
            mean = lambda key: sum(r[key] * r["entries"] for r in rows) / n  # noqa: E731
            tops = [r["top_singular_over_edge"] for r in rows if r["top_singular_over_edge"] == r["top_singular_over_edge"]]  # not NaN
            lines.append(
                f"| {ck['model']} | {kind} | {n:,} | {_pct(mean('unsupported entry+group'))} | {_pct(mean('unsupported entry only'))} | "
                f"{_pct(mean('unsupported_groups'))} | {statistics.median(r['weight_sigma_over_init'] for r in rows):.2f} | "
                f"{f'{statistics.median(tops):.1f}' if tops else 'n/a'} |"
            )
    lines += ["", "| model | removal level | entries removed (set to 0) | identical greedy continuations |", "| --- | --- | ---: | ---: |"]
    for ck in checkpoints:
        for level, r in ck["removal"].items():
            lines.append(f"| {ck['model']} | {level} | {_pct(r['removed_fraction'])} | {r['identical_continuations']} / {ck['prompts']} |")
    lines += ["", "Per layer, indistinguishable entries (entry test alone), min / median / max over layers:", ""]
    for ck in checkpoints:
        per_layer = defaultdict(lambda: [0.0, 0])
        for row in ck["tensors"]:
            per_layer[row["layer"]][0] += row["unsupported entry only"] * row["entries"]
            per_layer[row["layer"]][1] += row["entries"]
        fractions = {k: v[0] / v[1] for k, v in per_layer.items() if ".layers." in k}
        lo, hi = min(fractions, key=fractions.get), max(fractions, key=fractions.get)
        lines.append(f"- {ck['model']}: {_pct(fractions[lo])} ({lo}) / {_pct(statistics.median(fractions.values()))} / {_pct(fractions[hi])} ({hi})")
    return lines


def ground_truth_tables(gt: dict) -> list[str]:
    qs = list(next(iter(gt["regimes"].values()))["support"]["criterion"])
    head = " | ".join(f"q={q} P / R" for q in qs)
    lines = [
        f"| regime | truly supported (ever a non-zero gradient) | of which bit-unchanged | ROC AUC (entry / group p-values) | test | {head} |",
        "| --- | ---: | ---: | ---: | --- |" + " ---: |" * len(qs),
    ]
    for label, r in gt["regimes"].items():
        s = r["support"]
        for i, test in enumerate(("criterion", "entry+group")):
            cells = " | ".join(f"{s[test][q]['precision']:.2f} / {s[test][q]['recall']:.2f}" for q in qs)
            unchanged = _pct(s["supported_but_unchanged_fraction"]) if "supported_but_unchanged_fraction" in s else "-"
            first = f"| {label} | {_pct(s['truly_supported_fraction'])} | {unchanged} | {s['roc_auc']:.3f}" if i == 0 else "| | | |"
            lines.append(f"{first} | {'entry + group + spectral' if test == 'criterion' else 'entry + group'} | {cells} |")
    pre = next(r for r in gt["regimes"].values() if "zeroed_unsupported" in r)["zeroed_unsupported"]
    lines += [
        "",
        f"Pretrained small model, zeroing the {_pct(pre['removed_fraction'])} of entries the init-null criterion (entry + group, q = 0.05) "
        f"calls unsupported: {pre['equivalence']['exact_match_rate']:.0%} identical greedy continuations, "
        f"top-1 agreement {pre['equivalence']['top1_agreement']:.3f}, mean KL {pre['equivalence']['mean_kl']:.3g}.",
        "",
        "| regime | supported entries (criterion mask) | stored (of delta parameters) | substructures | spectral rank (sum) | identical continuations | top-1 agreement | mean KL |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, r in gt["regimes"].items():
        if "decomposition" in r:
            d, eq = r["decomposition"], r["decomposition"]["equivalence"]
            lines.append(
                f"| {label} | {_pct(d['supported_entries_fraction'])} | {_pct(d['kept_fraction'])} | {d['num_substructures']} | {d['spectral_rank']} | "
                f"{eq['exact_match_rate']:.0%} | {eq['top1_agreement']:.3f} | {eq['mean_kl']:.2g} |"
            )
    lines += ["", "| full fine-tune steps | layer | stored (of delta parameters) | substructures | spectral rank | entry-level components: count: sizes (nodes) |", "| ---: | --- | ---: | ---: | ---: | --- |"]
    for steps, d in gt["training_length"].items():
        for layer, s in d["layers"].items():
            sizes = ", ".join(map(str, s["component_sizes"][:8])) + (" ..." if len(s["component_sizes"]) > 8 else "")
            lines.append(f"| {steps} | {layer} | {_pct(s['kept_fraction'])} | {s['substructures']} | {s['spectral_rank']} | {len(s['component_sizes'])}: {sizes or '-'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-gemma", action="store_true")
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--ft-steps", type=int, default=200)
    parser.add_argument("--long-steps", type=int, default=800)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--tables-only", action="store_true", help="re-render seed_claims.md from the saved JSON")
    args = parser.parse_args()
    if args.tables_only:
        return write_tables(json.loads((RESULTS / "seed_claims.json").read_text()))
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    root = cache_dir()
    corpus = load_corpus(root)
    prompts = prompt_sets(corpus, 8, 0)[0]
    out = {"machine": machine(), "checkpoints": []}
    checkpoints = [("SmolLM2-135M-Instruct (GGUF Q4_1)", lambda: prepare_base(root), SMOLLM2_SIGMA)]
    if not args.skip_gemma:
        checkpoints.append(("Gemma-3-270m (GGUF Q4_K_M)", lambda: _literal.prepare_gemma(root), GEMMA_SIGMA))
    for name, prepare, sigma in checkpoints:
        t = time.perf_counter()
        directory = prepare()
        out["checkpoints"].append(_literal.run_checkpoint(name, directory, sigma, prompts) | {"prepare_s": time.perf_counter() - t})
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    out["ground_truth"] = _ground_truth.run(corpus.texts, args.pretrain_steps, args.ft_steps, args.long_steps)
    print(f"ground truth: {time.perf_counter() - t:.0f} s", flush=True)
    out["total_s"] = time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "seed_claims.json").write_text(json.dumps(out, indent=1, default=str))
    write_tables(out)


def write_tables(out: dict) -> None:
    m = out["machine"]
    tables = [f"Measured on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch thread(s)), {out['total_s'] / 60:.1f} min in all.", ""]
    tables += literal_tables(out["checkpoints"]) + [""] + ground_truth_tables(out["ground_truth"])
    (RESULTS / "seed_claims.md").write_text("\n".join(tables) + "\n")
    print("\n".join(tables))


if __name__ == "__main__":
    main()
