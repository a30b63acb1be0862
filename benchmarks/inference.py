"""Inference benchmarks: decode latency of the fine-tune, `merged` and `split`; many fine-tunes over one base.

* latency - greedy decode ms/token ((time of N new tokens - time of 1) / (N - 1), median of
  interleaved repeats) at batch 1 and 8 for the original fine-tuned model, the decomposed model
  `merged`, and `split` (criterion and lossless artifacts);
* tenants - N = 1, 2, 4, 8 fine-tunes of one base, one process per measurement: resident memory
  (RSS growth from loading) and aggregate tokens/s at a total batch of 8 rows (row i -> fine-tune
  i mod N) for a `MultiDecomposedModel`, for N separate full models, and for one merged model.

The default pair is SmolLM2-135M + its Shakespeare fine-tune. ``--variants K`` adds K - 1 fine-tunes
made by recipe variants (other seed, other plays; trained and decomposed once, cached); tenant k
is fine-tune k mod K, each loaded as its own copy (cost does not depend on the values, so K = 1 is
enough for memory and speed; K > 1 costs a fine-tune and a decomposition each). ``--quick`` uses
tiny random models with 8 distinct fine-tunes. Writes benchmarks/results/inference.json (machine,
threads, load average) and prints a markdown table.

    python benchmarks/inference.py [--quick] [--threads 1] [--variants 8]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _bytes import step_bytes as read_bytes  # noqa: E402
from _machine import machine  # noqa: E402

from hf_decompose import DecomposedConfig, DecomposedModel, MultiDecomposedModel, decompose  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "inference.json"
TENANTS = (1, 2, 4, 8)
ROWS = 8  # the total batch of the tenant benchmark
TARGETS = {"merged_vs_original": 1.03, "split_vs_merged_b1": 1.15, "memory_n8_vs_budget": 1.0, "tokens_n8_vs_merged": 0.7,
           "tokens_n8_vs_separate": 2.0, "tokens_n8_vs_bound": 0.8}


# -- the models --------------------------------------------------------------------------------
def default_family(n: int, root: Path, mode: str = "criterion", target: str | None = None, artifact: Path | None = None) -> dict:
    """The default pair plus n - 1 recipe variants, decomposed (`mode`, ``"anneal"`` for the anneal artifact, to
    annealing's `target` when given; lossless for the first too); `artifact`: the default pair's, as given."""
    from transformers import AutoTokenizer

    from hf_decompose.pair import TRAIN_PLAYS, FinetuneRecipe, prepare_default_pair

    pair = prepare_default_pair()
    tuned = [pair.finetuned]
    for k in range(1, n):
        plays = [TRAIN_PLAYS[(2 * k + i) % len(TRAIN_PLAYS)] for i in range(2)]
        recipe = FinetuneRecipe(name=f"smollm2-135m-shakespeare-v{k}", seed=k, train_texts=plays)
        tuned.append(prepare_default_pair(recipe=recipe).finetuned)
    tokenizer = AutoTokenizer.from_pretrained(pair.finetuned)
    prompts = [tokenizer(p)["input_ids"] for p in pair.eval_prompts[:ROWS]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return _decomposed(pair.base, tuned, root, prompts, pad, mode, target, artifact)


def quick_family(n: int, root: Path) -> dict:
    """Tiny random Llama base and n fine-tunes of it (noise + a rank-2 update + a shift of every vector)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tuned = []
    for k in range(n):
        model = LlamaForCausalLM.from_pretrained(root / "base")
        gen = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
                if p.dim() == 2:
                    p.add_(torch.randn(p.shape[0], 2, generator=gen) @ torch.randn(2, p.shape[1], generator=gen) * 0.02)
                else:
                    p.add_(0.02)
        model.save_pretrained(root / f"ft{k}")
        tuned.append(root / f"ft{k}")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 512, (int(torch.randint(12, 24, (1,), generator=gen)),), generator=gen).tolist() for _ in range(ROWS)]
    return _decomposed(root / "base", tuned, root, prompts, pad=0)


