"""A mixture of experts' fine-tune, annealed and served by name: bits per delta parameter, the three grades on the
held-out prompts, memory a fine-tune adds and decode-step time, with its experts as substructures
(`experts.TenantExperts`) against held whole (the runtime before it, `multi.TenantParameters`: a copy of every
changed expert).

No mixture of experts is reachable from this project's machines, so the pair is the default pair **upcycled** (as
sparse upcycling makes an MoE from a dense model): each layer's MLP becomes ``--experts`` copies behind a seeded random
router choosing ``--top-k`` (normalized weights: the MoE base computes the dense base's function), for the base and
the fine-tune alike, so every expert's delta is the dense MLP's delta and the router is unchanged. Annealing weighs
each expert by the tokens the router sends it. Serving by name loads the one artifact under ``--names`` names (rows
routed to each, the same changes): memory per fine-tune and step times as for distinct fine-tunes of its size.

    python benchmarks/moe_finetunes.py                   # 4 experts, top 1: ~10 min on 2 CPU cores (the pair cached)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _bytes import resident_bytes  # noqa: E402
from _machine import machine  # noqa: E402
from decode_steps import Stepper, run  # noqa: E402

from hf_decompose import DecomposedConfig, DecomposedModel, decompose_to_disk, multi  # noqa: E402
from hf_decompose.equivalence import verify_equivalence  # noqa: E402
from hf_decompose.experts import TenantExperts  # noqa: E402
from hf_decompose.pair import cache_dir, prepare_default_pair  # noqa: E402
from hf_decompose.report import bits_per_param, stored_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


def upcycle(dense: Path, out: Path, experts: int, top_k: int) -> Path:
    """The dense Llama checkpoint `dense` as a Mixtral: each MLP copied into every expert, a router drawn from seed 0."""
    from transformers import MixtralConfig, MixtralForCausalLM

    if (out / "config.json").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    c = model.config
    config = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                           num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                           num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
                           max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps, rope_parameters=c.rope_parameters,
                           tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                           pad_token_id=c.pad_token_id, num_local_experts=experts, num_experts_per_tok=top_k, sliding_window=None,
                           output_router_logits=False)  # fmt: skip
    moe = MixtralForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    dense_state = model.state_dict()
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if ".mlp." not in name:
                p.copy_(dense_state[name])
        for i, layer in enumerate(moe.model.layers):
            mlp = model.model.layers[i].mlp
            block = layer.mlp
            block.gate.weight.copy_(torch.randn(block.gate.weight.shape, generator=gen) * c.hidden_size**-0.5)
            block.experts.gate_up_proj.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).expand_as(block.experts.gate_up_proj))
            block.experts.down_proj.copy_(mlp.down_proj.weight.expand_as(block.experts.down_proj))
    moe.to(next(model.parameters()).dtype).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (dense / name).is_file():
            (out / name).write_bytes((dense / name).read_bytes())
    return out


def experts_bytes(model: torch.nn.Module) -> int:
    """Bytes the fine-tunes' changes to the experts modules hold."""
    wrappers = (TenantExperts, multi.TenantParameters)
    held = [m.tenants for m in model.modules() if isinstance(m, wrappers) and hasattr(m.base, "gate_up_proj")]
    return sum(t.nbytes for tenants in held for t in (*tenants.parameters(), *tenants.buffers()))  # a compact part's codes are not in its state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--names", type=int, default=4)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS / "moe_finetunes.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pair = prepare_default_pair()
    root = cache_dir() / "benchmarks" / f"moe-upcycled-{args.experts}x-top{args.top_k}"
    base, finetuned = (upcycle(d, root / d.name, args.experts, args.top_k) for d in (pair.base, pair.finetuned))
    artifact = root / "anneal"
    t0 = time.perf_counter()
    if not (artifact / "decomposition.json").is_file():
        decompose_to_disk(finetuned, base, DecomposedConfig(mode="anneal"), output_dir=artifact, overwrite=True, calibration=pair.calib_prompts)
    anneal_s = time.perf_counter() - t0
    report = json.loads((artifact / "decomposition.json").read_text())
    reference = AutoModelForCausalLM.from_pretrained(finetuned, dtype=torch.float32).eval()
    alone = DecomposedModel.from_pretrained(artifact, dtype=torch.float32).eval()
    result = verify_equivalence(reference, alone, AutoTokenizer.from_pretrained(finetuned), pair.eval_prompts, max_new_tokens=64)
    grades = {"identical": result.identical, "tie": round(result.tie_equivalent_rate * result.num_prompts), "vllm": round(result.logprobs_close_rate * result.num_prompts),
              "prompts": result.num_prompts, "mean_kl": result.mean_kl}  # fmt: skip
    del reference
    names = [f"ft{i}" for i in range(args.names)]
    as_parts = DecomposedModel.from_pretrained(dict.fromkeys(names, artifact), dtype=torch.float32).eval()
    interface = multi.interface
    multi.interface = lambda module: None  # the runtime before `TenantExperts`: changed experts held whole
    try:
        whole = DecomposedModel.from_pretrained(dict.fromkeys(names, artifact), dtype=torch.float32).eval()
    finally:
        multi.interface = interface
    base_bytes = resident_bytes(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    ids = torch.randint(10, 40000, (args.names, 16), generator=torch.Generator().manual_seed(0))
    times = run({
        "alone_b1": Stepper(alone, ids[:1]),
        "parts_active_b1": Stepper(as_parts, ids[:1], before=lambda: as_parts.set_active(names[0])),
        "whole_active_b1": Stepper(whole, ids[:1], before=lambda: whole.set_active(names[0])),
        "parts_mixed": Stepper(as_parts, ids, before=lambda: as_parts.set_active(None), decomposed_names=names),
        "whole_mixed": Stepper(whole, ids, before=lambda: whole.set_active(None), decomposed_names=names),
    }, args.steps)  # fmt: skip
    ms = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "model": f"the default pair upcycled to a Mixtral of {args.experts} experts (top {args.top_k}); its fine-tune annealed (tie target)",
        "device": machine(), "threads": args.threads, "steps": args.steps,
        "anneal_s": anneal_s if anneal_s > 1 else None,
        "bits_per_delta_parameter": bits_per_param(stored_bytes(report), report["delta_params"]), "stored_fraction": report["stored_fraction"],
        "artifact_bytes": stored_bytes(report), "finetune_bytes": report["size_bytes"]["finetuned"],
        "grades": grades,
        "base_resident_bytes": base_bytes,
        "per_finetune_resident_bytes": {"parts": (resident_bytes(as_parts) - base_bytes) / args.names,
                                        "whole": (resident_bytes(whole) - base_bytes) / args.names},
        "per_finetune_experts_bytes": {"parts": experts_bytes(as_parts) / args.names, "whole": experts_bytes(whole) / args.names},
        "ms": ms,
        "ratios": {"parts_active_b1 / alone_b1": ms["parts_active_b1"] / ms["alone_b1"],
                   "whole_active_b1 / alone_b1": ms["whole_active_b1"] / ms["alone_b1"],
                   "parts_mixed / separate": ms["parts_mixed"] / (args.names * ms["alone_b1"]),
                   "whole_mixed / separate": ms["whole_mixed"] / (args.names * ms["alone_b1"])},
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(res, indent=2))
    print(table(res))


