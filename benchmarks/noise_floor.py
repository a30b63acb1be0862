"""The noise floor of the default pair: the fine-tune against itself as deployments serve it.

On the pair's 32 held-out prompts x 64 greedy tokens: the fp32 fine-tune against itself in
bfloat16, one prompt per batch, another thread count and with its delta stored in bfloat16, each
graded exact / tie-equivalent / vLLM-close with mean KL and first-divergence margins.
Writes benchmarks/results/noise_floor_<pair>.json. Run under the benchmark lock:
    flock /tmp/hf_decompose_bench.lock python benchmarks/noise_floor.py [--recipe recipes/long_wd_pair.yaml]
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from _machine import machine
from hf_decompose.floor import noise_floor
from hf_decompose.pair import prepare_default_pair

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    pair = prepare_default_pair(recipe=args.recipe)
    t0, load0 = time.perf_counter(), os.getloadavg()
    finetuned = AutoModelForCausalLM.from_pretrained(pair.finetuned, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(pair.base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(pair.finetuned)
    floor = noise_floor(finetuned, tokenizer, pair.eval_prompts, args.max_new_tokens, 8, base, progress=False)
    name = Path(args.recipe).stem if args.recipe else "default_pair"
    out = {"pair": name, "prompts": len(pair.eval_prompts), "max_new_tokens": args.max_new_tokens, "seconds": time.perf_counter() - t0,
           "load_average": {"start": load0, "end": os.getloadavg()}, "machine": machine(), "floor": floor}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"noise_floor_{name}.json").write_text(json.dumps(out, indent=2))
    for variant, row in floor.items():
        margins = sorted(m for m in row["divergence_margins"] if m is not None)
        print(f"{variant:<16} identical {row['identical']:>2}  tie {round(row['tie_equivalent_rate'] * row['num_prompts']):>2}  "
              f"vLLM {round(row['logprobs_close_rate'] * row['num_prompts']):>2}  KL {row['mean_kl']:.2e}  margins {[round(m, 4) for m in margins]}")


if __name__ == "__main__":
    main()
