"""Decode-step timings against the byte bound, in one process (less exposed to a shared machine than
`inference.py`'s whole generations): a prefill of 16 tokens, then the median time of one greedy
decode step, interleaved rounds.

All cases run in one interleaved window (models built first), and each target is the median over rounds of
that round's ratio, so a machine that drifts hits both sides of a ratio alike.

* batch 1: the original fine-tune, the decomposed model merged, split (thread pool on / off);
* 8 rows: one merged model; a decomposed model serving N = 1, 2, 4, 8 fine-tunes by name (row i ->
  fine-tune i mod N); 8 separate full models run one after another, one row each: 8 x the original's
  batch-1 step (the models are alike and none fits a CPU cache, so this is what eight copies cost,
  without their memory).

Every case records the bytes a step must read (`_bytes.step_bytes`: the base once plus each active
fine-tune's substructures in the form the kernels read) and the byte bound: merged tokens/s x base
bytes / bytes read. Uses `inference.py`'s synthetic family (``--synthetic LAYERS [--hidden H]``; the
output says "synthetic") or the default pair's anneal artifact (``--mode``, ``--target``; built and cached on first use).

    python benchmarks/decode_steps.py --synthetic 12 [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _bytes import resident_bytes, step_bytes  # noqa: E402
from _machine import machine  # noqa: E402
from inference import default_family, synthetic_family  # noqa: E402

from hf_decompose import DecomposedModel  # noqa: E402
from hf_decompose.parts import set_parallel  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = 8
TENANTS = (1, 2, 4, 8)


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
    """Interleaved rounds after a warm-up one, so drifting load hits every case alike."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()
    for _ in range(rounds):
        for name, fn in cases.items():
            times[name].append(fn())
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", type=int, default=0, metavar="LAYERS")
    parser.add_argument("--mode", default="anneal", help="how the default pair is decomposed")
    parser.add_argument("--target", help="annealing's target for the default pair (tie, the default, or floor)")
    parser.add_argument("--hidden", type=int, default=1024, help="width of the synthetic model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from hf_decompose.pair import cache_dir

    root = cache_dir() / "benchmarks"
    family = synthetic_family(root, args.synthetic, args.hidden) if args.synthetic else default_family(1, root, args.mode, args.target)
    vocab = AutoModelForCausalLM.from_pretrained(family["base"]).config.vocab_size
    ids = torch.randint(1, vocab, (ROWS, 16), generator=torch.Generator().manual_seed(0))
    original = AutoModelForCausalLM.from_pretrained(family["finetuned"][0], dtype=torch.float32).eval()
    decomposed = DecomposedModel.from_pretrained(family["artifacts"][0])
    label = f"synthetic Llama {sum(p.numel() for p in original.parameters()) / 1e9:.2f}B" if args.synthetic else \
        f"default pair, {args.mode} artifact{f' ({args.target} target)' if args.target else ''}"

    def split(mode: str):
        set_parallel(decomposed.set_execution("split"), mode)
        return decomposed

    art_bytes = Path(family["artifacts"][0], "decomposition.safetensors").stat().st_size
    multis = {n: DecomposedModel.from_pretrained({f"ft{k}": family["artifacts"][0] for k in range(n)}) for n in TENANTS}
    names = {n: [f"ft{i % n}" for i in range(ROWS)] for n in TENANTS}
    load_before = [round(x, 2) for x in os.getloadavg()]
    times = run({  # one interleaved window for every case, so that the machine's drift hits every ratio alike
        "original_b1": lambda: step_ms(original, ids[:1], args.steps),
        "merged_b1": lambda: step_ms(decomposed.set_execution("merged"), ids[:1], args.steps),
        "split_b1": lambda: step_ms(split("auto"), ids[:1], args.steps),
        "split_serial_b1": lambda: step_ms(split("off"), ids[:1], args.steps),
        "merged_b8": lambda: step_ms(decomposed.set_execution("merged"), ids, args.steps),
        **{f"multi_n{n}_b8": (lambda n=n: step_ms(multis[n], ids, args.steps, decomposed_names=names[n])) for n in TENANTS},
    }, args.rounds)  # fmt: skip
    read = {"original": step_bytes(original), "merged": step_bytes(decomposed.set_execution("merged")), "split": step_bytes(split("auto")),
            **{f"multi_n{n}": step_bytes(multis[n]) for n in TENANTS}}  # fmt: skip
    memory = {f"multi_n{n}": {"resident_bytes": resident_bytes(multis[n]), "budget_bytes": int(1.1 * (read["original"]["base"] + n * art_bytes))}
              for n in TENANTS}  # fmt: skip
    times["separate_n8_b8"] = [ROWS * t for t in times["original_b1"]]
    ms = {k: statistics.median(v) for k, v in times.items()}
    tok = {k: (ROWS if k.endswith("b8") else 1) * 1e3 / v for k, v in ms.items()}
    base = read["original"]["base"]
    per_step = {k: r["base"] + sum(r["parts"].values()) for k, r in read.items()}
    bound = {"split_b1": tok["merged_b1"] * base / per_step["split"],
             **{f"multi_n{n}_b8": tok["merged_b8"] * base / per_step[f"multi_n{n}"] for n in TENANTS}}  # fmt: skip

    def paired(a: str, b: str) -> float:  # the median over rounds of one round's ratio: drift between rounds cancels
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    ratios = {
        "merged_vs_original_b1": (paired("merged_b1", "original_b1"), 1.03, "<="),
        "split_vs_merged_b1": (paired("split_b1", "merged_b1"), 1.15, "<="),
        "multi_n8_vs_separate": (paired("separate_n8_b8", "multi_n8_b8"), 2.0, ">="),  # tokens/s ratio
        "multi_n8_vs_bound": (paired("merged_b8", "multi_n8_b8") * per_step["multi_n8"] / base, 0.8, ">="),
        "multi_n8_memory_vs_budget": (memory["multi_n8"]["resident_bytes"] / memory["multi_n8"]["budget_bytes"], 1.0, "<="),
    }
    res = {"model": label, "device": machine(), "threads": args.threads, "synthetic_layers": args.synthetic, "hidden": args.hidden,
           "steps": args.steps, "rounds": args.rounds, "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
           "ms_per_step": ms, "ms_all": times, "tokens_per_s": tok, "artifact_file_bytes": art_bytes, "bytes_read_per_step": per_step,
           "bytes_read": read, "bound_tokens_per_s": bound, "memory": memory,
           "targets": {k: {"value": v, "target": t, "met": v <= t if op == "<=" else v >= t} for k, (v, t, op) in ratios.items()}}  # fmt: skip
    case = f"synthetic{args.synthetic}" if args.synthetic else f"default_pair_{args.mode}{f'_{args.target}' if args.target else ''}"
    out = args.output or RESULTS / f"decode_steps_{case}.json"
    out.write_text(json.dumps(res, indent=2))
    print(table(res))


def table(res: dict) -> str:
    mib, ms, tok = 2**20, res["ms_per_step"], res["tokens_per_s"]
    lines = [f"{res['model']}; {res['device']['cpu']}, {res['threads']} threads; load average {res['load_before']} -> {res['load_after']}", "",
             "| case | ms/step | tokens/s | MiB read/step | byte bound tok/s |", "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for case in ms:
        key = case.rsplit("_b", 1)[0].replace("_serial", "")
        read = res["bytes_read_per_step"].get(key)
        bound = res["bound_tokens_per_s"].get(case)
        lines.append(f"| {case} | {ms[case]:.1f} | {tok[case]:.1f} | {'' if read is None else f'{read / mib:.0f}'} | "
                     f"{'' if bound is None else f'{bound:.1f}'} |")  # fmt: skip
    lines += ["", "| target | value | limit | met |", "| --- | ---: | ---: | --- |"]
    for k, t in res["targets"].items():
        lines.append(f"| {k} | {t['value']:.3f} | {t['target']} | {t['met']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