def table(res: dict) -> str:
    mib = 2**20
    per, experts = res["per_finetune_resident_bytes"], res["per_finetune_experts_bytes"]
    lines = [f"{res['model']}; {res['device']['cpu']}, {res['threads']} threads", "",
             f"artifact: {res['bits_per_delta_parameter']:.2f} bits per delta parameter, {100 * res['stored_fraction']:.2f}% of the float32 delta, "
             f"{res['artifact_bytes'] / mib:.1f} MiB (the fine-tune: {res['finetune_bytes'] / mib:.1f} MiB); held-out prompts, 64 tokens: "
             "{identical} / {prompts} identical, {tie} tie, {vllm} vLLM, mean KL {mean_kl:.2g}".format(**res["grades"]), "",
             "| runtime | resident per fine-tune | of it experts | active, batch 1 / the fine-tune alone | mixed batch / separate models |",
             "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for kind, label in (("parts", "experts as parts (TenantExperts)"), ("whole", "experts held whole (before)")):
        lines.append(f"| {label} | {per[kind] / mib:.2f} MiB | {experts[kind] / mib:.2f} MiB | {res['ratios'][f'{kind}_active_b1 / alone_b1']:.2f}x "
                     f"| {res['ratios'][f'{kind}_mixed / separate']:.2f}x |")  # fmt: skip
    lines += ["", "ms a step: " + ", ".join(f"{k} {v:.1f}" for k, v in res["ms"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
