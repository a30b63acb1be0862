"""Where a whole anneal's memory goes: `decompose_to_disk(mode="anneal")` on a synthetic Llama of `scale.py`'s family
(random base, structured fine-tune, bf16; say so wherever its numbers are used), with a sampler thread that reads the
process's RSS every 20 ms and, at each new high (by at least ``--step`` MiB), records:

* RSS, and its anonymous and file-backed parts (``/proc/self/status``);
* the CPU tensors Python can reach (`gc`), in total and the largest shapes: the gap between them and the anonymous
  RSS is memory no tensor object holds (temporaries inside an operator, allocator caches, freed heap pages);
* every thread's innermost frames (the annealing thread's and, during calibration, its lock-step generation jobs').

    flock /tmp/hf_decompose_bench.lock python benchmarks/anneal_timeline.py [--size 0.5b] [--step 64]

Prints the highs as a table and writes benchmarks/results/anneal_timeline_<size>.json (also when stopped with Ctrl-C).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import scale  # noqa: E402
from _machine import machine, proc_status  # noqa: E402

from hf_decompose import DecomposedConfig, decompose_to_disk  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30


def _tensors(top: int = 6) -> tuple[int, list[tuple[str, int]]]:
    """Bytes of the CPU tensor storages Python can reach (each storage once), and the largest shapes."""
    seen, by_shape = set(), collections.Counter()
    # every object is referenced while they are listed: the GIL is held until the list is gone, or a tuple the annealing
    # thread is building from a generator (transformers' weight conversions) ends with two references and its resize fails
    interval = sys.getswitchinterval()
    sys.setswitchinterval(60.0)
    try:  # by type, not `isinstance`: that reads `__class__`, which some module proxies answer with a deprecation warning
        tensors = [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]
    finally:
        sys.setswitchinterval(interval)
    for obj in tensors:
        try:
            if obj.device.type != "cpu":
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - meta tensors, tensor subclasses without storage
            continue
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        by_shape[f"{tuple(obj.shape)} {str(obj.dtype).removeprefix('torch.')}"] += storage.nbytes()
    return sum(by_shape.values()), by_shape.most_common(top)


def _stacks(skip: int) -> list[list[str]]:
    """Each thread's innermost hf_decompose and transformers frames (innermost first), the sampler's own left out."""
    out = []
    for ident, frame in sys._current_frames().items():
        if ident == skip:
            continue
        frames = [f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack(frame)]
        ours = [f for f in reversed(frames) if f.startswith(("hf_decompose/", "parts/", "transformers/", "llama/", "modules/"))]
        if ours:
            out.append(ours[:6])
    return out


class Sampler(threading.Thread):
    def __init__(self, step_bytes: int):
        super().__init__(daemon=True)
        self.step, self.highs, self.done, self.t0 = step_bytes, [], threading.Event(), time.perf_counter()

    def run(self) -> None:
        high = 0
        while not self.done.wait(0.02):
            status = proc_status("VmRSS", "RssAnon", "RssFile")
            if status["VmRSS"] < high + self.step:
                continue
            high = status["VmRSS"]
            reachable, largest = _tensors()
            self.highs.append({"seconds": round(time.perf_counter() - self.t0, 1), "rss": status["VmRSS"], "anon": status["RssAnon"],
                               "file": status["RssFile"], "tensors": reachable, "largest": largest, "stacks": _stacks(self.ident)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="0.5b", choices=list(scale.SIZES | scale.MOE_SIZES))
    parser.add_argument("--step", type=int, default=64, help="MiB above the last recorded high before the next is recorded")
    args = parser.parse_args()
    base_dir, ft_dir = scale.build(args.size)
    checkpoint = sum(f.stat().st_size for f in ft_dir.glob("*.safetensors"))
    sampler = Sampler(args.step * 2**20)
    sampler.start()
    finished = False
    try:
        with tempfile.TemporaryDirectory() as tmp:
            decompose_to_disk(ft_dir, base_dir, DecomposedConfig(mode="anneal"), output_dir=f"{tmp}/artifact", progress=True)
        finished = True
    except KeyboardInterrupt:  # a long run stopped by hand: what was sampled is still reported
        pass
    sampler.done.set()
    sampler.join()
    seconds, peak = time.perf_counter() - sampler.t0, proc_status("VmHWM")["VmHWM"]
    print(f"\nsynthetic-llama-{args.size}: one checkpoint {checkpoint / GIB:.2f} GiB; anneal {'' if finished else 'stopped after '}{seconds:.0f} s, "
          f"peak RSS (VmHWM) {peak / GIB:.2f} GiB = {peak / checkpoint:.2f}x one checkpoint\n")
    print("| s | RSS GiB | x ckpt | anon | file | tensors | where (innermost frame of each busy thread) |\n| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for h in sampler.highs:
        where = "; ".join(s[0] for s in h["stacks"])
        print(f"| {h['seconds']} | {h['rss'] / GIB:.2f} | {h['rss'] / checkpoint:.2f} | {h['anon'] / GIB:.2f} | {h['file'] / GIB:.2f} | "
              f"{h['tensors'] / GIB:.2f} | {where} |")
    out = RESULTS / f"anneal_timeline_{args.size}.json"
    out.write_text(json.dumps({"synthetic": True, "size": args.size, "checkpoint_bytes": checkpoint, "finished": finished, "seconds": seconds, "peak_rss_bytes": peak,
                               "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "highs": sampler.highs},
                              indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
