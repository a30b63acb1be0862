"""Llama 4's experts (every token once per expert, outside transformers' experts interface) annealed and served by
name through `experts.DenseExperts`, against the same code with the class unnamed in `experts.DENSE_EXPERTS`
(``as before``: annealing keeps those experts exact and a model serving fine-tunes by name holds them whole).

No Llama 4 checkpoint is reachable from this project's machines: the pair is SYNTHETIC, built from transformers' Llama 4
text config (random base; fine-tune = base + a rank-8 change of every matrix, every expert's, plus noise; bfloat16,
sharded; the default pair's tokenizer) and annealed at the top-1 target (a random model's margins are near-ties
everywhere, where the tie target keeps every layer exact). Memory a fine-tune adds served by name: the base's resident
bytes subtracted from the model's with the artifact loaded under one name (float32).

    python benchmarks/dense_experts.py          # both runs: ~2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _bytes import resident_bytes  # noqa: E402
from _machine import machine  # noqa: E402

from hf_decompose import DecomposedConfig, DecomposedModel, decompose_to_disk, experts  # noqa: E402
from hf_decompose.pair import cache_dir, prepare_default_pair  # noqa: E402
from hf_decompose.report import bits_per_param, stored_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = dict(hidden_size=256, intermediate_size=256, intermediate_size_mlp=512, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, num_local_experts=32, num_experts_per_tok=1, interleave_moe_layer_step=1,
              attention_chunk_size=64, no_rope_layers=[1, 1, 1, 0], tie_word_embeddings=True)  # fmt: skip
RANK, LOWRANK_SCALE, NOISE = 8, 4e-3, 1e-3


def build(root: Path) -> tuple[Path, Path]:
    """The cached (base, fine-tune) pair, built if missing (marked complete last)."""
    base_dir, ft_dir = root / "base", root / "finetuned"
    if (root / ".complete").is_file():
        return base_dir, ft_dir
    shutil.rmtree(root, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(prepare_default_pair().finetuned)
    config = AutoConfig.for_model("llama4_text", vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                  bos_token_id=tok.bos_token_id, **CONFIG)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    model.save_pretrained(base_dir, max_shard_size="20MB")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_((torch.randn(p.shape, generator=gen) * 5 * NOISE).to(p.dtype))
                continue
            for m in p.view(-1, *p.shape[-2:]):  # each expert's matrix of a 3-D parameter
                change = torch.randn(m.shape, generator=gen) * NOISE
                if "embed" not in name:
                    change += (torch.randn(m.shape[0], RANK, generator=gen) * (LOWRANK_SCALE / math.sqrt(RANK))) @ torch.randn(RANK, m.shape[1], generator=gen)
                m.add_(change.to(m.dtype))
    model.save_pretrained(ft_dir, max_shard_size="20MB")
    for d in (base_dir, ft_dir):
        tok.save_pretrained(d)
    (root / ".complete").touch()
    return base_dir, ft_dir


def run(base: Path, ft: Path, out: Path, as_before: bool) -> dict:
    """Anneal, then load the artifact by name; with `as_before`, the experts' class unnamed in `DENSE_EXPERTS`."""
    named = experts.DENSE_EXPERTS
    experts.DENSE_EXPERTS = () if as_before else named
    try:
        start = time.perf_counter()
        decompose_to_disk(ft, base, DecomposedConfig(mode="anneal", annealing={"target": "top1"}), output_dir=out, progress=False)
        seconds = time.perf_counter() - start
        report = json.loads((out / "decomposition.json").read_text())
        base_bytes = resident_bytes(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
        served = resident_bytes(DecomposedModel.from_pretrained({"a": out}, dtype=torch.float32)) - base_bytes
    finally:
        experts.DENSE_EXPERTS = named
    levels = {level["layer"]: level["level"] for level in report["annealing"]["levels"]}
    return {"runtime": "as before" if as_before else "DenseExperts", "anneal_s": seconds, "artifact_bytes": stored_bytes(report),
            "bits_per_delta_parameter": bits_per_param(stored_bytes(report), report["delta_params"]),
            "finetune_bytes": report["size_bytes"]["finetuned"], "served_by_name_bytes": served, "levels": levels}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=RESULTS / "dense_experts_synthetic_llama4.json")
    args = parser.parse_args()
    base, ft = build(cache_dir() / "benchmarks" / "synthetic-llama4-dense-experts")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(base, ft, Path(tmp) / name, name == "before") for name in ("before", "dense")]
    mib = 2**20
    print(f"SYNTHETIC Llama 4 ({CONFIG['num_hidden_layers']} layers of {CONFIG['num_local_experts']} experts of {CONFIG['intermediate_size']}, "
          f"hidden {CONFIG['hidden_size']}), top-1 target; the fine-tune: {rows[0]['finetune_bytes'] / mib:.1f} MiB")
    print("| runtime | artifact | bits / delta parameter | anneal | a fine-tune served by name adds |\n| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['runtime']} | {r['artifact_bytes'] / mib:.1f} MiB | {r['bits_per_delta_parameter']:.2f} | {r['anneal_s']:.1f} s | "
              f"{r['served_by_name_bytes'] / mib:.1f} MiB |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"synthetic": True, "config": CONFIG, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                       "rows": rows}, indent=2))  # fmt: skip
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
