"""The Hub round trip on the default pair (SmolLM2-135M + its Shakespeare fine-tune), through a local Hub.

base and fine-tune pushed as plain model repos -> ``AutoModelForCausalLM.from_pretrained(FT,
quantization_config=DecomposedConfig(base_model=BASE))`` (decomposes while loading) -> equivalence on
held-out prompts -> ``push_to_hub`` -> a fresh process loads the repo with
``AutoDecomposedModelForCausalLM`` and plain ``AutoModelForCausalLM`` and generates greedily. Prints
sizes, timings and the equivalence result; writes benchmarks/results/hub_roundtrip.json.

    python benchmarks/hub_roundtrip.py [--mode lossless] [--prompts 8] [--max-new-tokens 32] [--require-cached]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]
from _machine import machine  # noqa: E402

from tests.hub_server import HubServer, use_hub  # noqa: E402  (stdlib only until a client call)

FRESH = r"""
import json, sys, time
t0 = time.perf_counter()
import hf_decompose
from hf_decompose.equivalence import greedy_generate
from transformers import AutoModelForCausalLM, AutoTokenizer
repo, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(repo)
out = {"import_s": time.perf_counter() - t0}
for name, load in (("auto_decomposed", hf_decompose.AutoDecomposedModelForCausalLM.from_pretrained), ("auto_model", AutoModelForCausalLM.from_pretrained)):
    t = time.perf_counter()
    model = load(repo)
    out[name] = {"load_s": time.perf_counter() - t, "tokens": [x.tolist() for x in greedy_generate(model, tokenizer, prompts, n, batch_size=8)]}
    del model
print(json.dumps(out))
"""


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="lossless", choices=["lossless", "criterion"])
    parser.add_argument("--prompts", type=int, default=8, help="held-out evaluation prompts to compare on")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--require-cached", action="store_true", help="exit instead of building the default pair")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "hub_roundtrip.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hub_roundtrip-"))
    server = HubServer(work / "hub").start()
    os.environ.update(server.env(work / "cache"))  # before huggingface_hub is first imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hub_context = use_hub(server, work / "cache")
    if "huggingface_hub" in sys.modules:  # imported already (e.g. by a wrapper): point its constants at the server
        hub_context.__enter__()  # left for the process's lifetime
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_decompose
    from hf_decompose.equivalence import greedy_generate, verify_equivalence
    from hf_decompose.pair import cache_dir, prepare_default_pair

    if args.require_cached and not any(p.name.startswith("smollm2-135m-shakespeare-") for p in cache_dir().glob("*")):
        sys.exit(f"the default pair is not in {cache_dir()}; run without --require-cached to build it (~5 min)")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    pair = prepare_default_pair()
    timings["prepare_pair_s"] = time.perf_counter() - t
    prompts = pair.eval_prompts[: args.prompts]
    api = HfApi()
    t = time.perf_counter()
    for repo, directory in (("bench/smollm2-base", pair.base), ("bench/smollm2-shakespeare", pair.finetuned)):
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=directory, repo_id=repo, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"])
    timings["push_plain_repos_s"] = time.perf_counter() - t

    t = time.perf_counter()
    config = hf_decompose.DecomposedConfig(base_model="bench/smollm2-base", mode=args.mode)
    model = AutoModelForCausalLM.from_pretrained("bench/smollm2-shakespeare", quantization_config=config)
    timings["load_and_decompose_s"] = time.perf_counter() - t
    reference = AutoModelForCausalLM.from_pretrained(pair.finetuned).eval()
    tokenizer = AutoTokenizer.from_pretrained(pair.finetuned)
    t = time.perf_counter()
    equivalence = verify_equivalence(reference, model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, progress=False)
    timings["verify_s"] = time.perf_counter() - t
    model.decomposition.report["equivalence"] = equivalence.to_dict()
    t = time.perf_counter()
    commit = model.push_to_hub("bench/smollm2-shakespeare-decomposed")
    timings["push_artifact_s"] = time.perf_counter() - t
    expected = [x.tolist() for x in greedy_generate(reference, tokenizer, prompts, args.max_new_tokens)]
    del model, reference

    env = dict(server.env(work / "fresh-cache"), PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, "bench/smollm2-shakespeare-decomposed", json.dumps(prompts), str(args.max_new_tokens)],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode:
        sys.exit(f"fresh-process load failed:\n{proc.stderr[-4000:]}")
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    timings["fresh_process_s"] = time.perf_counter() - t

    files = {s.rfilename: s.size for s in api.model_info("bench/smollm2-shakespeare-decomposed", files_metadata=True).siblings}
    ft_bytes = sum(p.stat().st_size for p in pair.finetuned.glob("*.safetensors"))
    base_bytes = sum(p.stat().st_size for p in pair.base.glob("*.safetensors"))
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "pair": {"base": pair.base.name, "finetuned": pair.finetuned.name},  # names in the cache, no machine paths
        "mode": args.mode,
        "commit": commit.oid,
        "sizes_bytes": {
            "uploaded_repo": sum(files.values()), "decomposition": files.get("decomposition.safetensors", 0),
            "finetuned_checkpoint": ft_bytes, "base_checkpoint": base_bytes,
        },  # fmt: skip
        "uploaded_files": files,
        "contains_base_weights": any(name.endswith("model.safetensors") for name in files),
        "equivalence": equivalence.to_dict(),
        "fresh_process": {
            "identical_to_finetune": {k: fresh[k]["tokens"] == expected for k in ("auto_decomposed", "auto_model")},
            "load_s": {k: fresh[k]["load_s"] for k in ("auto_decomposed", "auto_model")},
            "import_s": fresh["import_s"],
        },
        "timings_s": timings,
    }
    sizes = result["sizes_bytes"]
    print(f"\nmachine      {result['machine']['cpu']} ({result['machine']['cores']} cores)")
    print(f"uploaded     {_mib(sizes['uploaded_repo'])} ({_mib(sizes['decomposition'])} decomposition), no base weights: {not result['contains_base_weights']}")
    print(f"fine-tune    {_mib(ft_bytes)} -> repo / fine-tune = {sizes['uploaded_repo'] / ft_bytes:.1%}; base {_mib(base_bytes)} pulled, not stored")
    print(f"equivalence  {equivalence.exact_match_rate:.0%} identical on {equivalence.num_prompts} prompts x {equivalence.max_new_tokens} tokens; "
          f"max |logit diff| {equivalence.max_abs_logit_diff:.3g}, mean KL {equivalence.mean_kl:.3g}")  # fmt: skip
    print(f"fresh proc   identical generations: {result['fresh_process']['identical_to_finetune']}")
    print("timings      " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    server.stop()


if __name__ == "__main__":
    main()
