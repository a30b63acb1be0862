"""Which causal LM architectures the plugin decomposes and gives back: a sweep of transformers' decoder-only model types.

Each model type is built tiny and random (SYNTHETIC: transformers' own config shrunk to hidden 32, 2 layers, a few
experts; bfloat16, sharded; two fine-tunes = the base plus a structured change of every parameter), then checked:

* lossless: the decomposed model's parameters and logits are the fine-tune's, bit for bit (bfloat16);
* split:    the criterion's artifact run split gives merged's logits (float32, within 1e-4);
* by name:  both fine-tunes served by name: a batch of one gives its logits alone (float32, within 1e-4);
* mixed:    a batch mixing both and the base gives each row its own, or is refused by name;
* anneal:   annealed layer by layer (the guard run one decoder layer at a time) at the top-1 target on 4 calibration
            prompts; the artifact loaded whole passes the same guard against the fine-tune loaded whole (bfloat16),
            with the largest logit change the streaming guard reported (to 1e-2): the guard judged what ships.
            (Not greedy continuations: a tiny random model's top two logits are a bfloat16 step apart at many
            positions, where another shape of the same product picks the other.)

A cell is "ok", "refused" (an error of this plugin's naming what it does not support: nothing wrong is returned),
or "FAIL" (a wrong result, or another error). Model types whose tiny config transformers refuses are listed apart.
The architectures of `tests/test_architectures.py` run with their test configs; the others with `OVERRIDES`.

    python benchmarks/architectures.py                  # every type below: ~1 min on 2 CPU cores
    python benchmarks/architectures.py --types llama,gptj
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _machine import machine  # noqa: E402

from hf_decompose import DecomposeError, DecomposedConfig, DecomposedModel, decompose, decompose_to_disk  # noqa: E402
from hf_decompose import annealing  # noqa: E402
from tests.test_architectures import ARCHITECTURES, CALIBRATION, COMMON, TOKENIZER, _structured_change  # noqa: E402
from tests.test_dtypes import effective_state  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SMALL = dict(head_dim=8, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, moe_k=2,
             top_k=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, ffn_hidden_size=64, n_positions=64)  # fmt: skip
LINEAR = dict(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
              linear_value_head_dim=8)  # fmt: skip
MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, num_key_value_heads=4)
MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=4, mamba_n_groups=1, mamba_expand=2)
OVERRIDES = {
    "afmoe": {}, "apertus": {}, "arcee": {}, "bitnet": {}, "bloom": {}, "cohere": {}, "cohere2_moe": {}, "diffllama": {}, "doge": {},
    "ernie4_5": {}, "exaone": {}, "exaone4": {}, "exaone_moe": {}, "falcon_h1": {}, "flex_olmo": {}, "gemma": {}, "glm": {}, "glm4": {},
    "gpt_bigcode": {}, "granite_swa": {}, "granitemoe_swa": {}, "granitemoeshared": {}, "helium": {}, "internlm3": {}, "jetmoe": {},
    "mamba": {}, "minimax": {}, "ministral3": {}, "nanochat": {}, "nemotron": {}, "nemotron_h": {}, "olmo": {}, "olmo3": {},
    "olmo_hybrid": {}, "persimmon": {}, "phi": {}, "seed_oss": {}, "stablelm": {}, "starcoder2": {}, "vaultgemma": {}, "mimo_v2_flash": {},
    "solar_open": {},
    "qwen3_5_text": LINEAR, "qwen3_5_moe_text": LINEAR | {"shared_expert_intermediate_size": 32},
    "codegen": {"rotary_dim": 4, "n_ctx": 64}, "gptj": {"rotary_dim": 4},
    "deepseek_v2": MLA | {"num_experts_per_tok": 2}, "glm4_moe_lite": MLA, "minicpm3": MLA,
    "kimi_linear": MLA | {"q_lora_rank": None, "linear_attn_config": {"kda_layers": [1], "full_attn_layers": [2], "num_heads": 4, "head_dim": 8,
                                                                       "short_conv_kernel_size": 4}},
    "granitemoehybrid": MAMBA2 | {"layer_types": ["mamba", "attention"], "shared_intermediate_size": 64},
    "bamba": MAMBA2 | {"attn_layer_indices": [1]},
    "zamba2": {"layers_block_type": ["mamba", "hybrid"], "mamba_headdim": 16, "mamba_d_state": 4, "mamba_ngroups": 1, "n_mamba_heads": 4,
               "num_mem_blocks": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
}  # fmt: skip
CHECKS = ("lossless", "split", "by name", "mixed", "anneal")


def _config(model_type: str):
    """The tiny config of `model_type`: its test config, else transformers' with `COMMON`, `SMALL` where it has those
    fields, and `OVERRIDES`."""
    if model_type in ARCHITECTURES:
        return AutoConfig.for_model(model_type.split(":")[0], **COMMON | ARCHITECTURES[model_type])
    config = AutoConfig.for_model(model_type, **COMMON | OVERRIDES.get(model_type, {}))
    for key, value in SMALL.items():
        if key not in OVERRIDES.get(model_type, {}) and isinstance(getattr(config, key, None), int):
            setattr(config, key, value)
    return config


def _pair(root: Path, model_type: str) -> str:
    """The base and fine-tunes "a" and "b" of `model_type` under `root`; the model's class name."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(model_type)).to(torch.bfloat16).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for name, seed in (("base", None), ("a", 1), ("b", 2)):
        model.load_state_dict(base)
        if seed is not None:
            _structured_change(model, seed)
        model.save_pretrained(root / name, max_shard_size="50KB")
        TOKENIZER.save_pretrained(root / name)
    return type(model).__name__


