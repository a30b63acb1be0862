"""Decode-step timings against the byte bound, in one process (less exposed to a shared machine than
`inference.py`'s whole generations): each case a prefill of 16 tokens, then greedy decode steps.

The cases take turns one decode step at a time (models built first, each with its own cache), and each
target is the median over steps of that step's ratio: on a shared machine whose speed comes in bursts
(blocks of 8 steps per case, the earlier design, put the split / merged ratio of one artifact anywhere
between 1.19 and 1.64 in one run), both sides of a ratio ran within milliseconds of each other.

* batch 1: the original fine-tune, the decomposed model merged, split (thread pool on / off);
* 8 rows: one merged model; a decomposed model serving 8 fine-tunes by name, rows routed to N = 1, 2, 4, 8 of
  them (row i -> fine-tune i mod N; one model for every N, so that a ~1B family's copies fit in memory); 8
  separate full models run one after another, one row each: 8 x the original's batch-1 step (the models are
  alike and none fits a CPU cache, so this is what eight copies cost, without their memory).

Every case records the bytes a step must read (`_bytes.step_bytes`: the base once plus each active
fine-tune's substructures in the form the kernels read) and the byte bound: merged tokens/s x base
bytes / bytes read. Uses `inference.py`'s synthetic family (``--synthetic LAYERS [--hidden H] [--level L]``;
the output says "synthetic") or the default pair's anneal artifact (``--mode``, ``--target``; built and cached on
first use).

    python benchmarks/decode_steps.py --synthetic 12 [--threads 2]
    python benchmarks/decode_steps.py --synthetic 18 --hidden 2048 --level step1.5 --steps 24   # ~0.9B, ~15 min
    python benchmarks/decode_steps.py --artifact out/demo/anneal --output results/decode_steps_demo.json   # an artifact you have
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
from inference import SYNTHETIC_LEVELS, default_family, synthetic_family  # noqa: E402

from hf_decompose import DecomposedModel, kernels  # noqa: E402
from hf_decompose.parts import set_parallel  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = 8
TENANTS = (1, 2, 4, 8)


class Stepper:
    """Greedy decode steps of `model` after a prefill of `ids`, one per call, on its own cache."""

    @torch.no_grad()
    def __init__(self, model, ids: torch.Tensor, before=None, **kwargs):
        self.model, self.before, self.kwargs = model, before, kwargs
        self._prepare()
        out = model(input_ids=ids, use_cache=True, **kwargs)
        self.key = "cache" if "cache" in out else "past_key_values"  # transformers 5.x's name, or the earlier one
        self.cache, self.token = out[self.key], out.logits[:, -1:].argmax(-1)

    def _prepare(self) -> None:
        if self.before is not None:  # a setting of a model that two cases share (untimed)
            self.before()

    @torch.no_grad()
    def __call__(self) -> float:
        """ms of one decode step."""
        self._prepare()
        t = time.perf_counter()
        out = self.model(input_ids=self.token, use_cache=True, **{self.key: self.cache}, **self.kwargs)
        ms = (time.perf_counter() - t) * 1e3
        self.cache, self.token = out[self.key], out.logits[:, -1:].argmax(-1)
        return ms


def run(cases: dict[str, Stepper], steps: int) -> dict[str, list[float]]:
    """Every case one step in turn, `steps` times, after one untimed turn."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for step in cases.values():
        step()
    for _ in range(steps):
        for name, step in cases.items():
            times[name].append(step())
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", type=int, default=0, metavar="LAYERS")
    parser.add_argument("--mode", default="anneal", help="how the default pair is decomposed")
    parser.add_argument("--target", help="annealing's target for the default pair (tie, the default, or floor)")
    parser.add_argument("--hidden", type=int, default=1024, help="width of the synthetic model")
    parser.add_argument("--level", default="int3g64", choices=SYNTHETIC_LEVELS, help="the synthetic fine-tune's stored layout")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="timed decode steps per case")
    parser.add_argument("--artifact", type=Path, help="an artifact of the default pair's fine-tune to run (a demo's `out/demo/anneal`) "
                        "instead of the one built from --mode and --target; needs --output")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    if args.artifact and (args.synthetic or not args.output):
        parser.error("--artifact runs the default pair's artifact given, written to --output (not with --synthetic)")
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from hf_decompose.pair import cache_dir

    root = cache_dir() / "benchmarks"
    family = synthetic_family(root, args.synthetic, args.hidden, args.level) if args.synthetic else default_family(1, root, args.mode, args.target, args.artifact)
    vocab = AutoModelForCausalLM.from_pretrained(family["base"]).config.vocab_size
    ids = torch.randint(1, vocab, (ROWS, 16), generator=torch.Generator().manual_seed(0))
    original = AutoModelForCausalLM.from_pretrained(family["finetuned"][0], dtype=torch.float32).eval()
    merged = DecomposedModel.from_pretrained(family["artifacts"][0]).set_execution("merged")
    split = DecomposedModel.from_pretrained(family["artifacts"][0]).set_execution("split")
    label = f"synthetic Llama {sum(p.numel() for p in original.parameters()) / 1e9:.2f}B, {args.level}" if args.synthetic else \
        f"default pair, {args.mode} artifact{f' ({args.target} target)' if args.target else ''}" if not args.artifact else \
        f"default pair, the artifact given ({merged.report['stored_fraction']:.2%} of the float32 delta)"
    art_bytes = Path(family["artifacts"][0], "decomposition.safetensors").stat().st_size
    multi = DecomposedModel.from_pretrained({f"ft{k}": family["artifacts"][0] for k in range(max(TENANTS))})  # N = 1, 2, 4 use the first N
    names = {n: [f"ft{i % n}" for i in range(ROWS)] for n in TENANTS}
    load_before = [round(x, 2) for x in os.getloadavg()]
    times = run({  # the cases take turns step by step, so that the machine's bursts hit every ratio alike
        "original_b1": Stepper(original, ids[:1]),
        "merged_b1": Stepper(merged, ids[:1]),
        "split_b1": Stepper(split, ids[:1], before=lambda: set_parallel(split, "auto")),
        "split_serial_b1": Stepper(split, ids[:1], before=lambda: set_parallel(split, "off")),
        "merged_b8": Stepper(merged, ids),
        **{f"multi_n{n}_b8": Stepper(multi, ids, decomposed_names=names[n]) for n in TENANTS},
    }, args.steps)  # fmt: skip
    held = step_bytes(multi)
    read = {"original": step_bytes(original), "merged": step_bytes(merged), "split": step_bytes(split),
            **{f"multi_n{n}": {**held, "parts": {f"ft{k}": held["parts"][f"ft{k}"] for k in range(n)}} for n in TENANTS}}  # fmt: skip
    every = max(TENANTS)  # the model holds every fine-tune: its memory is N = 8's
    memory = {f"multi_n{every}": {"resident_bytes": resident_bytes(multi), "budget_bytes": int(1.1 * (read["original"]["base"] + every * art_bytes))}}
    times["separate_n8_b8"] = [ROWS * t for t in times["original_b1"]]
    ms = {k: statistics.median(v) for k, v in times.items()}
    tok = {k: (ROWS if k.endswith("b8") else 1) * 1e3 / v for k, v in ms.items()}
    base = read["original"]["base"]
    per_step = {k: r["base"] + sum(r["parts"].values()) for k, r in read.items()}
    bound = {"split_b1": tok["merged_b1"] * base / per_step["split"],
             **{f"multi_n{n}_b8": tok["merged_b8"] * base / per_step[f"multi_n{n}"] for n in TENANTS}}  # fmt: skip

    def paired(a: str, b: str) -> float:  # the median over steps of one step's ratio: drift between steps cancels
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    ratios = {
        "merged_vs_original_b1": (paired("merged_b1", "original_b1"), 1.03, "<="),
        "split_vs_merged_b1": (paired("split_b1", "merged_b1"), 1.15, "<="),
        "multi_n8_vs_separate": (paired("separate_n8_b8", "multi_n8_b8"), 2.0, ">="),  # tokens/s ratio
        "multi_n8_vs_bound": (paired("merged_b8", "multi_n8_b8") * per_step["multi_n8"] / base, 0.8, ">="),
        "multi_n8_memory_vs_budget": (memory["multi_n8"]["resident_bytes"] / memory["multi_n8"]["budget_bytes"], 1.0, "<="),
    }
    res = {"model": label, "device": machine(), "cpu_kernel": kernels.available(), "threads": args.threads, "synthetic_layers": args.synthetic, "hidden": args.hidden,
           "steps": args.steps, "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
           "ms_per_step": ms, "ms_all": times, "tokens_per_s": tok, "artifact_file_bytes": art_bytes, "bytes_read_per_step": per_step,
           "bytes_read": read, "bound_tokens_per_s": bound, "memory": memory,
           "targets": {k: {"value": v, "target": t, "met": v <= t if op == "<=" else v >= t} for k, (v, t, op) in ratios.items()}}  # fmt: skip
    case = f"synthetic{args.synthetic}{'' if args.hidden == 1024 else f'x{args.hidden}'}{'' if args.level == 'int3g64' else f'_{args.level}'}" if args.synthetic else f"default_pair_{args.mode}{f'_{args.target}' if args.target else ''}"
    out = args.output or RESULTS / f"decode_steps_{case}.json"
    out.write_text(json.dumps(res, indent=2))
    print(table(res))


def table(res: dict) -> str:
    mib, ms, tok = 2**20, res["ms_per_step"], res["tokens_per_s"]
    kernel = "hf_decompose's CPU kernel" if res.get("cpu_kernel") else "PyTorch's kernels"
    lines = [f"{res['model']}; {res['device']['cpu']}, {res['threads']} threads, {kernel}; load average {res['load_before']} -> {res['load_after']}", "",
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
