"""Wall time and peak RSS of `decompose` (criterion + substructures) on the default pair, next to
the time to merely read both checkpoints with safetensors. Each phase runs in its own process so
that peaks do not mix. Prints a table and writes benchmarks/results/decompose_speed.json.

    python benchmarks/decompose_speed.py [--modes lossless,criterion]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine  # noqa: E402

PHASE = r"""
import json, resource, sys, time
from pathlib import Path
mode, base, ft = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
t0 = time.perf_counter()
if mode == "read":
    from safetensors.torch import load_file
    from hf_decompose.checkpoints import weight_files
    for d in (base, ft):
        for f in weight_files(d):
            tensors = load_file(f)
            del tensors
else:
    from hf_decompose import DecomposedConfig
    from hf_decompose.checkpoints import CheckpointPair, CheckpointReader
    from hf_decompose.model import compute_deltas
    pair = CheckpointPair(CheckpointReader(base), CheckpointReader(ft))
    deltas, _ = compute_deltas(pair, DecomposedConfig(mode=mode), progress=False)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_phase(mode: str, base: Path, ft: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PHASE, mode, str(base), str(ft)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--modes", default="lossless,criterion")
    args = parser.parse_args()
    from hf_decompose.checkpoints import CheckpointReader
    from hf_decompose.pair import prepare_default_pair

    pair = prepare_default_pair()
    model_bytes = CheckpointReader(pair.finetuned).nbytes()
    run_phase("read", pair.base, pair.finetuned)  # warm the page cache: both phases read from memory
    read = run_phase("read", pair.base, pair.finetuned)
    rows = []
    for mode in args.modes.split(","):
        result = run_phase(mode, pair.base, pair.finetuned)
        rows.append({
            "mode": mode,
            "decompose_s": result["seconds"],
            "read_s": read["seconds"],
            "time_ratio": result["seconds"] / read["seconds"],
            "peak_rss_gib": result["peak_rss_bytes"] / 2**30,
            "rss_over_model": result["peak_rss_bytes"] / model_bytes,
        })
    print("| mode | decompose (s) | read both (s) | ratio (target <= 3) | peak RSS (GiB) | RSS / one model (target <= 2.5) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['decompose_s']:.1f} | {r['read_s']:.1f} | {r['time_ratio']:.1f}x | {r['peak_rss_gib']:.2f} | {r['rss_over_model']:.2f}x |")
    out = Path(__file__).parent / "results" / "decompose_speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "model_bytes": model_bytes, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
