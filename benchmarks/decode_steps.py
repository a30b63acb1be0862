"""Decode-step timings against the byte bound, in one process (less exposed to a shared machine than
`inference.py`'s whole generations): a prefill of 16 tokens, then the median time of one greedy
decode step, interleaved rounds.

* batch 1: the original fine-tune, the decomposed model merged, split (thread pool on / off);
* 8 rows: one merged model; a `MultiDecomposedModel` with N = 8 fine-tunes (row i -> fine-tune i);
  8 separate full models run one after another, one row each: 8 x the original's batch-1 step (the
  models are alike and none fits a CPU cache, so this is what eight copies cost, without their memory).

The byte bound of N fine-tunes at 8 rows: merged tokens/s x base bytes / (base bytes + N artifacts).
Uses `inference.py`'s synthetic family (``--synthetic LAYERS``) or the default pair.

    python benchmarks/decode_steps.py --synthetic 12 [--threads 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _machine import machine  # noqa: E402
from inference import default_family, synthetic_family  # noqa: E402

from hf_decompose import DecomposedModel, MultiDecomposedModel  # noqa: E402
from hf_decompose.parts import set_parallel  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
N = 8


@torch.no_grad()
def step_ms(model, ids: torch.Tensor, steps: int, **kwargs) -> float:
    """Median ms of one greedy decode step after a prefill of `ids`."""
    out = model(input_ids=ids, use_cache=True, **kwargs)
    cache, token, times = out.past_key_values, out.logits[:, -1:].argmax(-1), []
    for _ in range(steps):
        t = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True, **kwargs)
        times.append(time.perf_counter() - t)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return statistics.median(times) * 1e3


def run(cases: dict, rounds: int) -> dict[str, list[float]]:
    """Interleaved rounds, so drifting load hits every case alike."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            times[name].append(fn())
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", type=int, default=0, metavar="LAYERS")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from hf_decompose.pair import cache_dir

    root = cache_dir() / "benchmarks"
    family = synthetic_family(root, args.synthetic) if args.synthetic else default_family(1, root)
    vocab = AutoModelForCausalLM.from_pretrained(family["base"]).config.vocab_size
    ids = torch.randint(1, vocab, (N, 16), generator=torch.Generator().manual_seed(0))
    original = AutoModelForCausalLM.from_pretrained(family["finetuned"][0], dtype=torch.float32).eval()
    decomposed = DecomposedModel.from_pretrained(family["artifacts"][0])
    base_bytes = sum(p.numel() * p.element_size() for p in original.parameters())

    def split(mode: str):
        set_parallel(decomposed.set_execution("split"), mode)
        return decomposed

    load_before = [round(x, 2) for x in os.getloadavg()]
    times = run({
        "original_b1": lambda: step_ms(original, ids[:1], args.steps),
        "merged_b1": lambda: step_ms(decomposed.set_execution("merged"), ids[:1], args.steps),
        "split_b1": lambda: step_ms(split("auto"), ids[:1], args.steps),
        "split_serial_b1": lambda: step_ms(split("off"), ids[:1], args.steps),
    }, args.rounds)  # fmt: skip
    del original
    gc.collect()
    decomposed.set_execution("merged")
    multi = MultiDecomposedModel.from_pretrained({f"ft{k}": family["artifacts"][0] for k in range(N)})
    names = [f"ft{k}" for k in range(N)]
    times.update(run({
        "merged_b8": lambda: step_ms(decomposed, ids, args.steps),
        "multi_n8_b8": lambda: step_ms(multi, ids, args.steps, decomposed_names=names),
    }, args.rounds))  # fmt: skip
    times["separate_n8_b8"] = [N * t for t in times["original_b1"]]
    ms = {k: statistics.median(v) for k, v in times.items()}
    art_bytes = Path(family["artifacts"][0], "decomposition.safetensors").stat().st_size
    tok = {k: (N if k.endswith("b8") else 1) * 1e3 / v for k, v in ms.items()}
    bound = tok["merged_b8"] * base_bytes / (base_bytes + N * art_bytes)
    ratios = {
        "merged_vs_original_b1": (ms["merged_b1"] / ms["original_b1"], 1.03, "<="),
        "split_vs_merged_b1": (ms["split_b1"] / ms["merged_b1"], 1.15, "<="),
        "multi_n8_vs_separate": (tok["multi_n8_b8"] / tok["separate_n8_b8"], 2.0, ">="),
        "multi_n8_vs_bound": (tok["multi_n8_b8"] / bound, 0.8, ">="),
    }
    res = {"device": machine(), "threads": args.threads, "synthetic_layers": args.synthetic, "steps": args.steps, "rounds": args.rounds,
           "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()], "ms_per_step": ms, "ms_all": times,
           "tokens_per_s": tok, "base_bytes": base_bytes, "artifact_bytes": art_bytes,
           "bytes_per_step": {"merged": base_bytes, "split": base_bytes + art_bytes, "multi_n8": base_bytes + N * art_bytes},
           "bound_tokens_per_s_n8": bound,
           "targets": {k: {"value": v, "target": t, "met": v <= t if op == "<=" else v >= t} for k, (v, t, op) in ratios.items()}}  # fmt: skip
    out = RESULTS / f"decode_steps{'_synthetic' if args.synthetic else ''}.json"
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res[k] for k in ("load_before", "load_after", "ms_per_step", "tokens_per_s", "bound_tokens_per_s_n8", "targets")}, indent=1))


if __name__ == "__main__":
    main()
