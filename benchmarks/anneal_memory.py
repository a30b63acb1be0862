"""Peak memory of annealing's work on a vocabulary-sized matrix: the tied embedding (or head) of a synthetic Llama of
`scale.py`'s family (random base, structured fine-tune, bf16; say so wherever its numbers are used), with a Gram of
random inputs. Each step's peak RSS beyond what was held before it (VmHWM reset between steps) and its time:

* ``factors``  - its activation-weighted low-rank factors (`weighted_lowrank`);
* ``feedback`` - error feedback's factor of the Gram (`Feedback.of`);
* ``level``    - one step level (``lr0.5+step1.5``, of the former default ladder: factors kept, the residual rounded with error
  feedback, its stored size measured);
* ``store``    - the candidate and the level written to annealing's scratch store (`DeltaStore`).

    flock /tmp/hf_decompose_bench.lock python benchmarks/anneal_memory.py [--size 1.5b]

Writes benchmarks/results/anneal_memory_<size>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import scale  # noqa: E402
from _machine import machine, proc_status  # noqa: E402

from hf_decompose import DecomposedConfig  # noqa: E402
from hf_decompose.annealing import _Candidate, _level_delta  # noqa: E402
from hf_decompose.checkpoints import CheckpointReader  # noqa: E402
from hf_decompose.config import Level  # noqa: E402
from hf_decompose.layerwise import DeltaStore  # noqa: E402
from hf_decompose.parts import DensePart, TensorDelta  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LEVEL = "lr0.5+step1.5"


def _measure(step) -> dict:
    """Peak RSS of `step()` above the RSS before it (the high-water mark reset first), and its seconds."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM back to the current RSS
    before, t = proc_status("VmRSS")["VmRSS"], time.perf_counter()
    step()
    return {"seconds": time.perf_counter() - t, "rss_before_bytes": before, "peak_above_bytes": proc_status("VmHWM")["VmHWM"] - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1.5b", choices=list(scale.SIZES | scale.MOE_SIZES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base_dir, ft_dir = scale.build(args.size)
    base, ft = CheckpointReader(base_dir), CheckpointReader(ft_dir)
    name = "lm_head.weight" if "lm_head.weight" in ft.names() else "model.embed_tokens.weight"
    exact = ft.get(name, dtype=None) - base.get(name, dtype=None)
    delta = TensorDelta(name, tuple(exact.shape), False, [DensePart(exact)])
    inputs = torch.randn(2504, exact.shape[1], generator=torch.Generator().manual_seed(0))  # the default pair's calibration tokens
    candidate = _Candidate(delta, inputs.t() @ inputs, DecomposedConfig(mode="anneal"), cut=True)  # as annealing's are
    del inputs, exact
    made: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = DeltaStore(tmp)
        steps = {
            "factors": lambda: candidate.factors,
            "feedback": lambda: candidate.feedback,
            "level": lambda: made.update(level=_level_delta(candidate, Level.parse(LEVEL))),
            "store": lambda: (store.put_tensors("candidate", dict(zip("uvs", candidate.factors)) | {"gram": candidate.gram}),
                              store.put("level", {name: made["level"]})),
        }
        rows = {step: _measure(run) for step, run in steps.items()}
    level = made["level"]
    print(f"synthetic-llama-{args.size} {name} {tuple(delta.shape)}, level {LEVEL}: rank {level.rank}, {level.nbytes() / 2**20:.1f} MiB stored\n")
    print("| step | seconds | RSS before (GiB) | peak above it (GiB) |\n| --- | ---: | ---: | ---: |")
    for step, r in rows.items():
        print(f"| {step} | {r['seconds']:.1f} | {r['rss_before_bytes'] / 2**30:.2f} | {r['peak_above_bytes'] / 2**30:.2f} |")
    out = RESULTS / f"anneal_memory_{args.size}.json"
    out.write_text(json.dumps({"synthetic": True, "size": args.size, "matrix": name, "shape": list(delta.shape), "level": LEVEL,
                               "rank": level.rank, "level_bytes": level.nbytes(), "machine": machine(), "threads": args.threads,
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