SYNTHETIC_LEVELS = {  # name: (rank of the factors, quantize's arguments for the residual's codes)
    "int3g64": (16, {"bits": 3, "group": 64}),  # 3-bit group-64 codes: annealing's layout when the benchmark was written
    "step1.5": (2, {"bits": 4, "step": 1.5}),  # one scale per row, 1.5 x its RMS: the default pair's most common level today
}


def synthetic_family(root: Path, layers: int, hidden: int = 1024, level: str = "int3g64") -> dict:
    """A random Llama (`hidden` wide, `layers` layers, 32k vocabulary, tied head: ~0.17B at 1024 x 12,
    ~0.9B at 2048 x 18) and a fine-tune stored the way annealing stores one: low-rank factors plus a low-bit
    residual on every matrix (`SYNTHETIC_LEVELS`). Built through the public API (`TensorDelta`, `quantize`,
    `artifact.save`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_decompose import artifact
    from hf_decompose.quantize import quantize
    from hf_decompose.parts import LowRankPart, QuantPart, TensorDelta

    rank, codes_args = SYNTHETIC_LEVELS[level]
    root = root / (f"synthetic-{layers}" if hidden == 1024 else f"synthetic-{hidden}x{layers}")
    tuned = root / ("ft0" if level == "int3g64" else f"ft0-{level}")
    lowbit, lossless = root / ("ft0-lowrank-int3g64" if level == "int3g64" else f"{tuned.name}-decomposed"), root / f"{tuned.name}-lossless"
    heads, ffn = hidden // 64, 256 * round(2.75 * hidden / 256)
    if not (lowbit / "decomposed_config.json").exists():
        if not (root / "base" / "config.json").exists():
            config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                                 num_key_value_heads=heads // 4, max_position_embeddings=1024, tie_word_embeddings=True)  # fmt: skip
            torch.manual_seed(0)
            LlamaForCausalLM(config).save_pretrained(root / "base")
        model = LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
        gen, deltas = torch.Generator().manual_seed(1), {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    u, v = torch.randn(p.shape[0], rank, generator=gen) * 0.01, torch.randn(rank, p.shape[1], generator=gen) * 0.01
                    codes, scales = quantize(torch.randn(p.shape, generator=gen) * 1e-3, **codes_args)
                    deltas[name] = TensorDelta(name, tuple(p.shape), parts=[LowRankPart(u, v), QuantPart.from_packed(codes, scales, tuple(p.shape))])
                    p.copy_(deltas[name].merge(p))
        model.save_pretrained(tuned)
        del model
        exact = decompose(tuned, root / "base", DecomposedConfig(mode="lossless"), progress=False)
        exact.save_pretrained(lossless, overwrite=True)
        d = exact.decomposition
        artifact.save(lowbit, {**exact.deltas, **deltas}, d.index, d.report, d.artifact_dir)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 32000, (int(torch.randint(12, 24, (1,), generator=gen)),), generator=gen).tolist() for _ in range(ROWS)]
    return {"base": str(root / "base"), "finetuned": [str(tuned)], "artifacts": [str(lowbit)], "lossless": str(lossless),
            "prompts": prompts, "pad": 0}  # fmt: skip


def _decomposed(base: Path, tuned: list[Path], root: Path, prompts: list[list[int]], pad: int, mode: str = "criterion",
                target: str | None = None, artifact: Path | None = None) -> dict:
    artifacts = [] if artifact is None else [str(artifact)]
    config = DecomposedConfig(mode=mode, annealing={"target": target} if target else {})
    # the whole configuration, defaults filled in, names a cached artifact: a default changed since is not served stale
    settings = hashlib.sha256(json.dumps(config.to_dict() | {"annealing": config.annealing_options()}, sort_keys=True, default=str).encode()).hexdigest()[:8]
    for ft in tuned[len(artifacts) :]:
        out = root / f"{Path(ft).name}-{mode}{f'-{target}' if target else ''}-{settings}"
        if not (out / "decomposed_config.json").exists():
            decompose(ft, base, config, progress=False).save_pretrained(out, overwrite=True)
        artifacts.append(str(out))
    lossless = root / f"{Path(tuned[0]).name}-lossless"
    if not (lossless / "decomposed_config.json").exists():
        decompose(tuned[0], base, DecomposedConfig(mode="lossless"), progress=False).save_pretrained(lossless, overwrite=True)
    return {"base": str(base), "finetuned": [str(t) for t in tuned], "artifacts": artifacts, "lossless": str(lossless),
            "prompts": prompts, "pad": pad}  # fmt: skip


def batch(family: dict, rows: list[int]) -> dict[str, torch.Tensor]:
    """Left-padded input_ids / attention_mask of the given prompt rows."""
    seqs = [family["prompts"][i] for i in rows]
    width = max(map(len, seqs))
    ids = torch.tensor([[family["pad"]] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def generate(model, inputs: dict, new_tokens: int, pad: int, **kwargs) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                          temperature=None, top_p=None, top_k=None, **kwargs)  # fmt: skip


def _parallel(model, mode: str):
    from hf_decompose.parts import set_parallel

    set_parallel(model, mode)
    return model


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# -- latency -----------------------------------------------------------------------------------
def latency(family: dict, new_tokens: int, repeats: int) -> dict:
    """Decode ms/token per model and batch size, plus whether greedy tokens agree with the original."""
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(family["finetuned"][0], dtype=torch.float32).eval()
    criterion = DecomposedModel.from_pretrained(family["artifacts"][0])
    lossless = DecomposedModel.from_pretrained(family["lossless"])
    variants = {
        "original": lambda: original,
        "merged": lambda: criterion.set_execution("merged"),
        "split": lambda: _parallel(criterion.set_execution("split"), "auto"),  # a thread pool for large parts
        "split_serial": lambda: _parallel(criterion.set_execution("split"), "off"),
        "split_lossless": lambda: lossless.set_execution("split"),
    }
    out: dict = {}
    for name, get in variants.items():  # bytes a decode step reads: the base, plus the substructures when split
        read = read_bytes(get())
        out[name] = {"bytes_per_step": read["base"] + sum(read["parts"].values())}
    for rows in (1, ROWS):
        inputs, pad = batch(family, list(range(rows))), family["pad"]
        reference = generate(original, inputs, new_tokens, pad)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for name, get in variants.items():  # warm up (merged copies are built on first use)
            same = torch.equal(generate(get(), inputs, new_tokens, pad), reference)
            out[name][f"b{rows}_tokens_equal_original"] = same
        for _ in range(repeats):  # interleaved, so drifting load hits every variant alike
            for name, get in variants.items():
                model = get()
                full = _seconds(lambda: generate(model, inputs, new_tokens, pad))
                first = _seconds(lambda: generate(model, inputs, 1, pad))
                times[name].append((full - first) / (new_tokens - 1) * 1e3)
        for name, ms in times.items():
            out[name][f"b{rows}_ms_per_token"] = statistics.median(ms)
            out[name][f"b{rows}_ms_all"] = ms
    return out


# -- many fine-tunes (one process per measurement) ---------------------------------------------
def tenant(family: dict, key: str, k: int) -> str:
    """Fine-tune (or artifact) of tenant k: the fine-tunes in turn."""
    return family[key][k % len(family[key])]


def tenants(family: dict, new_tokens: int, repeats: int, threads: int) -> dict:
    out: dict = {"variants": len(family["artifacts"]),
                 "artifact_bytes": [Path(tenant(family, "artifacts", k), "decomposition.safetensors").stat().st_size for k in range(max(TENANTS))],
                 "base_bytes": sum(p.stat().st_size for p in Path(family["base"]).glob("*.safetensors"))}  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(family, f)
    try:
        out["merged_single"] = _worker("merged", f.name, 1, new_tokens, repeats, threads)
        for n in TENANTS:
            out[f"n{n}"] = {kind: _worker(kind, f.name, n, new_tokens, repeats, threads) for kind in ("multi", "separate")}
    finally:
        os.unlink(f.name)
    return out


def _worker(kind: str, family_file: str, n: int, new_tokens: int, repeats: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--family", family_file, "--n", str(n),
           "--new-tokens", str(new_tokens), "--repeats", str(repeats), "--threads", str(threads)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} n={n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker(kind: str, family: dict, n: int, new_tokens: int, repeats: int) -> dict:
    """Load `kind` for n fine-tunes, then time `repeats` generations of the 8-row batch."""
    from transformers import AutoModelForCausalLM

    pad, rows = family["pad"], list(range(ROWS))
    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss
    if kind == "merged":
        model = DecomposedModel.from_pretrained(family["artifacts"][0]).set_execution("merged")
        models = [model]
        run = lambda tokens: generate(model, batch(family, rows), tokens, pad)  # noqa: E731
    elif kind == "multi":
        model = MultiDecomposedModel.from_pretrained({f"ft{k}": tenant(family, "artifacts", k) for k in range(n)})
        models = [model]
        names = [f"ft{i % n}" for i in rows]
        run = lambda tokens: generate(model, batch(family, rows), tokens, pad, decomposed_names=names)  # noqa: E731
    else:
        models = [AutoModelForCausalLM.from_pretrained(tenant(family, "finetuned", k), dtype=torch.float32).eval() for k in range(n)]
        run = lambda tokens: [generate(m, batch(family, rows[k::n]), tokens, pad) for k, m in enumerate(models)]  # noqa: E731
    run(2)  # warm-up; a merged model builds its merged copies here
    gc.collect()
    resident = process.memory_info().rss - before
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for m in models for t in [*m.parameters(), *m.buffers()]}
    seconds = [_seconds(lambda: run(new_tokens)) for _ in range(repeats)]
    return {"resident_bytes": resident, "tensor_bytes": sum(storages.values()), "seconds": seconds,
            "tokens_per_s": ROWS * new_tokens / statistics.median(seconds)}  # fmt: skip


# -- report ------------------------------------------------------------------------------------
def targets(res: dict) -> dict:
    lat, ten = res["latency"], res["tenants"]
    out = {
        "merged_vs_original": lat["merged"]["b1_ms_per_token"] / lat["original"]["b1_ms_per_token"],
        "split_vs_merged_b1": lat["split"]["b1_ms_per_token"] / lat["merged"]["b1_ms_per_token"],
    }
    budget = 1.1 * (ten["base_bytes"] + sum(ten["artifact_bytes"][:8]))
    out["memory_n8_vs_budget"] = ten["n8"]["multi"]["resident_bytes"] / budget
    out["tokens_n8_vs_merged"] = ten["n8"]["multi"]["tokens_per_s"] / ten["merged_single"]["tokens_per_s"]
    out["tokens_n8_vs_separate"] = ten["n8"]["multi"]["tokens_per_s"] / ten["n8"]["separate"]["tokens_per_s"]
    out["tokens_n8_vs_bound"] = ten["n8"]["multi"]["tokens_per_s"] / bound_tokens(ten, 8)
    return {k: {"value": v, "target": TARGETS[k], "met": v >= TARGETS[k] if k.startswith("tokens") else v <= TARGETS[k]} for k, v in out.items()}


def step_bytes(ten: dict, n: int) -> int:
    """Bytes a decode step must read with n fine-tunes active: the base once plus each one's substructures."""
    return ten["base_bytes"] + sum(ten["artifact_bytes"][:n])


