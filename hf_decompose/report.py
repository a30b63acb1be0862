"""The human side of a report: a short summary table."""

from __future__ import annotations


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def summary_table(report: dict) -> str:
    """A few lines a person reads after a run: what was kept, how big, does it generate the same."""
    size = report.get("size_bytes", {})
    eq = report.get("equivalence") or {}
    lines = [
        f"base       {report.get('base_model')}",
        f"fine-tune  {report.get('finetuned_model')}",
        f"mode       {report.get('mode')}",
        f"kept       {report.get('kept_fraction', 0):.2%} of delta parameters, {report.get('num_substructures', 0)} substructures, "
        f"{report.get('stored_fraction', report.get('kept_fraction', 0)):.2%} of the float32 delta's bytes",
        f"artifact   {_mib(size.get('artifact', 0))} (fine-tune {_mib(size.get('finetuned', 0))}, "
        f"{size.get('finetuned', 0) / max(size.get('artifact', 1), 1):.1f}x smaller)",
    ]
    if eq:
        lines.append(
            f"generate   {eq['exact_match_rate']:.0%} identical on {eq['num_prompts']} prompts x {eq['max_new_tokens']} tokens; "
            f"max |logit diff| {eq['max_abs_logit_diff']:.3g}, mean KL {eq['mean_kl']:.3g}, "
            f"perplexity {eq['perplexity_reference']:.2f} -> {eq['perplexity_candidate']:.2f}"
        )
    layers = report.get("layers", [])
    if layers:
        lines.append(f"{'layer':<34} {'kept':>8} {'subs':>6} {'rank':>6}  largest")
        for layer in layers:
            largest = layer.get("largest_substructure") or {}
            shape = " x ".join(f"{v} {k}" for k, v in largest.items()) if largest else "-"
            lines.append(f"{layer['name']:<34} {layer['kept_fraction']:>8.2%} {layer['num_substructures']:>6} {layer['spectral_rank']:>6}  {shape}")
    return "\n".join(lines)
