"""Peak resident memory of decomposing the default pair (SmolLM2-135M + its fine-tune), next to the
fine-tuned model's size in memory (fp32 bytes). Each measurement runs in its own process:

* ``imports``              - the interpreter with torch, transformers and hf_decompose imported (the floor);
* ``<mode> streaming``     - `decompose_to_disk(mode=...)`: layers streamed into the artifact, no model built
  (``anneal``: on the pair's calibration prompts, the guard run one decoder layer at a time; its row also
  records the annealing time, the level chosen per layer and the number of guard calls);
* ``<mode> in memory``     - `decompose(mode=...)` + `save_pretrained`: the model with every delta, then saved.
* ``loading``              - the plain fine-tune (`AutoModelForCausalLM.from_pretrained`) beside its artifact
  loaded merged and split (`DecomposedModel.from_pretrained`), each followed by one forward pass: peak RSS
  and `get_memory_footprint()`. Target: merged at most 1.05x the fine-tune's parameter bytes.

Target: peak <= 1.5x the fine-tuned model's fp32 size (streaming); reported both as is and above the
imports' floor (for a 135M model the interpreter with torch alone is ~0.8x). Writes
benchmarks/results/memory.json.

    flock /tmp/hf_decompose_bench.lock python benchmarks/memory.py [--modes lossless,criterion,anneal] [--phases streaming,in_memory,loading]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import PEAK_RSS, machine  # noqa: E402

TARGET = 1.5
MERGED_TARGET = 1.05  # merged execution: parameter bytes over the fine-tune's
PHASE = PEAK_RSS + r"""
import json, sys, tempfile, time
import torch, transformers
import hf_decompose
from hf_decompose import DecomposedConfig, decompose, decompose_to_disk
phase, mode, base, ft, art, calibration = sys.argv[1:7]
t0 = time.perf_counter()
footprint, annealing = None, None
config = DecomposedConfig(mode=mode, calibration=calibration or None)
with tempfile.TemporaryDirectory() as out:
    if phase == "streaming":
        path = decompose_to_disk(ft, base, config, output_dir=f"{out}/artifact", progress=False)
        if mode == "anneal":
            a = json.loads((path / "decomposition.json").read_text())["annealing"]
            annealing = {"seconds": a["seconds"], "guard_calls": len(a["trace"]), "levels": {x["layer"]: x["level"] for x in a["levels"]}}
    elif phase == "in_memory":
        decompose(ft, base, config, progress=False).save_pretrained(f"{out}/artifact")
    elif phase.startswith("load_"):
        if phase == "load_finetune":
            model = transformers.AutoModelForCausalLM.from_pretrained(ft)
        else:
            model = hf_decompose.DecomposedModel.from_pretrained(art, execution=phase.removeprefix("load_"))
        with torch.no_grad():
            model(input_ids=torch.arange(1, 65).reshape(1, 64))
        footprint = model.get_memory_footprint()
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes(),
                  "footprint_bytes": footprint, "annealing": annealing}))
"""


def measure(phase: str, mode: str, base: Path, finetuned: Path, artifact: Path | str = "", calibration: Path | str = "") -> dict:
    """Peak RSS (VmHWM) and wall time of one phase, in a fresh process (`calibration`: a prompts file)."""
    proc = subprocess.run([sys.executable, "-c", PHASE, phase, mode, str(base), str(finetuned), str(artifact), str(calibration)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{phase} {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def model_bytes(finetuned: Path) -> int:
    """The fine-tune's size in memory as fp32: 4 bytes per parameter, read from the safetensors headers."""
    from hf_decompose.checkpoints import CheckpointReader

    reader = CheckpointReader(finetuned)
    return 4 * sum(math.prod(reader.shape(name)) for name in reader.names())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="lossless,criterion")
    parser.add_argument("--phases", default="streaming,in_memory,loading")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "memory.json"))
    args = parser.parse_args()
    from hf_decompose import DecomposedConfig, decompose_to_disk
    from hf_decompose.pair import prepare_default_pair

    pair = prepare_default_pair()
    size = model_bytes(pair.finetuned)
    floor = measure("imports", "", pair.base, pair.finetuned)["peak_rss_bytes"]
    phases = args.phases.split(",")
    scratch = tempfile.TemporaryDirectory()
    calibration = Path(scratch.name) / "calibration.txt"
    calibration.write_text("\n".join(pair.calib_prompts))  # one prompt a line (none holds a newline)
    rows: dict[str, dict] = {}
    for mode in args.modes.split(","):
        for phase in [p for p in ("streaming", "in_memory") if p in phases]:
            m = measure(phase, mode, pair.base, pair.finetuned, calibration=calibration if mode == "anneal" else "")
            rows.setdefault(mode, {})[phase] = m | {
                "load_average_1min": os.getloadavg()[0],
                "peak_over_model": m["peak_rss_bytes"] / size,
                "above_imports_over_model": (m["peak_rss_bytes"] - floor) / size,
                "within_target": m["peak_rss_bytes"] <= TARGET * size,
                "within_target_above_imports": m["peak_rss_bytes"] - floor <= TARGET * size,
            }
    loading = {"finetune": measure("load_finetune", "", pair.base, pair.finetuned)} if "loading" in phases else {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(",") if loading else []:
            config = DecomposedConfig(mode=mode, calibration=calibration if mode == "anneal" else None)
            artifact = decompose_to_disk(pair.finetuned, pair.base, config, output_dir=Path(tmp) / mode, progress=False)
            for execution in ("merged", "split"):
                loading[f"{mode} {execution}"] = measure(f"load_{execution}", mode, pair.base, pair.finetuned, artifact)
    scratch.cleanup()
    for row in loading.values():
        row["footprint_over_finetune"] = row["footprint_bytes"] / loading["finetune"]["footprint_bytes"]
        row["peak_over_finetune_load"] = row["peak_rss_bytes"] / loading["finetune"]["peak_rss_bytes"]
    output = Path(args.output)
    earlier = json.loads(output.read_text()) if output.is_file() else {}  # rows of modes and loads not measured now stay
    result = {
        "machine": machine(),
        "pair": {"base": pair.base.name, "finetuned": pair.finetuned.name},  # names in the cache, no machine paths
        "finetuned_fp32_bytes": size,
        "imports_peak_rss_bytes": floor,
        "target_peak_over_model": TARGET,
        "load_average_1min": os.getloadavg()[0],
        "modes": earlier.get("modes", {}) | rows,
        "loading": loading or earlier.get("loading", {}),
        "target_merged_footprint_over_finetune": MERGED_TARGET,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"fine-tune in memory (fp32): {size / 2**20:,.0f} MiB; imports alone: {floor / 2**20:,.0f} MiB")
    for mode, measured in rows.items():
        for phase, m in measured.items():
            print(f"{mode:<10} {phase:<10} peak {m['peak_rss_bytes'] / 2**20:,.0f} MiB = {m['peak_over_model']:.2f}x the model "
                  f"({m['above_imports_over_model']:.2f}x above the imports), {m['seconds']:.0f} s")
    print(f"\n{'load':<22} {'peak RSS':>10} {'/ fine-tune load':>17} {'footprint':>10} {'/ fine-tune':>12}")
    for name, row in result["loading"].items():
        print(f"{name:<22} {row['peak_rss_bytes'] / 2**20:>7,.0f} MiB {row['peak_over_finetune_load']:>16.2f}x "
              f"{row['footprint_bytes'] / 2**20:>6,.0f} MiB {row['footprint_over_finetune']:>11.3f}x")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