def bound_tokens(ten: dict, n: int) -> float:
    """The byte bound on tokens/s with n fine-tunes: one merged model's tokens/s scaled by the bytes read."""
    return ten["merged_single"]["tokens_per_s"] * ten["base_bytes"] / step_bytes(ten, n)


def markdown(res: dict) -> str:
    lat, ten = res["latency"], res["tenants"]
    model = "quick: tiny random models" if res["quick"] else (f"synthetic random Llama, {res['synthetic_layers']} layers x {res.get('hidden', 1024)}, "
             "low-rank + 3-bit fine-tune" if res["synthetic_layers"] else "default pair")  # fmt: skip
    lines = [f"Model: {model}. Device: {res['device_name']}; torch threads: {res['threads']}; "
             f"load average before/after: {res['load_before']} / {res['load_after']}", "",
             "| model | decode ms/token, batch 1 | batch 8 | MiB read per step | byte bound ms/token, batch 1 | greedy tokens = original (b1 / b8) |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, r in lat.items():
        same = f"{r['b1_tokens_equal_original']} / {r['b8_tokens_equal_original']}"
        bound = lat["merged"]["b1_ms_per_token"] * r["bytes_per_step"] / lat["merged"]["bytes_per_step"]
        lines.append(f"| {name} | {r['b1_ms_per_token']:.2f} | {r['b8_ms_per_token']:.2f} | {r['bytes_per_step'] / 2**20:.0f} | {bound:.2f} | {same} |")
    mib, ten = 2**20, res["tenants"]
    lines += ["", f"Tenants: {ten['variants']} distinct fine-tune(s), tenant k is fine-tune k mod {ten['variants']}, each loaded as its own copy; "
              f"{res['tenant_tokens']} new tokens per generation, {ROWS} rows in all (row i -> tenant i mod N).",
              "", "| fine-tunes N | multi resident MiB | N full models MiB | base + artifacts MiB (bytes per step) | multi tok/s | N full models tok/s "
              "| one merged model tok/s | byte bound tok/s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for n in TENANTS:
        m, s = ten[f"n{n}"]["multi"], ten[f"n{n}"]["separate"]
        lines.append(f"| {n} | {m['resident_bytes'] / mib:.0f} | {s['resident_bytes'] / mib:.0f} | {step_bytes(ten, n) / mib:.0f} | "
                     f"{m['tokens_per_s']:.1f} | {s['tokens_per_s']:.1f} | {ten['merged_single']['tokens_per_s']:.1f} | {bound_tokens(ten, n):.1f} |")  # fmt: skip
    lines += ["", "| target | value | limit | met |", "| --- | --- | --- | --- |"]
    for k, t in res["targets"].items():
        lines.append(f"| {k} | {t['value']:.3f} | {'>=' if k.startswith('tokens') else '<='} {t['target']} | {t['met']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random models instead of the default pair")
    parser.add_argument("--synthetic", type=int, default=0, metavar="LAYERS",
                        help="a random Llama of this many layers with a low-rank + 3-bit fine-tune instead of the default pair")
    parser.add_argument("--mode", default="criterion", help="how the default pair is decomposed (anneal: the anneal artifact)")
    parser.add_argument("--hidden", type=int, default=1024, help="width of the synthetic model")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tenant-tokens", type=int, default=32, help="new tokens per generation in the tenant benchmark")
    parser.add_argument("--variants", type=int, default=1, help="distinct fine-tunes of the default pair (tenants cycle through them)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--family", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(Path(args.family).read_text()), args.n, args.new_tokens, args.repeats)))
        return
    with tempfile.TemporaryDirectory(prefix="hf_decompose_bench_") as tmp:
        from hf_decompose.pair import cache_dir

        if args.quick:
            family = quick_family(max(TENANTS), Path(tmp))
        elif args.synthetic:
            family = synthetic_family(cache_dir() / "benchmarks", args.synthetic, args.hidden)
        else:
            (cache_dir() / "benchmarks").mkdir(parents=True, exist_ok=True)
            family = default_family(args.variants, cache_dir() / "benchmarks", args.mode)
        res = run(family, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(res, indent=2))
    print(markdown(res))


def run(family: dict, args: argparse.Namespace) -> dict:
    info = machine()
    res = {"device": info, "device_name": info["gpu"] or f"CPU: {info['cpu']} ({info['cores']} cores)",
           "threads": torch.get_num_threads(), "quick": args.quick, "synthetic_layers": args.synthetic, "hidden": args.hidden, "new_tokens": args.new_tokens, "tenant_tokens": args.tenant_tokens,
           "repeats": args.repeats,
           "load_before": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip
    res["latency"] = latency(family, args.new_tokens, args.repeats)
    res["tenants"] = ten = tenants(family, args.tenant_tokens, args.repeats, torch.get_num_threads())
    for n in TENANTS:
        ten[f"n{n}"].update(bytes_per_step=step_bytes(ten, n), bound_tokens_per_s=bound_tokens(ten, n))
    res["load_after"] = [round(x, 2) for x in os.getloadavg()]
    res["targets"] = targets(res)
    return res


if __name__ == "__main__":
    main()
