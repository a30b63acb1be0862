"""Ground truth for the criterion: a small byte-level Llama trained here from a saved initialization.

init -> pretrain (Shakespeare, some modules frozen) -> four fine-tune regimes (Milton, lower-cased so
that capital letters are never seen): full, partial (frozen layers), merged LoRA, longer with weight
decay. Every step records which entries ever received a non-zero gradient; the criterion's p-values
are then scored against that support (precision / recall per q, ROC AUC), and `decompose` reports
what it keeps of each regime.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from scipy import stats
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_decompose import DecomposedConfig, decompose
from hf_decompose.criterion import assess_layer
from hf_decompose.groups import Geometry, describe
from hf_decompose.metrics import load_generation_equivalence
from hf_decompose.substructures import layer_components

QS = (0.001, 0.01, 0.05, 0.2)
CONFIG = dict(
    vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.02,
)  # fmt: skip
PRETRAIN_FROZEN = ("layers.2.mlp.", "layers.1.self_attn.k_proj", "layers.1.self_attn.v_proj")
PARTIAL_FROZEN = ("embed_tokens", "layers.0.", "layers.1.")
LORA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("ascii", "ignore")), dtype=torch.long)


def new_model(seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG)).float()


def train(model, ids: torch.Tensor, steps: int, *, lr: float, weight_decay: float = 0.0, frozen: tuple[str, ...] = (),
          only: str = "", batch: int = 16, seq: int = 64, seed: int = 0, snapshots: tuple[int, ...] = ()) -> dict[int, tuple[dict, dict]]:
    """AdamW on random windows of the parameters whose names contain `only` and none of `frozen`;
    returns {step: (state_dict, ever-nonzero-gradient masks)} at `snapshots` and at the end."""
    for name, p in model.named_parameters():
        p.requires_grad_(only in name and not any(f in name for f in frozen))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ever = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    model.train()
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(ids) - seq, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seq] for s in starts.tolist()])
        model(input_ids=x, labels=x).loss.backward()
        for n, p in params.items():
            ever[n] |= p.grad != 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step in snapshots or step == steps:
            out[step] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, {k: v.clone() for k, v in ever.items()})
    model.eval()
    return out


def train_lora(model, ids: torch.Tensor, steps: int, lr: float, seed: int = 0) -> dict:
    """Train a PEFT LoRA adapter (rank 4) on `model` (modified in place) and return the merged weights."""
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS))
    train(peft_model, ids, steps, lr=lr, only="lora_", seed=seed)
    return {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


def _scores_and_support(tests: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per tensor: -log10 of the smaller of each entry's entry and group p-values, and the support the
    criterion keeps (its entry mask, or the whole matrix when supported singular directions are kept)."""
    out = {}
    for name, t in tests.items():
        r = t.residual.double().numpy()
        # no noise scale (most of the delta exactly 0): the criterion keeps every non-zero entry
        p = 2 * stats.norm.sf(np.abs(r) / t.sigma) if t.sigma > 0 else np.where(r != 0, 0.0, 1.0)
        if t.group_pvalues is not None:
            p = np.minimum(p, t.group_pvalues[:, None] if t.info.group_axis == 0 else t.group_pvalues[None, :])
        kept = t.mask.numpy() | bool(t.spectral is not None and t.spectral.rank > 0)
        out[name] = (-np.log10(np.clip(p, 1e-300, 1.0)), kept)
    return out


def assess(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor] | None, q: float, spectral: bool) -> dict:
    """The engine's criterion on every 2-D tensor, layer by layer; `reference=None` is the init null."""
    geometry = Geometry.from_config(CONFIG)
    config = DecomposedConfig(mode="criterion", q=q, spectral_test=spectral, null="init" if reference is None else "reference")
    layers: dict[str, dict] = {}
    for name, w in weights.items():
        if w.dim() == 2:
            info = describe(name, tuple(w.shape), "llama")
            delta = w if reference is None else w - reference[name]
            layers.setdefault(info.layer or name, {})[name] = (info, delta)
    tests = {}
    for tensors in layers.values():
        tests |= assess_layer(tensors, config, geometry, init_sigma=CONFIG["initializer_range"] if reference is None else None)
    return _scores_and_support(tests)


def auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties counted half)."""
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = stats.rankdata(scores)
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def support_recovery(weights: dict, reference: dict | None, truth: dict[str, torch.Tensor]) -> dict:
    """Precision and recall per q with and without the spectral test; ROC AUC of the entry / group p-values."""
    names = sorted(n for n, w in weights.items() if w.dim() == 2)
    t = np.concatenate([truth[n].numpy().ravel() for n in names])
    out = {"entries": int(t.size), "truly_supported_fraction": float(t.mean())}
    if reference is not None:  # Adam steps below float32 resolution: a gradient, but the weight never changed
        same = np.concatenate([(weights[n] == reference[n]).numpy().ravel() for n in names])
        out["supported_but_unchanged_fraction"] = float((t & same).sum() / max(int(t.sum()), 1))
    for label, spectral in (("criterion", True), ("entry+group", False)):
        rows = {}
        for q in QS:
            res = assess(weights, reference, q, spectral)
            kept = np.concatenate([res[n][1].ravel() for n in names])
            tp = int((kept & t).sum())
            rows[str(q)] = {"kept_fraction": float(kept.mean()), "precision": tp / max(int(kept.sum()), 1), "recall": tp / max(int(t.sum()), 1)}
        out[label] = rows
    # p-values do not depend on q; with the spectral test off they are those of the delta itself
    out["roc_auc"] = auc(np.concatenate([res[n][0].ravel() for n in names]), t)
    return out


def save(state: dict, directory: Path) -> Path:
    model = new_model()
    model.load_state_dict(state)
    model.save_pretrained(directory)
    return directory


@torch.no_grad()
def equivalence(reference, candidate, prompts: torch.Tensor, new_tokens: int = 32) -> dict:
    """Greedy continuations and teacher-forced logits of `candidate` against `reference`, via the evaluate metric."""
    mask = torch.ones_like(prompts)
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    ref = reference.generate(prompts, **kwargs)
    cand = candidate.generate(prompts, **kwargs)
    plen = prompts.shape[1]
    lr, lc = reference(input_ids=ref).logits[:, plen - 1 : -1], candidate(input_ids=ref).logits[:, plen - 1 : -1]
    return load_generation_equivalence().compute(
        predictions=cand[:, plen:].tolist(), references=ref[:, plen:].tolist(), reference_logits=list(lr.numpy()), candidate_logits=list(lc.numpy())
    )


def decomposition(base_state: dict, ft_state: dict, prompts: torch.Tensor, root: Path) -> dict:
    """`decompose(mode="criterion")` of one fine-tune: what it keeps, its substructures, and its generations."""
    base, ft = save(base_state, root / "base"), save(ft_state, root / "ft")
    model = decompose(ft, base, DecomposedConfig(mode="criterion"), progress=False)
    geometry = Geometry.from_config(CONFIG)
    per_layer = {}
    for layer in model.report["layers"]:
        if not layer["name"].startswith("model.layers."):
            continue
        members = {n: (describe(n, d.shape, "llama"), d) for n, d in model.deltas.items() if n.startswith(layer["name"] + ".")}
        sizes = [c["hidden"] + c["units"] for c in layer_components(members, geometry)]
        per_layer[layer["name"]] = {"substructures": layer["num_substructures"], "spectral_rank": layer["spectral_rank"],
                                    "component_sizes": sizes, "kept_fraction": layer["kept_fraction"]}  # fmt: skip
    reference = new_model()
    reference.load_state_dict(ft_state)
    tensors = [s for layer in model.report["layers"] for s in (layer.get("tensors") or {}).values()]
    return {
        "kept_fraction": model.report["kept_fraction"],
        "supported_entries_fraction": sum(s["supported_entries"] for s in tensors) / sum(s["entries"] for s in tensors),
        "num_substructures": model.report["num_substructures"],
        "spectral_rank": sum(layer["spectral_rank"] for layer in model.report["layers"]),
        "layers": per_layer,
        "equivalence": equivalence(reference.eval(), model.eval(), prompts),
    }


def zeroed_generation(state: dict, prompts: torch.Tensor) -> dict:
    """Zero every 2-D entry the init-null criterion (q = 0.05) calls unsupported; compare generations."""
    res = assess(state, None, 0.05, spectral=False)
    pruned = {n: torch.from_numpy(res[n][1]).float() * w if n in res else w for n, w in state.items()}
    reference, candidate = new_model(), new_model()
    reference.load_state_dict(state)
    candidate.load_state_dict(pruned)
    eq = equivalence(reference.eval(), candidate.eval(), prompts)
    return {"removed_fraction": 1 - float(np.mean(np.concatenate([r[1].ravel() for r in res.values()]))), "equivalence": eq}


def run(texts: dict[str, str], pretrain_steps: int = 400, ft_steps: int = 200, long_steps: int = 800) -> dict:
    """All ground-truth regimes and the training-length series; returns JSON-ready results."""
    t0 = time.perf_counter()
    pre_ids = encode("\n".join(texts[n] for n in ("hamlet", "macbeth", "lear", "othello")))
    ft_ids = encode(texts["paradise_lost_(no_introduction)"].lower())
    held = encode(texts["paradise_regained"].lower())
    prompts = torch.stack([held[i : i + 48] for i in range(0, 8 * 4000, 4000)])
    model = new_model()
    pretrained, ever_pre = train(model, pre_ids, pretrain_steps, lr=3e-3, frozen=PRETRAIN_FROZEN)[pretrain_steps]
    timings = {"pretrain_s": time.perf_counter() - t0}
    results: dict = {"model": CONFIG, "steps": {"pretrain": pretrain_steps, "fine_tune": ft_steps, "long": long_steps}, "regimes": {}}
    results["regimes"]["pretrain vs init (null = N(0, 0.02^2))"] = {
        "support": support_recovery(pretrained, None, ever_pre),
        "zeroed_unsupported": zeroed_generation(pretrained, prompts),
    }
    lengths = sorted({ft_steps // 4, ft_steps, long_steps})
    model.load_state_dict(pretrained)
    full = train(model, ft_ids, long_steps, lr=1e-3, snapshots=tuple(lengths))
    model.load_state_dict(pretrained)
    partial = train(model, ft_ids, ft_steps, lr=1e-3, frozen=PARTIAL_FROZEN)[ft_steps]
    model.load_state_dict(pretrained)
    lora_state = train_lora(model, ft_ids, ft_steps, lr=3e-3)
    lora_truth = {n: w != pretrained[n] for n, w in lora_state.items()}
    model = new_model()
    model.load_state_dict(pretrained)
    long_wd = train(model, ft_ids, long_steps, lr=1e-3, weight_decay=0.1)[long_steps]
    timings["fine_tunes_s"] = time.perf_counter() - t0 - timings["pretrain_s"]
    regimes = {
        f"full fine-tune ({ft_steps} steps)": full[ft_steps],
        f"partial fine-tune (layers 0-1 and embeddings frozen, {ft_steps} steps)": partial,
        f"merged LoRA (rank 4, {ft_steps} steps)": (lora_state, lora_truth),
        f"long fine-tune with weight decay 0.1 ({long_steps} steps)": long_wd,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, (state, truth)) in enumerate(regimes.items()):
            results["regimes"][label] = {
                "support": support_recovery(state, pretrained, truth),
                "decomposition": decomposition(pretrained, state, prompts, Path(tmp) / f"r{i}"),
            }
        full_label = next(iter(regimes))
        results["training_length"] = {
            str(n): results["regimes"][full_label]["decomposition"] if n == ft_steps
            else decomposition(pretrained, full[n][0], prompts, Path(tmp) / f"len{n}")
            for n in lengths
        }  # fmt: skip
    timings["criterion_and_decompose_s"] = time.perf_counter() - t0 - timings["pretrain_s"] - timings["fine_tunes_s"]
    results["timings"] = timings
    return results
