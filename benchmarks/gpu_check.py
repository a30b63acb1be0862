"""GPU check: correctness and timings of hf_decompose on CUDA, in one unattended run of a few minutes.

    python benchmarks/gpu_check.py [--budget-s 540] [--timings plain,lowbit] [--output benchmarks/results/gpu_check.json]

Run from a checkout on a machine with a CUDA GPU; needs only torch, transformers and accelerate
(packages hf_decompose imports but nothing here runs, such as scipy, are stubbed when missing). It
builds its own random Llama pairs with substructures of every kind (dense vectors, low-rank
factors, dense blocks, sparse entries) saved as artifacts, and checks on ``cuda``:

* ``merged``: logits bit-identical to the dense fine-tune; ``split``: within 1e-4 and identical
  greedy tokens, with the dynamic and the static cache (``cache_implementation="static"``);
* several fine-tunes over one base: a mixed batch generates, row by row, what each fine-tune
  (and the base) generates alone;
* decomposition on the device (``DecomposedConfig(device=...)``) against CPU, lossless and criterion, of the tiny
  pair (noise-free structured deltas, as a merged LoRA in float32) and of one with dense noise in every delta: the
  same stored tensors and support (lossless bit for bit), logits within 1e-3, and the criterion's per-tensor
  statistics that differ; annealing (its guard's forward passes on the device) of the tiny pair with a character
  tokenizer for the built-in calibration prompts: the same level for every layer, logits within 1e-2, both timed;
* device maps: substructures offloaded to CPU and to disk, ``"auto"`` under a small
  ``max_memory``, and with two or more GPUs ``"balanced"`` with the substructures spread: identical
  greedy tokens.

Timings (a ~0.15B-parameter model): decode ms/token at batch 1 and 8 (128 new tokens) of the dense
fine-tune, merged, split and split with the static cache, with the bytes each step reads and the byte bound;
N = 1, 2, 4, 8 fine-tunes: GPU memory, tokens/s and bytes per step of one model serving them by name against
N dense models and one merged model (8 rows in all), the byte bound, and N = 8 with the static cache; once
with low-rank + sparse / block deltas, once with anneal-style low-rank + 3-bit deltas (``*_lowbit``).
Results, the device named, go to the output file after every section; sections that would overrun
the time budget are skipped and say so. Exit status: 0 every check passed, 1 a check failed,
3 no CUDA device (nothing run). ``--device cpu`` runs the same on CPU with tiny sizes (a dry run).
"""

from __future__ import annotations

import argparse
import gc
import importlib.abc
import importlib.machinery
import importlib.util
import json
import platform
import statistics
import sys
import shutil
import tempfile
import time
import traceback
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "gpu_check.json"
STUBBED = ("scipy", "matplotlib")  # imported by hf_decompose, used only by code this script never runs


