"""This project's annealing against delta-compression peers, at equal kept budgets.

For each budget (share of delta parameters kept) and method: exact-match rate of greedy generation
against the fine-tune (held-out prompts), mean KL (teacher-forced on the fine-tune's continuation)
and artifact bytes. Peers use PEFT's implementations where they exist (`peft.utils.merge_utils`):
magnitude pruning (TIES' trim), DARE (random drop + rescale); plus per-matrix SVD truncation and a
1-bit sign + per-matrix scale delta (BitDelta without its distillation) and the whole delta rounded to
4 or 3 bits per entry (``rtn4``/``rtn3``, one scale per 64 inputs). "ours@budget" is this
project's activation-weighted low-rank structure at that budget without the guard; "anneal" is the
guarded annealing with the default (tie) target (its own budget). Vectors (norms) are kept whole by all.

Two peers at their own budgets, in bits per delta parameter (`--bits`), graded like annealing
(identical / tie-equivalent / vLLM-close on the held-out prompts, mean KL):
``deltacome`` (Delta-CoMe: mixed precision over each matrix's singular directions, the 2 largest in
8 bits, the next 32 in 3 bits, the rest in 2 bits until the budget is spent, the tail dropped) and
``bitdelta_distill`` (BitDelta: the delta's signs with a scale per row and per column, the scales
alone trained `--distill-steps` Adam steps against the fine-tune's logits on the calibration
prompts; 1 bit per parameter plus the scales).

    python benchmarks/annealing_vs_peers.py [--recipe recipes/default_pair.yaml] [--budgets 50,25,12,6,3,1]
    python benchmarks/annealing_vs_peers.py --methods deltacome,bitdelta_distill --bits 1,1.6,2,3,4 --no-anneal

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
from hf_decompose.equivalence import greedy_generate, verify_equivalence  # noqa: E402
from hf_decompose.modules import DecomposedModule  # noqa: E402
from hf_decompose.pair import prepare_default_pair  # noqa: E402
from hf_decompose.quantize import codes_of, dequantize, quantize  # noqa: E402
from hf_decompose.parts import DensePart, LowRankPart, QuantPart, TensorDelta  # noqa: E402


def evaluate(model, tok, ref, prompts, max_new_tokens) -> dict:
    tokens = torch.stack(greedy_generate(model, tok, prompts, max_new_tokens))
    logits = continuation_logits(model, ref.input_ids, ref.attention_mask, ref.prompt_len, 8)
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), ref.logits.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {"exact_match_rate": float((tokens == ref.top1).all(1).float().mean()), "mean_kl": float(kl.mean()),
            "top1_agreement": float((logits.argmax(-1) == ref.top1).float().mean())}


BUDGET_FREE = ("bitdelta", "rtn4", "rtn3")  # every entry kept, in fewer bits
GRADED = ("deltacome", "bitdelta_distill")  # own budgets in bits per parameter, graded in three grades


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


def deltacome(d: torch.Tensor, bits: float) -> tuple[torch.Tensor, int]:
    """(approximation, stored bytes) of a canonical delta under Delta-CoMe's mixed precision at `bits`
    per entry: singular directions u_i s_i v_i^T in 8 / 3 / 2 bits (2 / 32 / the rest) while the budget
    lasts, each factor quantized per direction with a bfloat16 scale (full grid, clipped scale)."""
    m, n = d.shape
    u, s, vh = torch.linalg.svd(d.float(), full_matrices=False)
    budget, widths = bits * m * n, []
    for i in range(len(s)):
        b = 8 if i < 2 else 3 if i < 34 else 2
        if budget < b * (m + n) + 32:
            break
        widths.append(b)
        budget -= b * (m + n) + 32
    out, stored = torch.zeros(m, n), 0
    root = s[: len(widths)].sqrt()
    for b in sorted(set(widths)):
        idx = torch.tensor([i for i, w in enumerate(widths) if w == b])
        factors = []
        for f in ((u[:, idx] * root[idx]).t().contiguous(), vh[idx] * root[idx, None]):  # (r, m), (r, n): a scale per direction
            packed, scales = quantize(f, b, 0, grid="full")
            factors.append(dequantize(codes_of(packed, f.shape, "full"), scales))
        out += factors[0].t() @ factors[1]
        stored += len(idx) * (b * (m + n) + 32) // 8
    return out, stored


def bitdelta_distill(base_model, full: dict[str, torch.Tensor], transposed: dict[str, bool], calib, steps: int, lr: float = 1e-4,
                     batch_size: int = 4) -> dict[str, torch.Tensor]:
    """BitDelta with its scale distillation: per matrix ``a[:, None] * sign(D) * b[None, :]`` with a
    per-row `a` (init: the mean |D| of the row) and a per-column `b` (init 1); only a and b train,
    `steps` Adam steps on the KL to the fine-tune's logits over the calibration continuations.
    `base_model` is the plain base, whose parameters carry the deltas' names."""
    from torch.func import functional_call

    signs = {n: torch.where(full[n] >= 0, 1.0, -1.0) for n in full}
    rows = {n: torch.nn.Parameter(full[n].abs().mean(1)) for n in full}
    cols = {n: torch.nn.Parameter(torch.ones(full[n].shape[1])) for n in full}
    bases = dict(base_model.named_parameters())
    opt = torch.optim.Adam([*rows.values(), *cols.values()], lr=lr)
    target = calib.logits.log_softmax(-1)
    n_prompts, t = calib.top1.shape
    for step in range(steps):
        s = (step * batch_size) % n_prompts
        params = {}
        for n in full:
            d = rows[n][:, None] * signs[n] * cols[n][None, :]
            params[n] = bases[n].detach() + (d.t() if transposed[n] else d)
        kwargs = {"input_ids": calib.input_ids[s : s + batch_size], "attention_mask": calib.attention_mask[s : s + batch_size], "logits_to_keep": t + 1}
        logits = functional_call(base_model, params, (), kwargs, tie_weights=True, strict=False).logits[:, :-1].float()
        loss = torch.nn.functional.kl_div(logits.log_softmax(-1), target[s : s + batch_size], log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {n: (rows[n][:, None] * signs[n] * cols[n][None, :]).detach() for n in full}


def graded_peers(methods: list[str], pair, tok, model, modules: dict, full: dict, calib, total: int, vectors: int, args) -> list[dict]:
    """Delta-CoMe at each of `--bits` and BitDelta with distilled scales, each graded in three grades."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(pair.finetuned, dtype=torch.float32).eval()
    ref_tokens = greedy_generate(reference, tok, pair.eval_prompts, args.max_new_tokens)
    rows = []

    def grade(method: str, bits: float, approx: dict[str, torch.Tensor], stored: int, t0: float) -> None:
        for n, mod in modules.items():
            mod.set_delta(TensorDelta(full[n].name, full[n].shape, full[n].transposed, [DensePart(approx[n])]))
        eq = verify_equivalence(reference, model, tok, pair.eval_prompts, args.max_new_tokens, reference_tokens=ref_tokens, progress=False)
        for n, mod in modules.items():
            mod.set_delta(full[n])
        n = eq.num_prompts
        stored += 4 * vectors
        rows.append({"budget": None, "method": method, "bits": bits, "bits_per_param": 8 * stored / total, "artifact_bytes": stored,
                     "stored_fraction": stored / (4 * total), "identical": eq.identical, "tie_equivalent": round(eq.tie_equivalent_rate * n),
                     "vllm_close": round(eq.logprobs_close_rate * n), "mean_kl": eq.mean_kl, "exact_match_rate": eq.exact_match_rate,
                     "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)

    dense = {n: full[n].to_dense() for n in full}
    if "deltacome" in methods:
        for bits in (float(b) for b in args.bits.split(",")):
            t0 = time.perf_counter()
            made = {n: deltacome(dense[n], bits) for n in full}
            grade("deltacome", bits, {n: a for n, (a, _) in made.items()}, sum(b for _, b in made.values()), t0)
    if "bitdelta_distill" in methods:
        t0 = time.perf_counter()
        base = AutoModelForCausalLM.from_pretrained(pair.base, dtype=torch.float32).eval()
        approx = bitdelta_distill(base, dense, {n: full[n].transposed for n in full}, calib, args.distill_steps)
        stored = sum(math.ceil(math.prod(d.shape) / 8) + 2 * sum(d.shape) for d in dense.values())
        grade("bitdelta_distill", 1.0, approx, stored, t0)
    return rows


def best_budgets(rows: list[dict], prompts: int) -> dict:
    """Per graded method, the fewest bits per parameter at which all prompts are tie-equivalent, and vLLM-close."""
    best = {}
    for method in {r["method"] for r in rows if r["method"] in GRADED}:
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["bits_per_param"])
        best[method] = {grade: next((r["bits_per_param"] for r in mine if r[grade] == prompts), None) for grade in ("tie_equivalent", "vllm_close")}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=None)
    parser.add_argument("--budgets", default="50,25,12,6,3,1")
    parser.add_argument("--methods", default="magnitude,dare,svd,ours,bitdelta,rtn4,rtn3")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--bits", default="1,1.6,2,3,4", help="the graded peers' budgets, bits per delta parameter (deltacome)")
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--anneal", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--anneal-report", help="take the annealing row from this decomposition.json (an `hf-decompose demo` "
                        "artifact of the same pair, verified on the same prompts) instead of annealing again")
    args = parser.parse_args()
    torch.manual_seed(0)
    pair = prepare_default_pair(recipe=args.recipe)
    tok = AutoTokenizer.from_pretrained(pair.finetuned)
    model = decompose(pair.finetuned, pair.base, DecomposedConfig(mode="lossless", execution="split"), progress=False)  # split: deltas swappable
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
    graded = [m for m in args.methods.split(",") if m in GRADED]
    args.methods = ",".join(m for m in args.methods.split(",") if m not in GRADED)
    if graded:
        rows += graded_peers(graded, pair, tok, model, modules, full, calib, total, vectors, args)
    for budget in [float(b) / 100 for b in args.budgets.split(",") if args.methods]:
        for method in args.methods.split(","):
            t0 = time.perf_counter()
            stored, kept = 4 * vectors, vectors
            for n, mod in modules.items():
                delta, nbytes = peer_delta(method, full[n], budget, factors[n])
                mod.set_delta(delta)
                stored += nbytes
                kept += delta.num_params() if method not in ("magnitude", "dare") else int((delta.get("dense").weight != 0).sum())
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
    for r in (r for r in rows if r["method"] not in GRADED):
        budget = "-" if r["budget"] is None else f"{r['budget']:.0%}"
        print(f"| {budget} | {r['method']} | {r['kept_fraction']:.1%} | {r['stored_fraction']:.1%} | {r['exact_match_rate']:.0%} | {r['mean_kl']:.2e} | "
              f"{r['artifact_bytes'] / 2**20:.1f} MiB | {finetuned_bytes / r['artifact_bytes']:.1f}x smaller |")
    if graded:
        print("\n| method | bits / param | stored | identical | tie-equivalent | vLLM-close | mean KL |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in (r for r in rows if r["method"] in GRADED):
            print(f"| {r['method']} | {r['bits_per_param']:.2f} | {r['stored_fraction']:.1%} | {r['identical']} | {r['tie_equivalent']} | {r['vllm_close']} | {r['mean_kl']:.2e} |")
    name = Path(args.recipe).stem if args.recipe else "default_pair"
    out = Path(__file__).parent / "results" / f"peers_{name}{'_graded' if graded else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "pair": name, "prompts": len(pair.eval_prompts), "max_new_tokens": args.max_new_tokens,
                               "finetuned_bytes": finetuned_bytes, "rows": rows, "best": best_budgets(rows, len(pair.eval_prompts))}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
