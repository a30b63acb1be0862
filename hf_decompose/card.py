"""The model card of a decomposed artifact, rendered from the packaged `templates/model_card.md`.

The template is plain Markdown with ``${placeholders}`` (`string.Template`); the YAML metadata
block carries ``base_model``, ``base_model_relation``, ``library_name: hf_decompose``, tags and
the fine-tune's license when known.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from string import Template

import yaml

from .errors import DecomposeError
from .report import bits_per_param, floor_rows, stored_bytes

TEMPLATE = ("templates", "model_card.md")


def card_template() -> str:
    """The card template shipped inside the package; a missing one is a broken install, never skipped."""
    path = resources.files(__package__)
    for part in TEMPLATE:
        path = path / part
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError) as err:
        raise DecomposeError(f"the model-card template {path} is missing from the installed hf_decompose package; reinstall hf-decompose") from err


def render_card(index: dict, report: dict, source_dir: str | Path | None = None, repo_id: str | None = None, tags: list[str] | None = None) -> str:
    """The README.md of an artifact: metadata, how to load it, equivalence, structure and size."""
    base, finetuned = index.get("base_model", {}), index.get("finetuned_model", {})
    mode = index.get("config", {}).get("mode", report.get("mode", "lossless"))
    metadata: dict = {}
    if _is_repo_id(base.get("id")):
        metadata.update(base_model=base["id"], base_model_relation="adapter")
    metadata.update(library_name="hf_decompose", pipeline_tag="text-generation")
    metadata["tags"] = list(dict.fromkeys(["hf_decompose", "decomposed", f"decomposition-{mode}", *(tags or [])]))
    if license_ := find_license(source_dir):
        metadata["license"] = license_
    return Template(card_template()).safe_substitute(
        metadata=yaml.safe_dump(metadata, sort_keys=False).strip(),
        title=f"{_name(repo_id or finetuned.get('id'))} (decomposed)",
        finetuned=finetuned["id"] if _is_repo_id(finetuned.get("id")) else _name(finetuned.get("id") or "the fine-tuned model"),
        base=_base(base),
        base_revision=base.get("revision") or "unpinned",
        mode=mode,
        repo_id=repo_id or "path/to/artifact",
        equivalence=_equivalence(report.get("equivalence"), report.get("noise_floor")),
        structure=_structure(report, index),
        layers=_layers(report.get("layers", [])),
        size=_size(report.get("size_bytes", {})),
    )


def find_license(source_dir: str | Path | None) -> str | None:
    """The license in a directory's README.md metadata, else in its config.json."""
    if source_dir is None:
        return None
    source = Path(source_dir)
    readme = source / "README.md"
    if readme.is_file():
        text = readme.read_text(errors="replace")
        if text.startswith("---"):
            try:
                meta = yaml.safe_load(text.split("---", 2)[1]) or {}
            except (yaml.YAMLError, IndexError):
                meta = {}
            if isinstance(meta, dict) and isinstance(meta.get("license"), str):
                return meta["license"]
    try:
        value = json.loads((source / "config.json").read_text()).get("license")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _base(base: dict) -> str:
    """The base as the card names it: a Hub id, or why there is none (a local checkpoint; its path stays unsaid)."""
    if _is_repo_id(base.get("id")):
        return base["id"]
    digest = next(iter(sorted((base.get("sha256") or {}).values())), "")
    return (
        f"{_name(base.get('id'))}, a local checkpoint (not on the Hub, so this card names no `base_model`: load with "
        f"`base_model=` pointing at a copy whose weight files match the recorded SHA-256 {digest[:12]}...)"
    )


def _is_repo_id(value) -> bool:
    if not isinstance(value, str) or value.startswith(("/", ".", "~")) or Path(value).exists():
        return False
    parts = value.split("/")
    return 1 <= len(parts) <= 2 and all(parts)


