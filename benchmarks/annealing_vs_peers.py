"""This project's annealing against delta-compression peers, at equal kept budgets.

For each budget (share of delta parameters kept) and method: exact-match rate of greedy generation
against the fine-tune (held-out prompts), mean KL (teacher-forced on the fine-tune's continuation)
and artifact bytes. Peers use PEFT's implementations where they exist (`peft.utils.merge_utils`):
magnitude pruning (TIES' trim), DARE (random drop + rescale); plus per-matrix SVD truncation and a
1-bit sign + per-matrix scale delta (BitDelta without its distillation) and the whole delta rounded to
4 or 3 bits per entry (``rtn4``/``rtn3``, one scale per 64 inputs). "ours@budget" is this
project's activation-weighted low-rank structure at that budget without the guard; "anneal" is the
guarded annealing with the default (tie) target (its own budget). Vectors (norms) are kept whole by all.

    python benchmarks/annealing_vs_peers.py [--recipe recipes/default_pair.yaml] [--budgets 50,25,12,6,3,1]

Writes benchmarks/results/peers_<pair>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from peft.utils.merge_utils import prune
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine  # noqa: E402

from hf_decompose import DecomposedConfig, decompose  # noqa: E402
from hf_decompose.annealing import GramCollector, calibrate, continuation_logits, weighted_lowrank  # noqa: E402
from hf_decompose.equivalence import greedy_generate  # noqa: E402
from hf_decompose.modules import DecomposedModule  # noqa: E402
from hf_decompose.pair import prepare_default_pair  # noqa: E402
from hf_decompose.quantize import quantize  # noqa: E402
from hf_decompose.parts import DensePart, LowRankPart, QuantPart, TensorDelta  # noqa: E402


def evaluate(model, tok, ref, prompts, max_new_tokens) -> dict:
    tokens = torch.stack(greedy_generate(model, tok, prompts, max_new_tokens))
    logits = continuation_logits(model, ref.input_ids, ref.attention_mask, ref.prompt_len, 8)
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), ref.logits.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {"exact_match_rate": float((tokens == ref.top1).all(1).float().mean()), "mean_kl": float(kl.mean()),
            "top1_agreement": float((logits.argmax(-1) == ref.top1).float().mean())}


BUDGET_FREE = ("bitdelta", "rtn4", "rtn3")  # every entry kept, in fewer bits


def peer_delta(method: str, full: TensorDelta, budget: float, factors=None) -> tuple[TensorDelta, int]:
    """(delta, stored bytes) for one matrix under a peer method at `budget`."""
    d = full.to_dense()
    m, n = d.shape
    if method in ("magnitude", "dare"):
        kept = prune(d.clone(), budget, "magnitude" if method == "magnitude" else "random", rescale=method == "dare")
        nnz = int((kept != 0).sum())
        return TensorDelta(full.name, full.shape, full.transposed, [DensePart(kept)]), nnz * 8  # value + index
    if method.startswith("rtn"):  # every entry rounded to int<bits>, one scale per 64 inputs, no guard or feedback
        packed, scales = quantize(d, int(method[3:]), 64)
        q = TensorDelta(full.name, full.shape, full.transposed, [QuantPart.from_packed(packed, scales, full.shape)])
        return q, q.nbytes()
    if method == "bitdelta":
        return TensorDelta(full.name, full.shape, full.transposed, [DensePart(d.sign() * d.abs().mean())]), math.ceil(m * n / 8) + 4
    r = max(0, int(budget * m * n / (m + n)))
    u, v, _ = factors if method == "ours" else weighted_lowrank(d, None)
    return TensorDelta(full.name, full.shape, full.transposed, [LowRankPart(u[:, :r].contiguous(), v[:r].contiguous())]), 4 * r * (m + n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=None)
    parser.add_argument("--budgets", default="50,25,12,6,3,1")
    parser.add_argument("--methods", default="magnitude,dare,svd,ours,bitdelta,rtn4,rtn3")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--anneal", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--anneal-report", help="take the annealing row from this decomposition.json (an `hf-decompose demo` "
                        "artifact of the same pair, verified on the same prompts) instead of annealing again")
    args = parser.parse_args()
    torch.manual_seed(0)
    pair = prepare_default_pair(recipe=args.recipe)
    tok = AutoTokenizer.from_pretrained(pair.finetuned)
    model = decompose(pair.finetuned, pair.base, DecomposedConfig(mode="lossless"), progress=False)
    ref = calibrate(model, tok, pair.eval_prompts, args.max_new_tokens)
    calib = calibrate(model, tok, pair.calib_prompts[:16], 32)
    modules = {m.delta.name: m for m in model.model.modules() if isinstance(m, DecomposedModule) and m._tied is None and len(m.delta.shape) == 2}
    heads = {m.delta.name: m for m in model.model.modules() if isinstance(m, DecomposedModule) and m._tied is not None}
    grams = GramCollector({n: heads.get(n, mod) for n, mod in modules.items()}).run(model, calib)
    full = {n: mod.delta for n, mod in modules.items()}
    factors = {n: weighted_lowrank(full[n].to_dense(), grams.get(n)) for n in full}
    total = sum(math.prod(d.shape) for d in model.deltas.values())
    vectors = total - sum(math.prod(d.shape) for d in full.values())
    rows = []
    for budget in [float(b) / 100 for b in args.budgets.split(",")]:
        for method in args.methods.split(","):
            t0 = time.perf_counter()
            stored, kept = 4 * vectors, vectors
            for n, mod in modules.items():
                delta, nbytes = peer_delta(method, full[n], budget, factors[n])
                mod.set_delta(delta)
                stored += nbytes
                kept += delta.num_params() if method not in ("magnitude", "dare") else int((delta.dense != 0).sum())
            free = method in BUDGET_FREE
            row = {"budget": None if free else budget, "method": method, "kept_fraction": kept / total,
                   "artifact_bytes": stored, "stored_fraction": stored / (4 * total), **evaluate(model, tok, ref, pair.eval_prompts, args.max_new_tokens), "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(json.dumps(row), flush=True)
            for n, mod in modules.items():
                mod.set_delta(full[n])
        args.methods = ",".join(m for m in args.methods.split(",") if m not in BUDGET_FREE)  # one row each
    if args.anneal_report:
        report = json.loads(Path(args.anneal_report).read_text())
        eq = report["equivalence"]
        if (eq["num_prompts"], eq["max_new_tokens"]) != (len(pair.eval_prompts), args.max_new_tokens):
            raise SystemExit(f"{args.anneal_report} was verified on {eq['num_prompts']} x {eq['max_new_tokens']}, not this run's prompts")
        rows.append({"budget": None, "method": "anneal (tie target)", "kept_fraction": report["kept_fraction"],
                     "artifact_bytes": report["size_bytes"]["artifact"], "stored_fraction": report["stored_fraction"],
                     "annealing_s": report["annealing"]["seconds"], "levels": [r["level"] for r in report["annealing"]["levels"]],
                     "exact_match_rate": eq["exact_match_rate"], "mean_kl": eq["mean_kl"], "top1_agreement": eq["top1_agreement"],
                     "from": "demo report"})
    elif args.anneal:
        t0 = time.perf_counter()
        annealed = decompose(pair.finetuned, pair.base, DecomposedConfig(mode="anneal"), calibration=pair.calib_prompts, progress=True)
        row = {"budget": None, "method": "anneal (tie target)", "kept_fraction": annealed.report["kept_fraction"],
               "artifact_bytes": annealed.report["size_bytes"]["artifact"], "stored_fraction": annealed.report["stored_fraction"],
               "annealing_s": annealed.report["annealing"]["seconds"], "levels": [r["level"] for r in annealed.report["annealing"]["levels"]],
               **evaluate(annealed, tok, ref, pair.eval_prompts, args.max_new_tokens), "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
    finetuned_bytes = sum(f.stat().st_size for f in pair.finetuned.glob("*.safetensors"))
    print("\n| budget | method | kept params | stored bytes | exact match | mean KL | artifact | vs fine-tune |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        budget = "-" if r["budget"] is None else f"{r['budget']:.0%}"
        print(f"| {budget} | {r['method']} | {r['kept_fraction']:.1%} | {r['stored_fraction']:.1%} | {r['exact_match_rate']:.0%} | {r['mean_kl']:.2e} | "
              f"{r['artifact_bytes'] / 2**20:.1f} MiB | {finetuned_bytes / r['artifact_bytes']:.1f}x smaller |")
    name = Path(args.recipe).stem if args.recipe else "default_pair"
    out = Path(__file__).parent / "results" / f"peers_{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "pair": name, "prompts": len(pair.eval_prompts), "max_new_tokens": args.max_new_tokens,
                               "finetuned_bytes": finetuned_bytes, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
