"""The human side of a report: a short summary table, led by bits per delta parameter and stored bytes."""

from __future__ import annotations


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def stored_bytes(report: dict) -> int:
    """Bytes the artifact stores for the delta (its weights), from the report."""
    size = report.get("size_bytes", {})
    if "artifact" in size:
        return int(size["artifact"])
    return int(sum(layer.get("stored_bytes", 0) for layer in report.get("layers", [])))


def bits_per_param(stored: float, params: float) -> float:
    """Stored bits per delta parameter (32 for the delta in float32)."""
    return 8 * stored / params if params else 0.0


def grades_line(eq: dict) -> str:
    """'31 / 32 identical, 32 / 32 tie-equivalent (margin < 0.001), 32 / 32 vLLM-close (top 5)'."""
    n = eq["num_prompts"]
    parts = [f"{round(eq['exact_match_rate'] * n)} / {n} identical"]
    if "tie_equivalent_rate" in eq:
        parts.append(f"{round(eq['tie_equivalent_rate'] * n)} / {n} tie-equivalent (margin < {eq.get('tie_tolerance', 1e-3):g})")
        parts.append(f"{round(eq['logprobs_close_rate'] * n)} / {n} vLLM-close (top 5)")
    return ", ".join(parts)


def floor_rows(eq: dict, floor: dict) -> list[tuple[str, dict]]:
    """(label, equivalence) rows: the decomposed model, then each noise-floor variant."""
    return [("decomposed", eq), *((f"floor: {name}", row) for name, row in floor.items())]


def summary_table(report: dict) -> str:
    """A few lines a person reads after a run: how many bits, how big, does it generate the same."""
    size = report.get("size_bytes", {})
    eq = report.get("equivalence") or {}
    stored, params = stored_bytes(report), report.get("delta_params", 0)
    lines = [
        f"base       {report.get('base_model')}",
        f"fine-tune  {report.get('finetuned_model')}",
        f"mode       {report.get('mode')}" + (f", target {report['annealing']['target']}" if (report.get('annealing') or {}).get('target') else ""),
        f"stored     {bits_per_param(stored, params):.2f} bits per delta parameter: {_mib(stored)} for {params:,} delta parameters "
        f"({report.get('stored_fraction', 0):.2%} of the float32 delta), {report.get('num_substructures', 0)} substructures",
    ]
    if report.get("mode") != "anneal":  # entries of the support (in anneal mode low-rank factors and codes are not entries)
        rest = "exactly zero" if report.get("mode") == "lossless" else "removed as unsupported"
        lines.append(f"support    kept {report.get('kept_fraction', 0):.2%} of delta entries (the rest {rest})")
    artifact, finetuned = size.get("artifact", 0), size.get("finetuned", 0)
    ratio = f"{finetuned / artifact:.1f}x smaller" if 0 < artifact < finetuned else f"{artifact / max(finetuned, 1):.3f}x its size"
    lines.append(f"artifact   {_mib(artifact)} (fine-tune {_mib(finetuned)}, {ratio})")
    if eq:
        lines.append(
            f"generate   {grades_line(eq)} on {eq['num_prompts']} prompts x {eq['max_new_tokens']} tokens; "
            f"max |logit diff| {eq['max_abs_logit_diff']:.3g}, mean KL {eq['mean_kl']:.3g}, "
            f"perplexity {eq['perplexity_reference']:.2f} -> {eq['perplexity_candidate']:.2f}"
        )
    floor = report.get("noise_floor") or {}
    if eq and floor:
        lines.append(f"{'against the fine-tune':<34} {'identical':>9} {'tie':>5} {'vLLM':>5} {'mean KL':>9}  first-divergence margins")
        for label, row in floor_rows(eq, floor):
            n = row["num_prompts"]
            margins = sorted(m for m in row.get("divergence_margins", []) if m is not None)
            shown = ", ".join(f"{m:.2g}" for m in margins[:4]) + (" ..." if len(margins) > 4 else "") if margins else "-"
            lines.append(f"{label:<34} {round(row['exact_match_rate'] * n):>9} {round(row.get('tie_equivalent_rate', 0) * n):>5} "
                         f"{round(row.get('logprobs_close_rate', 0) * n):>5} {row['mean_kl']:>9.2g}  {shown}")
    layers = report.get("layers", [])
    if layers:
        lines.append(f"{'layer':<34} {'bits':>6} {'stored':>10} {'subs':>6} {'rank':>6}  largest")
        for layer in layers:
            largest = layer.get("largest_substructure") or {}
            shape = " x ".join(f"{v} {k}" for k, v in largest.items()) if largest else "-"
            bits = bits_per_param(layer.get("stored_bytes", 4 * layer["kept_params"]), layer["delta_params"])
            lines.append(f"{layer['name']:<34} {bits:>6.2f} {_mib(layer.get('stored_bytes', 4 * layer['kept_params'])):>10} "
                         f"{layer['num_substructures']:>6} {layer['spectral_rank']:>6}  {shape}")
    return "\n".join(lines)