class _Missing:
    """Stands in for anything of a package that is not installed; fails only when used."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> _Missing:
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is not installed on this machine")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in STUBBED and importlib.machinery.PathFinder.find_spec(name.split(".")[0]) is None:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda attr: _Missing(f"{spec.name}.{attr}")
        return module

    def exec_module(self, module):
        pass


sys.meta_path.append(_StubFinder())
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _bytes import step_bytes  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from hf_decompose import DecomposedConfig, DecomposedModel, MultiDecomposedModel, artifact, decompose_to_disk  # noqa: E402
from hf_decompose.checkpoints import CheckpointReader, sha256_files  # noqa: E402
from hf_decompose.placement import substructures  # noqa: E402
from hf_decompose.quantize import quantize  # noqa: E402
from hf_decompose.parts import BlockPart, DensePart, LowRankPart, QuantPart, SparsePart, TensorDelta  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip
# timing families: label, matrix kinds (low-rank + sparse / block, no dense deltas; anneal-style low-rank + 3-bit)
TIMING_FAMILIES = {"plain": ("", (0, 1)), "lowbit": ("_lowbit", (3,))}
MID = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
           num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)  # fmt: skip


# -- a base and fine-tunes with known substructures ---------------------------------------------
def make_delta(name: str, base: torch.Tensor, gen: torch.Generator, kind: int, scale: float, noise: float = 0.0) -> TensorDelta:
    """A delta of one tensor: vectors dense; matrices low-rank + sparse (kind 0), block + low-rank (1), dense (2)
    or, as annealing stores them, low-rank + a 3-bit group-64 residual (3); with `noise`, plus dense N(0, noise^2)
    in every structured matrix (what training leaves everywhere)."""
    if base.dim() == 1:
        return TensorDelta(name, tuple(base.shape), parts=[DensePart(torch.randn(base.shape, generator=gen) * scale)])
    out, inp = base.shape
    if kind == 2:
        return TensorDelta(name, (out, inp), parts=[DensePart(torch.randn(out, inp, generator=gen) * scale / 4)])
    rank = 4
    parts = [LowRankPart(torch.randn(out, rank, generator=gen) * scale, torch.randn(rank, inp, generator=gen) / inp**0.5)]
    if kind == 3:
        parts.append(QuantPart.from_packed(*quantize(torch.randn(out, inp, generator=gen) * scale / 8, 3, 64), (out, inp)))
    elif kind == 0:
        flat = torch.randperm(out * inp, generator=gen)[: max(1, out * inp // 100)].sort().values
        values = torch.randn(flat.numel(), generator=gen) * scale
        parts.append(SparsePart(flat // inp, flat % inp, values, (out, inp), torch.zeros(flat.numel(), dtype=torch.int32)))
    else:
        rows = torch.randperm(out, generator=gen)[: max(1, out // 8)].sort().values
        cols = torch.randperm(inp, generator=gen)[: max(1, inp // 4)].sort().values
        parts.append(BlockPart(rows, cols, torch.randn(rows.numel(), cols.numel(), generator=gen) * scale, (out, inp)))
    if noise:
        parts.append(DensePart(torch.randn(out, inp, generator=gen) * noise))
    return TensorDelta(name, (out, inp), parts=parts)


def build_family(root: Path, config: dict, tenants: int, dense_copies: int, kinds: tuple[int, ...], noise: float = 0.0) -> dict:
    """Random base, `tenants` artifacts of known deltas (matrix kinds cycling through `kinds`, `make_delta`'s `noise`),
    and the dense fine-tunes of the first `dense_copies`."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**config)).eval()
    base.save_pretrained(root / "base")
    sha = sha256_files(CheckpointReader(root / "base").files)
    params = dict(base.named_parameters())
    family = {"base": root / "base", "artifacts": [], "dense": [], "vocab": config["vocab_size"]}
    for k in range(tenants):
        gen = torch.Generator().manual_seed(100 + k)
        deltas = {n: make_delta(n, p.detach(), gen, kinds[i % len(kinds)], 0.02, noise) for i, (n, p) in enumerate(params.items())}
        index = {"config": DecomposedConfig(mode="criterion").to_dict(), "finetuned_model": {"id": f"ft{k}", "revision": None},
                 "base_model": {"id": str(root / "base"), "revision": None, "sha256": sha}}  # fmt: skip
        family["artifacts"].append(artifact.save(root / f"art{k}", deltas, index, {}, root / "base"))
        if k < dense_copies:
            tuned = LlamaForCausalLM.from_pretrained(root / "base").eval()
            with torch.no_grad():
                for n, p in tuned.named_parameters():
                    p.copy_(deltas[n].merge(params[n].detach()))
            tuned.save_pretrained(root / f"ft{k}")
            family["dense"].append(root / f"ft{k}")
    return family


# -- helpers ------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, ids: torch.Tensor, new_tokens: int, **kwargs) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0, **kwargs)  # fmt: skip


@torch.no_grad()
def logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(input_ids=ids, **kwargs).logits.float()


def prompts(rows: int, vocab: int, device: str, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (rows, 12), generator=torch.Generator().manual_seed(seed)).to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def dense(path: Path, device: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(device)


# -- checks -------------------------------------------------------------------------------------
def check_merged_split(fam: dict, device: str) -> dict:
    ids = prompts(3, TINY["vocab_size"], device)
    reference = dense(fam["dense"][0], device)
    model = DecomposedModel.from_pretrained(fam["artifacts"][0], base_model=fam["base"]).to(device)
    merged = logits(model, ids)
    tokens = generate(model, ids, 16)
    out = {"merged_bit_identical": torch.equal(merged, logits(reference, ids)),
           "merged_tokens_equal_dense": torch.equal(tokens, generate(reference, ids, 16))}
    model.set_execution("split")
    split = logits(model, ids)
    out["split_max_abs_diff"] = (split - merged).abs().max().item()
    out["split_close"] = bool(torch.allclose(split, merged, rtol=1e-4, atol=1e-4))
    out["split_tokens_equal"] = torch.equal(generate(model, ids, 16), tokens)
    out["split_static_cache_tokens_equal"] = torch.equal(generate(model, ids, 16, cache_implementation="static"), tokens)
    out["ok"] = out["merged_bit_identical"] and out["merged_tokens_equal_dense"] and all(
        out[k] for k in ("split_close", "split_tokens_equal", "split_static_cache_tokens_equal"))
    return out


def check_multi(fam: dict, device: str) -> dict:
    rows = ["t0", "t1", None, "t2", "t0"]
    ids = prompts(len(rows), TINY["vocab_size"], device, seed=1)
    multi = MultiDecomposedModel.from_pretrained({f"t{k}": a for k, a in enumerate(fam["artifacts"][:3])}, base_model=fam["base"]).to(device)
    mixed = generate(multi, ids, 16, decomposed_names=rows)
    base = dense(fam["base"], device)
    alone = {f"t{k}": DecomposedModel.from_pretrained(a, base_model=fam["base"], execution="split").to(device)
             for k, a in enumerate(fam["artifacts"][:3])}
    equal = [torch.equal(mixed[i], generate(alone[r] if r else base, ids[i : i + 1], 16)[0]) for i, r in enumerate(rows)]
    return {"rows": rows, "rows_equal_alone": equal, "ok": all(equal)}


def check_decompose_devices(fam: dict, device: str, tmp: Path) -> dict:
    """Decompose the first fine-tune on `device` and on CPU: same tensors and support, logits within tolerance."""
    from safetensors.torch import load_file

    ids = prompts(3, TINY["vocab_size"], device, seed=4)
    out, ok = {}, True
    for mode in ("lossless", "criterion"):
        arts = {d: decompose_to_disk(fam["dense"][0], fam["base"], DecomposedConfig(mode=mode, device=d), output_dir=tmp / f"on_{d}_{mode}",
                                     progress=False) for d in dict.fromkeys((device, "cpu"))}  # fmt: skip
        on, cpu = (load_file(arts[d] / artifact.WEIGHTS) for d in (device, "cpu"))
        same = on.keys() == cpu.keys() and all(on[k].shape == cpu[k].shape for k in on)
        floats = [k for k in on if on[k].is_floating_point()] if same else []
        on_logits, cpu_logits = (logits(DecomposedModel.from_pretrained(arts[d], base_model=fam["base"]).to(device), ids) for d in (device, "cpu"))
        out[mode] = {
            "same_tensors": same,
            "only_on_device": sorted(on.keys() - cpu.keys())[:8], "only_on_cpu": sorted(cpu.keys() - on.keys())[:8],
            "shapes_differ": [f"{k}: {tuple(on[k].shape)} vs {tuple(cpu[k].shape)}" for k in sorted(on.keys() & cpu.keys()) if on[k].shape != cpu[k].shape][:8],
            "same_support": same and all(torch.equal(on[k], cpu[k]) for k in on if k not in floats),  # indices, block rows / cols
            "bit_identical": same and all(torch.equal(on[k], cpu[k]) for k in on),
            "max_value_diff": max(((on[k].float() - cpu[k].float()).abs().max().item() for k in floats), default=0.0),
            "max_logit_diff": (on_logits - cpu_logits).abs().max().item(),
            "test_stats_differ": _stats_differ(*(json.loads((arts[d] / artifact.REPORT).read_text()) for d in (device, "cpu"))),
        }
        ok &= out[mode]["same_support"] and out[mode]["max_logit_diff"] <= 1e-3 and (mode != "lossless" or out[mode]["bit_identical"])
    return out | {"ok": ok}


def char_tokenizer(directory: Path):
    """A tokenizer of one token per character of the built-in calibration prompts (fewer than the tiny vocabulary's
    256), saved into `directory`: what annealing needs of a fine-tune to calibrate on them."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set((ROOT / "hf_decompose" / "data" / "calibration.txt").read_text()))
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(chars)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated"), decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="</s>").save_pretrained(directory)


def check_anneal_devices(fam: dict, device: str, tmp: Path) -> dict:
    """Anneal the first fine-tune on `device` and on CPU (8 built-in calibration prompts x 16 tokens): the same level
    for every layer, logits within 1e-2 (codes rounded on Grams of each device's arithmetic may differ), both timed."""
    char_tokenizer(fam["dense"][0])
    ids = prompts(3, TINY["vocab_size"], device, seed=5)
    config = {"calibration_prompts": 8, "calibration_tokens": 16}  # the guard's default 2048 positions: the layers stop at 3 levels
    arts, seconds, levels = {}, {}, {}
    for d in dict.fromkeys((device, "cpu")):
        t = time.perf_counter()
        arts[d] = decompose_to_disk(fam["dense"][0], fam["base"], DecomposedConfig(mode="anneal", device=d, annealing=config),
                                    output_dir=tmp / f"anneal_on_{d}", progress=False)  # fmt: skip
        seconds[d] = time.perf_counter() - t
        levels[d] = {row["layer"]: row["level"] for row in json.loads((arts[d] / artifact.REPORT).read_text())["annealing"]["levels"]}
    on_logits, cpu_logits = (logits(DecomposedModel.from_pretrained(arts[d], base_model=fam["base"]).to(device), ids) for d in (device, "cpu"))
    same_bytes = (arts[device] / artifact.WEIGHTS).read_bytes() == (arts["cpu"] / artifact.WEIGHTS).read_bytes()
    diff = (on_logits - cpu_logits).abs().max().item()
    return {"ok": levels[device] == levels["cpu"] and diff <= 1e-2, "levels_on_device": levels[device], "levels_on_cpu": levels["cpu"],
            "bit_identical": same_bytes, "max_logit_diff": diff, "seconds_on_device": seconds[device], "seconds_on_cpu": seconds["cpu"]}  # fmt: skip


def _stats_differ(on: dict, cpu: dict, limit: int = 8) -> list[str]:
    """The criterion's per-tensor test statistics (robust scale, ranks, supported counts) that differ between two reports."""
    out = []
    for layer_on, layer_cpu in zip(on["layers"], cpu["layers"]):
        for name, stats in layer_on.get("tensors", {}).items():
            other = layer_cpu.get("tensors", {}).get(name, {})
            out += [f"{name} {k}: {v} vs {other.get(k)}" for k, v in stats.items() if k != "z_hist" and other.get(k) != v]
    return out[:limit]


def check_device_maps(fam: dict, device: str, tmp: Path) -> dict:
    ids = prompts(2, TINY["vocab_size"], device, seed=2)
    load = lambda **kw: DecomposedModel.from_pretrained(fam["artifacts"][0], base_model=fam["base"], execution="split", **kw)  # noqa: E731
    expected = generate(load().to(device), ids, 16)
    names = sorted(substructures(load()))
    main = 0 if device.startswith("cuda") else "cpu"
    out: dict = {}
    maps = {
        "parts_on_cpu_and_disk": dict(device_map={"": main, **dict.fromkeys(names[::3], "cpu"), **dict.fromkeys(names[1::3], "disk")},
                                      offload_folder=tmp / "off1"),
        "auto_small_max_memory": dict(device_map="auto", max_memory={main: 200_000, "cpu": 300_000}, offload_folder=tmp / "off2"),
    }
    if torch.cuda.device_count() >= 2:
        maps["balanced_spread"] = dict(device_map="balanced")
    for label, kwargs in maps.items():
        model = load(**kwargs)
        devices = sorted({str(d) for d in model.hf_device_map.values()})
        out[label] = {"devices": devices, "tokens_equal": torch.equal(generate(model, ids, 16).to(expected.device), expected),
                      "substructures_mapped": sum(".ops." in n for n in model.hf_device_map)}  # fmt: skip
    out["ok"] = all(v["tokens_equal"] for v in out.values())
    return out


# -- timings ------------------------------------------------------------------------------------
def time_latency(fam: dict, device: str, new_tokens: int, repeats: int) -> dict:
    """Decode ms/token: (time of `new_tokens` new tokens - time of 1) / (new_tokens - 1), median of interleaved repeats."""
    reference = dense(fam["dense"][0], device)
    model = DecomposedModel.from_pretrained(fam["artifacts"][0], base_model=fam["base"]).to(device)

    def use(execution: str):
        return model.set_execution(execution)

    variants = {"dense": lambda: reference, "merged": lambda: use("merged"), "split": lambda: use("split")}
    static = {"split_static": dict(cache_implementation="static")}  # extra generate() arguments of a variant
    variants["split_static"] = variants["split"]
    out: dict = {}
    for rows in (1, 8):
        ids = prompts(rows, fam["vocab"], device)
        for get in variants.values():
            generate(get(), ids, 4)  # warm-up
        ms = {name: [] for name in variants}
        for _ in range(repeats):
            for name, get in variants.items():
                m, kw = get(), static.get(name, {})
                full, first = seconds(lambda: generate(m, ids, new_tokens, **kw), device), seconds(lambda: generate(m, ids, 1, **kw), device)
                ms[name].append((full - first) / (new_tokens - 1) * 1e3)
        for name, values in ms.items():
            out.setdefault(name, {})[f"b{rows}_ms_per_token"] = statistics.median(values)
    for name, get in variants.items():  # bytes a decode step reads; the byte bound is merged's time scaled by them
        read = step_bytes(get())
        out[name]["bytes_per_step"] = read["base"] + sum(read["parts"].values())
    for name in variants:
        out[name]["b1_bound_ms_per_token"] = out["merged"]["b1_ms_per_token"] * out[name]["bytes_per_step"] / out["merged"]["bytes_per_step"]
    return out


def time_tenants(fam: dict, device: str, new_tokens: int) -> dict:
    """GPU memory and tokens/s at 8 rows: one MultiDecomposedModel vs N dense models vs one merged model."""
    ids = prompts(8, fam["vocab"], device, seed=3)
    out: dict = {}

    def measure(load, run) -> dict:
        gc.collect()
        before = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
        models = load()
        run(models, 4)
        memory = (torch.cuda.memory_allocated() - before) if device.startswith("cuda") else None
        t = seconds(lambda: run(models, new_tokens), device)
        read = [step_bytes(m) for m in (models if isinstance(models, list) else [models])]
        del models
        return {"memory_bytes": memory, "tokens_per_s": 8 * new_tokens / t,
                "bytes_per_step": sum(r["base"] + sum(r["parts"].values()) for r in read)}  # fmt: skip

    out["merged_single"] = measure(lambda: DecomposedModel.from_pretrained(fam["artifacts"][0], base_model=fam["base"]).to(device),
                                   lambda m, n: generate(m, ids, n))  # fmt: skip
    for n in (1, 2, 4, 8):
        names = [f"t{i % n}" for i in range(8)]
        out[f"n{n}_multi"] = measure(
            lambda: MultiDecomposedModel.from_pretrained({f"t{k}": fam["artifacts"][k] for k in range(n)}, base_model=fam["base"]).to(device),
            lambda m, t: generate(m, ids, t, decomposed_names=names),
        )
        out[f"n{n}_dense"] = measure(lambda: [dense(fam["dense"][k], device) for k in range(n)],
                                     lambda ms, t: [generate(m, ids[k::n], t) for k, m in enumerate(ms)])  # fmt: skip
        # the byte bound: one merged model's tokens/s scaled by base bytes / (base + the N fine-tunes' substructures)
        out[f"n{n}_multi"]["bound_tokens_per_s"] = (out["merged_single"]["tokens_per_s"] * out["merged_single"]["bytes_per_step"]
                                                    / out[f"n{n}_multi"]["bytes_per_step"])  # fmt: skip
    names = [f"t{i % 8}" for i in range(8)]
    out["n8_multi_static"] = measure(  # transformers' static cache (a CUDA decode step can then be a CUDA graph)
        lambda: MultiDecomposedModel.from_pretrained({f"t{k}": fam["artifacts"][k] for k in range(8)}, base_model=fam["base"]).to(device),
        lambda m, t: generate(m, ids, t, decomposed_names=names, cache_implementation="static"),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip timing sections that would end later than this")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run with tiny sizes")
    parser.add_argument("--timings", default="plain,lowbit", help="timing families to build and time: plain (low-rank + sparse / block "
                        "deltas), lowbit (anneal-style low-rank + 3-bit), both by default; 'none' for the checks alone")
    args = parser.parse_args(argv)
    timings = [] if args.timings == "none" else args.timings.split(",")
    if unknown := sorted(set(timings) - TIMING_FAMILIES.keys()):
        parser.error(f"--timings: unknown {unknown}; choose among {sorted(TIMING_FAMILIES)} or none")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available (torch.cuda.is_available() is False): nothing checked.")
        return 3
    start = time.perf_counter()
    gpu = args.device.startswith("cuda")
    res: dict = {
        "device": torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.processor() or platform.machine()}, dry run)",
        "gpus": torch.cuda.device_count() if gpu else 0, "torch": torch.__version__, "sections": {},
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)

    def section(name: str, fn, estimate_s: float = 0.0) -> None:
        elapsed = time.perf_counter() - start
        if elapsed + estimate_s > args.budget_s:
            res["sections"][name] = {"skipped": f"time budget: {elapsed:.0f} s used, about {estimate_s:.0f} s needed"}
        else:
            t = time.perf_counter()
            try:
                res["sections"][name] = fn()
            except Exception:  # a failed section is recorded and the next one still runs
                res["sections"][name] = {"ok": False, "error": traceback.format_exc()}
            res["sections"][name]["seconds"] = time.perf_counter() - t
        res["elapsed_s"] = time.perf_counter() - start
        args.output.write_text(json.dumps(res, indent=2, default=str))
        print(f"[{res['elapsed_s']:6.1f} s] {name}: {json.dumps(res['sections'][name], default=str)[:400]}", flush=True)

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        tiny = build_family(tmp / "tiny", TINY, tenants=3, dense_copies=1, kinds=(0, 1, 2))
        section("merged_split", lambda: check_merged_split(tiny, args.device))
        section("multi_tenant", lambda: check_multi(tiny, args.device))
        section("decompose_devices", lambda: check_decompose_devices(tiny, args.device, tmp / "plain"))
        # without noise a structured matrix's residual after its low-rank fit is float32 rounding (robust scale 2e-9 to
        # 1e-8), so the tests weigh each device's rounding (criterion's rows differed so on an H200); with it they do not
        noisy = build_family(tmp / "tiny_noisy", TINY, tenants=1, dense_copies=1, kinds=(0, 1, 2), noise=2e-3)
        section("decompose_devices_noisy", lambda: check_decompose_devices(noisy, args.device, tmp / "noisy"))
        section("anneal_devices", lambda: check_anneal_devices(tiny, args.device, tmp / "anneal"))
        section("device_maps", lambda: check_device_maps(tiny, args.device, tmp))
        new_tokens = 128 if gpu else 8
        for label, kinds in (TIMING_FAMILIES[f] for f in timings):
            try:
                mid = build_family(tmp / f"mid{label}", MID if gpu else TINY, tenants=8, dense_copies=8, kinds=kinds)
            except Exception:
                res["sections"][f"timing_models{label}"] = {"ok": False, "error": traceback.format_exc()}
                continue
            section(f"latency{label}", lambda: time_latency(mid, args.device, new_tokens, repeats=3), estimate_s=120)
            section(f"tenants{label}", lambda: time_tenants(mid, args.device, new_tokens), estimate_s=120)
            shutil.rmtree(tmp / f"mid{label}")
    checks = [s for s in res["sections"].values() if "ok" in s]
    res["all_checks_ok"] = all(s["ok"] for s in checks)
    args.output.write_text(json.dumps(res, indent=2, default=str))
    print(f"gpu_check: {'all checks passed' if res['all_checks_ok'] else 'A CHECK FAILED'}; wrote {args.output}")
    return 0 if res["all_checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
