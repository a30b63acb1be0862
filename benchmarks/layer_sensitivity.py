"""How each low-bit quantizer trades bits for flips, one decoder layer at a time.

The fine-tune runs in float32 with one layer's matrix deltas replaced by a quantizer's (the rest exact); the
guard's statistic on the calibration prompts (expected greedy flips over 2048 positions, `annealing.guard`) is
recorded beside the bits per delta parameter: the codes' entropy (what Huffman coding approaches), their scales
in bfloat16 and the bfloat16 low-rank factors. Quantizers: absmax scales per 64 (`int3g64`, `int2g64`: the former
ladder's) and step quantizers (`step<s>`: one scale per row, s x its RMS), with and without low rank and error feedback.
    flock /tmp/hf_decompose_bench.lock python benchmarks/layer_sensitivity.py [--recipe R] [--layers 5,29]
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from _machine import machine
from hf_decompose.annealing import GramCollector, _batch_logits, _scores, calibrate, rank_for, weighted_lowrank
from hf_decompose.pair import prepare_default_pair
from hf_decompose.quantize import dequantize, quantize_codes

RESULTS = Path(__file__).parent / "results"
# name: (bits, group, step, low-rank eps, error feedback)
QUANTIZERS = {
    "lr0.5+int3g64": (3, 64, None, 0.5, True), "lr0.5+int2g64": (2, 64, None, 0.5, True),
    "lr0.5+step0.8": (4, 0, 0.8, 0.5, True), "lr0.5+step1.2": (4, 0, 1.2, 0.5, True), "lr0.5+step1.5": (4, 0, 1.5, 0.5, True),
    "lr0.5+step1.7": (4, 0, 1.7, 0.5, True), "lr0.5+step2.4": (4, 0, 2.4, 0.5, True),
    "step1.7 (no low rank)": (4, 0, 1.7, None, True), "lr0.5+step1.7 (no error feedback)": (4, 0, 1.7, 0.5, False),
}


def entropy_bits(codes: torch.Tensor) -> float:
    _, counts = torch.unique(codes, return_counts=True)
    p = counts.double() / codes.numel()
    return float(-(p * p.log2()).sum()) * codes.numel()


def quantized(delta: torch.Tensor, gram: torch.Tensor, bits: int, group: int, step: float | None, eps: float | None, feedback: bool) -> tuple[torch.Tensor, float]:
    """The delta as the quantizer stores it (dense) and its bits."""
    u, v, s = weighted_lowrank(delta, gram)
    r = rank_for(s, eps, 0) if eps else 0
    u, v = u[:, :r].bfloat16().float(), v[:r].bfloat16().float()
    codes, scales = quantize_codes(delta - u @ v, bits, group, gram=gram if feedback else None, step=step)
    return u @ v + dequantize(codes, scales), entropy_bits(codes) + 16 * scales.numel() + 16 * r * sum(delta.shape)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=None)
    parser.add_argument("--layers", default="5")
    args = parser.parse_args()
    pair = prepare_default_pair(recipe=args.recipe)
    name = Path(args.recipe).stem if args.recipe else "default_pair"
    tokenizer = AutoTokenizer.from_pretrained(pair.finetuned)
    model = AutoModelForCausalLM.from_pretrained(pair.finetuned, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(pair.base, dtype=torch.float32).state_dict()
    calib = calibrate(model, tokenizer, pair.calib_prompts, 32)
    rows = []
    print(f"{'layer':>5}  {'quantizer':36s} {'bits':>5} {'flips':>7} {'above tol.':>10} {'mean KL':>8}")
    for index in (int(i) for i in args.layers.split(",")):
        linears = {n: m for n, m in model.model.layers[index].named_modules() if isinstance(m, torch.nn.Linear)}
        grams = GramCollector(linears).run(model, calib)
        exact = {n: m.weight.data.clone() for n, m in linears.items()}
        for quantizer, spec in QUANTIZERS.items():
            t0, bits, params = time.perf_counter(), 0.0, 0
            for n, m in linears.items():
                base_weight = base[f"model.layers.{index}.{n}.weight"]
                q, b = quantized(exact[n] - base_weight, grams[n], *spec)
                m.weight.data = base_weight + q
                bits, params = bits + b, params + q.numel()
            stats = _scores(calib, _batch_logits(model, calib.input_ids, calib.attention_mask, calib.prompt_len, 8), 2048, 1e-3)
            for n, m in linears.items():
                m.weight.data = exact[n]
            row = {"layer": index, "quantizer": quantizer, "bits_per_param": bits / params, "seconds": time.perf_counter() - t0,
                   **{k: stats[k] for k in ("expected_flips", "expected_flips_above_tolerance", "mean_kl")}}
            rows.append(row)
            print(f"{index:5d}  {quantizer:36s} {row['bits_per_param']:5.2f} {row['expected_flips']:7.3f} {row['expected_flips_above_tolerance']:10.4f} {row['mean_kl']:8.1e}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"layer_sensitivity_{name}.json").write_text(json.dumps({"pair": name, "machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
