"""Wall time and peak RSS of decomposing the default pair, next to the time to merely read both
checkpoints with safetensors (`load_file`, from the page cache), as ratios measured in one run.

Phases, each in its own process (peaks do not mix), timed after their imports (also reported with
them, as earlier versions of this benchmark did: there the import of torch dominated the read time):

* ``read``                - `safetensors.torch.load_file` of both checkpoints, every tensor cloned (the
                            file is only mapped until its bytes are touched);
* ``<mode> in memory``    - `compute_deltas`: criterion + substructures of every layer, all kept in memory
                            (what `decompose` does before building the model);
* ``<mode> streaming``    - `decompose_to_disk`: the same, each layer written to the artifact and dropped,
                            plus hashing the base and writing the artifact's other files.

A round runs the read and every decompose phase back to back; ratios are per round, and the median
over `--repeats` rounds is reported (a shared machine's load changes between rounds, less within one).
Targets (issue 12): on CPU lossless <= 3x and criterion <= 10x the read time; on CUDA both <= 3x.
Writes benchmarks/results/decompose_speed.json.

    python benchmarks/decompose_speed.py [--modes lossless,criterion] [--repeats 3] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import PEAK_RSS, machine  # noqa: E402

TARGETS = {"lossless": 3.0, "criterion": 10.0}  # on CPU; on CUDA 3.0 for both
PHASE = PEAK_RSS + r"""
import json, sys, tempfile, time
from pathlib import Path
phase, mode, base, ft, device, threads = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5], int(sys.argv[6])
t0 = time.perf_counter()
import torch
if threads:
    torch.set_num_threads(threads)
if phase == "read":
    from safetensors.torch import load_file
else:
    from hf_decompose import DecomposedConfig, decompose_to_disk
    from hf_decompose.checkpoints import CheckpointPair, CheckpointReader
    from hf_decompose.model import compute_deltas
t1 = time.perf_counter()
if phase == "read":  # load_file maps the file; cloning brings every tensor's bytes into memory
    for f in sorted(base.glob("*.safetensors")) + sorted(ft.glob("*.safetensors")):
        for tensor in load_file(f).values():
            tensor.clone()
elif phase == "in_memory":
    pair = CheckpointPair(CheckpointReader(base), CheckpointReader(ft))
    deltas, _ = compute_deltas(pair, DecomposedConfig(mode=mode, device=device), progress=False)
else:
    with tempfile.TemporaryDirectory() as out:
        decompose_to_disk(ft, base, DecomposedConfig(mode=mode, device=device), output_dir=f"{out}/artifact", progress=False)
t2 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "seconds": t2 - t1, "peak_rss_bytes": peak_rss_bytes()}))
"""


def run_phase(phase: str, mode: str, base: Path, ft: Path, device: str = "auto", threads: int = 0) -> dict:
    out = subprocess.run([sys.executable, "-c", PHASE, phase, mode, str(base), str(ft), device, str(threads)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="lossless,criterion")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="DecomposedConfig.device: auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in every phase (0: torch's default)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "decompose_speed.json"))
    args = parser.parse_args()
    import torch

    cuda = args.device != "cpu" and torch.cuda.is_available()
    from hf_decompose.checkpoints import CheckpointReader
    from hf_decompose.pair import prepare_default_pair

    pair = prepare_default_pair()
    load_before = os.getloadavg()[0]
    model_bytes = CheckpointReader(pair.finetuned).nbytes()
    run_phase("read", "", pair.base, pair.finetuned, threads=args.threads)  # warm the page cache: every phase reads from memory
    phases = [(p, m) for m in args.modes.split(",") for p in ("in_memory", "streaming")]
    rounds = []
    for _ in range(args.repeats):
        read = run_phase("read", "", pair.base, pair.finetuned, threads=args.threads)
        rounds.append({"read": read} | {f"{m} {p}": run_phase(p, m, pair.base, pair.finetuned, args.device, args.threads) for p, m in phases})
    rows = []
    for p, m in phases:
        key, target = f"{m} {p}", 3.0 if cuda else TARGETS.get(m, 3.0)
        ratios = [r[key]["seconds"] / r["read"]["seconds"] for r in rounds]
        with_imports = [(r[key]["seconds"] + r[key]["imports_s"]) / (r["read"]["seconds"] + r["read"]["imports_s"]) for r in rounds]
        rows.append({
            "mode": m,
            "path": p,
            "decompose_s": statistics.median(r[key]["seconds"] for r in rounds),
            "read_s": statistics.median(r["read"]["seconds"] for r in rounds),
            "time_ratio": statistics.median(ratios),
            "time_ratios": ratios,
            "target": target,
            "within_target": statistics.median(ratios) <= target,
            "imports_s": statistics.median(r[key]["imports_s"] for r in rounds),
            "read_imports_s": statistics.median(r["read"]["imports_s"] for r in rounds),
            "time_ratio_with_imports": statistics.median(with_imports),
            "peak_rss_gib": max(r[key]["peak_rss_bytes"] for r in rounds) / 2**30,
            "rss_over_model": max(r[key]["peak_rss_bytes"] for r in rounds) / model_bytes,
        })
    print(f"device: {args.device} ({'CUDA' if cuda else 'CPU'})")
    print("| mode | path | decompose (s) | read both (s) | ratio (target) | with imports: s, ratio | peak RSS (GiB) | RSS / one model |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['mode']} | {r['path'].replace('_', ' ')} | {r['decompose_s']:.2f} | {r['read_s']:.2f} | {r['time_ratio']:.1f}x (<= {r['target']:g}) | "
              f"{r['decompose_s'] + r['imports_s']:.1f} / {r['read_s'] + r['read_imports_s']:.1f}, {r['time_ratio_with_imports']:.1f}x | "
              f"{r['peak_rss_gib']:.2f} | {r['rss_over_model']:.2f}x |")
    result = {
        "machine": machine(),
        "load_average_1min": os.getloadavg()[0],  # at the end: another job may have shared the cores
        "model_bytes": model_bytes,
        "date": time.strftime("%Y-%m-%d"),
        "device": args.device,
        "cuda": cuda,
        "threads": args.threads or torch.get_num_threads(),
        "load_average_before_1min": load_before,
        "rows": rows,
        "rounds": rounds,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
