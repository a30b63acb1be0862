"""Which compensation wins: plain rounding against error feedback, with and without kept directions.

Every matrix delta of the default pair is put at one annealing level (the whole model at once), with
``error_feedback`` off (round to nearest) and on (GPTQ-style, on the calibration Gram); the guard's
statistics on the calibration prompts say how safe each is (expected greedy flips over 2048 unseen
positions; the exact target accepts at most 0.5).

    python benchmarks/compensation.py [--levels int4g64,int3g64,lr0.5+int3g64]

Writes benchmarks/results/compensation.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine  # noqa: E402

from hf_decompose import DecomposedConfig, decompose  # noqa: E402
from hf_decompose.annealing import GramCollector, _Candidate, _install, _level_delta, calibrate, guard  # noqa: E402
from hf_decompose.config import Level  # noqa: E402
from hf_decompose.modules import DecomposedModule  # noqa: E402
from hf_decompose.pair import prepare_default_pair  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="int4g64,int3g64,lr0.5+int3g64")
    args = parser.parse_args()
    pair = prepare_default_pair()
    tok = AutoTokenizer.from_pretrained(pair.finetuned)
    model = decompose(pair.finetuned, pair.base, DecomposedConfig(mode="lossless"), progress=False)
    n_calib = DecomposedConfig().annealing["calibration_prompts"]
    calib = calibrate(model, tok, pair.calib_prompts[:n_calib], DecomposedConfig().annealing["calibration_tokens"])
    owners = {m.delta.name: n for n, m in model.model.named_modules() if isinstance(m, DecomposedModule) and m._tied is None and len(m.delta.shape) == 2}
    # a tied head weighs the embedding's delta by its own inputs (visited last, so it wins)
    weighers = {m.delta.name: n for n, m in model.model.named_modules() if isinstance(m, DecomposedModule) and len(m.delta.shape) == 2}
    grams = GramCollector({k: model.model.get_submodule(v) for k, v in weighers.items()}).run(model.model, calib)
    full = {k: model.model.get_submodule(v).delta for k, v in owners.items()}
    rows = []
    for feedback in (False, True):
        config = DecomposedConfig(mode="anneal", annealing={"error_feedback": feedback})
        cands = {k: _Candidate(full[k], grams.get(k), config) for k in owners}
        for spec in args.levels.split(","):
            t0 = time.perf_counter()
            chosen = {k: _level_delta(c, Level.parse(spec)) for k, c in cands.items()}
            seconds = time.perf_counter() - t0
            _install(model.model, chosen, owners)
            ok, stats = guard(model, calib)
            rows.append({"level": spec, "error_feedback": feedback, "bytes": sum(d.nbytes() for d in chosen.values()),
                         "accepted": ok, "quantize_s": seconds, **stats})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| level | bytes | plain rounding: expected flips | error feedback: expected flips |\n| --- | ---: | ---: | ---: |")
    for spec in args.levels.split(","):
        plain, fed = (next(r for r in rows if r["level"] == spec and r["error_feedback"] is f) for f in (False, True))
        print(f"| `{spec}` | {plain['bytes'] / 2**20:.1f} MiB | {plain['expected_flips']:.2f} | {fed['expected_flips']:.2f} |")
    out = Path(__file__).parent / "results" / "compensation.json"
    out.write_text(json.dumps({"machine": machine(), "calibration_prompts": n_calib, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