def _name(value) -> str:
    return str(value).rstrip("/").split("/")[-1] if value else "Decomposed model"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _equivalence(eq: dict | None, floor: dict | None = None) -> str:
    if not eq:
        return "Not measured for this upload (run `hf-decompose verify DIR --prompts PROMPTS` and push again)."
    n = eq["num_prompts"]
    rows = [
        ("greedy `generate()` identical", f"{round(eq['exact_match_rate'] * n)} / {n} held-out prompts x {eq['max_new_tokens']} new tokens"),
        ("max abs logit difference", f"{eq['max_abs_logit_diff']:.3g}"),
        ("mean KL(fine-tune || decomposed)", f"{eq['mean_kl']:.3g}"),
        ("top-1 agreement", f"{eq['top1_agreement']:.2%}"),
        ("perplexity, fine-tune -> decomposed", f"{eq['perplexity_reference']:.3f} -> {eq['perplexity_candidate']:.3f}"),
    ]
    if "tie_equivalent_rate" in eq:
        rows[1:1] = [
            (f"tie-equivalent (identical, or first divergence at a fine-tune margin < {eq['tie_tolerance']:g} logits, top-2 swapped)",
             f"{round(eq['tie_equivalent_rate'] * n)} / {n}"),
            ("vLLM `check_logprobs_close` (at the first divergence each token in the other's top 5)", f"{round(eq['logprobs_close_rate'] * n)} / {n}"),
        ]
    text = _table(("metric", "value"), rows)
    if floor:
        text += ("\n\nThe noise floor: the fine-tune against itself as deployments serve it, on the same prompts.\n\n"
                 + _table(("model", "identical", "tie-equivalent", "vLLM-close", "mean KL", "setting"), [
                     (label, str(round(r["exact_match_rate"] * r["num_prompts"])), str(round(r.get("tie_equivalent_rate", 0) * r["num_prompts"])),
                      str(round(r.get("logprobs_close_rate", 0) * r["num_prompts"])), f"{r['mean_kl']:.2g}", r.get("setting", "this artifact"))
                     for label, r in floor_rows(eq, floor)]))
    return text


def _structure(report: dict, index: dict) -> str:
    stored, params = stored_bytes(report), report.get("delta_params", 0)
    rows = [
        ("bits per delta parameter", f"{bits_per_param(stored, params):.2f} (32 for the delta in float32)"),
        ("stored bytes", f"{stored:,} ({_mib(stored)}) for {params:,} delta parameters"),
        ("stored bytes / float32 delta bytes", f"{report.get('stored_fraction', report.get('kept_fraction', 0)):.2%}"),
        ("mode", f"`{report.get('mode', index.get('config', {}).get('mode'))}`"),
        *([] if report.get("mode") == "anneal" else [("delta entries in the support (the rest exactly zero)", f"{report.get('kept_fraction', 0):.4%}")]),
        ("substructures", f"{report.get('num_substructures', 0):,}"),
        ("execution", f"`{index.get('config', {}).get('execution', 'merged')}`"),
    ]
    return _table(("quantity", "value"), rows)


def _layers(layers: list[dict]) -> str:
    if not layers:
        return ""
    rows = []
    for layer in layers:
        largest = layer.get("largest_substructure") or {}
        shape = " x ".join(f"{v} {k}" for k, v in largest.items()) if largest else "-"
        stored = layer.get("stored_bytes", 4 * layer["kept_params"])
        rows.append((f"`{layer['name']}`", f"{bits_per_param(stored, layer['delta_params']):.2f}", _mib(stored), str(layer["num_substructures"]),
                     str(layer["spectral_rank"]), shape))
    return _table(("layer", "bits per delta parameter", "stored", "substructures", "spectral rank", "largest substructure"), rows)


def _size(size: dict) -> str:
    artifact, finetuned = size.get("artifact", 0), size.get("finetuned", 0)
    rows = [("decomposition (this repo's weights)", _mib(artifact)), ("fine-tuned checkpoint", _mib(finetuned))]
    if size.get("base"):
        rows.append(("base checkpoint (pulled, not stored here)", _mib(size["base"])))
    if artifact and finetuned:
        change = f"{finetuned / artifact:.1f}x smaller" if artifact < finetuned else f"{artifact / finetuned:.2f}x larger"
        rows.append(("decomposition / fine-tune", f"{artifact / finetuned:.2%} ({change})"))
    return _table(("checkpoint", "size"), rows)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
