"""Each annealing target on a pair: the bytes it needed and its three grades beside the noise floor.

For each target (default: tie, floor): anneal the pair's fine-tune on its calibration prompts,
verify on its 32 held-out prompts x 64 tokens (exact / tie-equivalent / vLLM-close, mean KL) and
record stored bytes, bits per delta parameter, the fraction of the float32 delta and the time.
Reads the pair's noise floor from results/noise_floor_<pair>.json when present (benchmarks/noise_floor.py).
    flock /tmp/hf_decompose_bench.lock python benchmarks/targets.py [--recipe recipes/long_wd_pair.yaml] [--targets tie,floor]
        [--schedule knapsack --levels int6,int4g64,lr0.5+int3g64,lr0.5+int2g64,lr0.5+int1g64,lr0.5+int1,lr0.5] [--expected-flips 0.25] [--max-time-s 900] [--head-row-steps 4] [--column-steps 0.5]
        [--more-heldout 160] [--output DIR]
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from _machine import machine
from hf_decompose import DecomposedConfig, decompose, verify_equivalence
from hf_decompose.equivalence import greedy_generate
from hf_decompose.parts import QuantPart
from hf_decompose.pair import FinetuneRecipe, cache_dir, load_corpus, prepare_default_pair, prompt_sets
from hf_decompose.report import bits_per_param, summary_table

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=None)
    parser.add_argument("--targets", default="tie,floor")
    parser.add_argument("--schedule", default=None, help="ladder or knapsack (default: the target's)")
    parser.add_argument("--levels", default=None, help="comma-separated annealing levels (default: the target's)")
    parser.add_argument("--grid", default=DecomposedConfig().annealing["grid"], help="low-bit grid: signed or full")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--expected-flips", type=float, default=None, help="the guard's flip budget (default: the config's)")
    parser.add_argument("--max-time-s", type=float, default=None, help="the annealing's time cap (default: the config's)")
    parser.add_argument("--head-row-steps", type=float, default=None, help="annealing.head_row_steps (default: the config's)")
    parser.add_argument("--column-steps", type=float, default=None, help="annealing.column_steps (default: the config's)")
    parser.add_argument("--more-heldout", type=int, default=0,
                        help="also verify on this many more held-out prompts (after the pair's calibration prompts in its prompt order)")
    parser.add_argument("--output", default=None, help="save each target's artifact under OUTPUT/<target>")
    args = parser.parse_args()
    pair = prepare_default_pair(recipe=args.recipe)
    name = Path(args.recipe).stem if args.recipe else "default_pair"
    reference = AutoModelForCausalLM.from_pretrained(pair.finetuned, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(pair.finetuned)
    ref_tokens = greedy_generate(reference, tokenizer, pair.eval_prompts, args.max_new_tokens)
    more = more_heldout(args.recipe, args.more_heldout)
    more_tokens = greedy_generate(reference, tokenizer, more, args.max_new_tokens) if more else None
    floor_file = RESULTS / f"noise_floor_{name}.json"
    floor = json.loads(floor_file.read_text())["floor"] if floor_file.is_file() else None
    out_file = RESULTS / f"targets_{name}.json"
    rows = json.loads(out_file.read_text())["rows"] if out_file.is_file() else {}
    for target in args.targets.split(","):
        t0, load0 = time.perf_counter(), os.getloadavg()
        overrides = ({"levels": args.levels.split(",")} if args.levels else {}) | ({} if args.expected_flips is None else {"expected_flips": args.expected_flips})
        overrides |= {} if args.max_time_s is None else {"max_time_s": args.max_time_s}
        overrides |= {} if args.head_row_steps is None else {"head_row_steps": args.head_row_steps}
        overrides |= {} if args.column_steps is None else {"column_steps": args.column_steps}
        config = DecomposedConfig(mode="anneal", annealing={"target": target, "schedule": args.schedule, "grid": args.grid, **overrides})
        opts = config.annealing_options()
        model = decompose(pair.finetuned, pair.base, config, calibration=pair.calib_prompts, progress=True)
        eq = verify_equivalence(reference, model, tokenizer, pair.eval_prompts, args.max_new_tokens, reference_tokens=ref_tokens, progress=False)
        model.report["equivalence"] = eq.to_dict()
        if floor:
            model.report["noise_floor"] = floor
        report = model.report
        stored = report["size_bytes"]["artifact"]
        if args.output:
            model.save_pretrained(Path(args.output) / target)
        key = f"{target}/{opts['schedule']}/{args.grid}" + (f"/{args.levels}" if args.levels else "") + f"/flips{opts['expected_flips']:g}" + f"/{opts['max_time_s']:g}s"
        key += f"/head_rows{opts['head_row_steps']:g}" if opts["head_row_steps"] else ""
        key += f"/column_steps{opts['column_steps']:g}" if opts["column_steps"] else ""
        rows[key] = {
            "target": target, "schedule": opts["schedule"], "levels_tried": opts["levels"], "grid": config.annealing["grid"], "stored_bytes": stored, "stored_fraction": report["stored_fraction"],
            "bits_per_param": bits_per_param(stored, report["delta_params"]),
            "bits_per_param_bit_packed": bits_per_param(bit_packed_bytes(model.deltas.values()), report["delta_params"]), "finetuned_over_artifact": report["size_bytes"]["finetuned"] / stored,
            "identical": eq.identical, "tie_equivalent": round(eq.tie_equivalent_rate * eq.num_prompts), "vllm_close": round(eq.logprobs_close_rate * eq.num_prompts),
            "mean_kl": eq.mean_kl, "divergence_margins": eq.divergence_margins, "annealing_s": report["annealing"]["seconds"],
            "levels": {r["layer"]: r["level"] for r in report["annealing"]["levels"]}, "floor_bound": report["annealing"].get("floor"),
            "precision": report["annealing"]["precision"].get("dtype"), "seconds": time.perf_counter() - t0,
            "load_average": {"start": load0, "end": os.getloadavg()}, "machine": machine(),
        }
        if more:  # the acceptance's prompts and these: divergences outside the tie grade in all of them
            eq2 = verify_equivalence(reference, model, tokenizer, more, args.max_new_tokens, reference_tokens=more_tokens, progress=False)
            tie = round(eq2.tie_equivalent_rate * len(more))
            rows[key]["more_heldout"] = {"prompts": len(more), "identical": eq2.identical, "tie_equivalent": tie,
                                         "vllm_close": round(eq2.logprobs_close_rate * len(more)), "mean_kl": eq2.mean_kl,
                                         "non_tie_of_all": len(more) + eq.num_prompts - tie - rows[key]["tie_equivalent"]}
            print(f"{len(more)} more held-out prompts: {rows[key]['more_heldout']}", flush=True)
        print(f"\n== target {target} ({opts['schedule']}) ==\n{summary_table(report)}", flush=True)
        RESULTS.mkdir(exist_ok=True)
        out_file.write_text(json.dumps({"pair": name, "machine": machine(), "rows": rows}, indent=2))
        del model


def more_heldout(recipe: str | None, n: int) -> list[str]:
    """`n` held-out prompts after the pair's evaluation and calibration prompts, from the same unseen texts."""
    if not n:
        return []
    r = FinetuneRecipe.load(recipe) if recipe else FinetuneRecipe()
    corpus = load_corpus(cache_dir(), r.corpus_package, r.train_texts, r.heldout_texts)
    return prompt_sets(corpus, r.n_eval, r.n_calib + n, r.prompt_seed)[1][r.n_calib :]


def bit_packed_bytes(deltas) -> int:
    """Stored bytes with every low-bit code bit-packed and every scale in bfloat16 (no Huffman coding)."""
    return sum(math.ceil(p.codes.numel() * p.bits / 8) + 2 * p.scales.numel() if isinstance(p, QuantPart) else p.nbytes() for d in deltas for p in d.parts)


if __name__ == "__main__":
    main()