def _check(run) -> str:
    try:
        return "ok" if run() else "FAIL: not the fine-tune's"
    except DecomposeError as err:
        return f"refused: {str(err)[:160]}"
    except Exception as err:  # noqa: BLE001 - a row of the table
        return f"FAIL: {type(err).__name__}: {str(err)[:160]}"


def sweep(model_type: str) -> dict:
    """The five checks of one model type, a row of the table."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            cls = _pair(root, model_type)
        except Exception as err:  # noqa: BLE001 - transformers refuses the tiny config
            return {"model_type": model_type, "config": f"{type(err).__name__}: {str(err)[:160]}"}
        row: dict = {"model_type": model_type, "class": cls}
        ids = torch.arange(2, 14)[None]
        artifacts: dict[str, Path] = {}

        def lossless() -> bool:
            artifacts.update({n: decompose_to_disk(root / n, root / "base", DecomposedConfig(mode="lossless"), output_dir=root / f"lossless-{n}",
                                                   progress=False) for n in ("a", "b")})  # fmt: skip
            model, reference = DecomposedModel.from_pretrained(artifacts["a"]).eval(), AutoModelForCausalLM.from_pretrained(root / "a").eval()
            got, want = effective_state(model), effective_state(reference)
            with torch.no_grad():
                return all(n in got and torch.equal(got[n], t) for n, t in want.items()) and torch.equal(model(input_ids=ids).logits,
                                                                                                      reference(input_ids=ids).logits)

        def split() -> bool:
            decompose(root / "a", root / "base", DecomposedConfig(mode="criterion"), progress=False).save_pretrained(root / "criterion")
            merged, split = (DecomposedModel.from_pretrained(root / "criterion", execution=e, dtype=torch.float32).eval() for e in ("merged", "split"))
            with torch.no_grad():
                return float((merged(input_ids=ids).logits - split(input_ids=ids).logits).abs().max()) < 1e-4

        served: dict = {}

        def by_name() -> bool:
            served["multi"] = DecomposedModel.from_pretrained(artifacts, dtype=torch.float32).eval()
            alone = {n: DecomposedModel.from_pretrained(p, dtype=torch.float32).eval() for n, p in artifacts.items()}
            alone[None] = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32).eval()
            with torch.no_grad():
                served["alone"] = {n: m(input_ids=ids).logits[0] for n, m in alone.items()}
                rows = served["multi"](input_ids=ids.repeat(3, 1), decomposed_names=["a"] * 3).logits
            return float((rows - served["alone"]["a"]).abs().max()) < 1e-4

        def mixed() -> bool:
            names = ["a", "b", None]
            with torch.no_grad():
                rows = served["multi"](input_ids=ids.repeat(3, 1), decomposed_names=names).logits
            return all(float((rows[i] - served["alone"][n]).abs().max()) < 1e-4 for i, n in enumerate(names))

        def anneal() -> bool:
            config = DecomposedConfig(mode="anneal", annealing={"target": "top1", "calibration_prompts": 4, "calibration_tokens": 4})
            out = decompose_to_disk(root / "a", root / "base", config, output_dir=root / "anneal", calibration=CALIBRATION, progress=False)
            report = json.loads((out / "decomposition.json").read_text())["annealing"]
            row["annealed groups"] = f"{sum(level['level'] is not None for level in report['levels'])} / {len(report['levels'])}"  # not all exact
            streamed = next((step["max_abs_logit_diff"] for step in reversed(report["trace"]) if step["accepted"]), 0.0)  # the artifact's state
            model, reference = DecomposedModel.from_pretrained(out).eval(), AutoModelForCausalLM.from_pretrained(root / "a").eval()
            accepted, stats = annealing.guard(model, annealing.calibrate(reference, TOKENIZER, CALIBRATION, 4), target="top1")
            row["anneal logit change"] = f"{streamed:.3g} streamed, {stats['max_abs_logit_diff']:.3g} loaded"
            return accepted and abs(stats["max_abs_logit_diff"] - streamed) <= 1e-2

        row["lossless"] = _check(lossless)
        row["split"] = _check(split)
        row["by name"] = _check(by_name) if artifacts else "FAIL: no artifacts"
        row["mixed"] = _check(mixed) if "alone" in served else row["by name"]
        row["anneal"] = _check(anneal)
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", default=",".join(dict.fromkeys([*ARCHITECTURES, *OVERRIDES])), help="comma-separated model types")
    parser.add_argument("--out", type=Path, default=RESULTS / "architectures.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    rows, t0 = [], time.perf_counter()
    for model_type in args.types.split(","):
        rows.append(sweep(model_type))
        row = rows[-1]
        cells = [*(row.get(c, "")[:9] for c in CHECKS), row.get("annealed groups", "")] if "config" not in row else ["(tiny config refused by transformers)"]
        print(f"{model_type:18s} {row.get('class', ''):34s} " + " ".join(f"{c:10s}" for c in cells), flush=True)
    counts = {c: {k: sum(r.get(c, "").startswith(k) for r in rows) for k in ("ok", "refused", "FAIL")} for c in CHECKS}
    print("\n" + "\n".join(f"{c:9s} " + ", ".join(f"{n} {k}" for k, n in v.items()) for c, v in counts.items()))
    for row in rows:
        for c in CHECKS:
            if row.get(c, "").startswith(("FAIL", "refused")):
                print(f"  {row['model_type']} {c}: {row[c]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"synthetic": True, "machine": machine(), "date": time.strftime("%Y-%m-%d"), "seconds": time.perf_counter() - t0,
                                    "counts": counts, "rows": rows}, indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
