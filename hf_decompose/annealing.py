"""Structural annealing: remove unsupported structure layer by layer while generate() stays equal.

Schedule. Transformer layers are annealed in model order (then the embedding / tied head), so a
later layer is compressed on the activations of the already-annealed earlier ones. A layer moves
through increasingly aggressive *levels* (the temperature, `config.Level`). A level has two axes
of one budget: how many activation-weighted singular directions of each matrix's delta are kept
exactly (``lr<eps>``: the fewest whose left-out weighted norm is at most eps), and in how many bits
the rest is stored (``int<bits>[g<group>]``: every remaining entry as a signed integer of that many
bits, one scale per group of inputs of a row). ``"int8"`` keeps every entry in 8 bits; ``"lr0.05"``
keeps directions only. With ``keep_supported`` the criterion's spectrally supported directions are
never dropped (a rank floor). The schedule first finds one temperature for the whole model
(bisection over the levels), then heats each layer further, in model order, while the guard holds.

Compensation. The directions are those of ``D L`` where ``L L^T = X^T X + damping`` is the Gram
of the matrix's calibration inputs: the kept factors are the least-squares optimum of
``||(D - U V) X^T||`` for their rank (activation-aware SVD), i.e. the refit of the kept structure
on the calibration Gram matrix, in closed form. What they leave is rounded column by column with
each rounding error pushed onto the columns still to come through ``(X^T X)^-1`` (``error_feedback``,
`quantize`): the output error, not the weight error, is what is minimised.

Guard. A level is accepted only if, on calibration prompts (disjoint from the evaluation prompts),
the target holds teacher-forced (`guard`). The default, ``tie``: every position keeps the reference's
greedy token or swaps a near-tie (reference margin below ``tie_tolerance``) with its runner-up, and
the margin criterion holds: the expected number of greedy flips at margins above the tolerance over
a budget of unseen positions, from the size of the changes of the top-1/top-2 logit gaps and the
density of small reference margins, stays below a bound. ``floor`` bounds the same expectation and
the mean KL by the fine-tune's own in bfloat16; ``exact`` anneals nothing. (A worst-case ratio over
calibration positions does not carry over: unseen prompts have their own near-ties.) A level that fails rolls the layer back to its last accepted level. Precision (bf16
storage of low-rank-only factors) is a last annealing step under the same guard.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from .config import DecomposedConfig, Level
from .allocation import gap_sensitivity, solve, weighted_error
from .criterion import spectral_test
from .equivalence import greedy_generate, load_prompts
from .errors import ConfigError, PromptError
from .metrics.generation_equivalence.generation_equivalence import TIE_TOLERANCE
from .modules import DecomposedModule
from .quantize import quantize
from .parts import FullQuantPart, LowRankPart, QuantPart, TensorDelta


@dataclass
class Calibration:
    """Reference continuations and logits of the fine-tuned model on the calibration prompts."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    top1: torch.Tensor  # (n, t) reference greedy tokens
    second: torch.Tensor  # (n, t) reference runner-up tokens
    margin: torch.Tensor  # (n, t) reference top-1 minus top-2 logit
    logits: torch.Tensor  # (n, t, vocab) reference logits at the continuation positions


@torch.no_grad()
def calibrate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8) -> Calibration:
    """Record what the (still exact) model generates and predicts on the calibration prompts."""
    cont = torch.stack(greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size))
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    ids = torch.cat([enc["input_ids"], cont], 1)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(cont)], 1)
    plen = enc["input_ids"].shape[1]
    logits = continuation_logits(model, ids, mask, plen, batch_size)
    top2 = logits.topk(2, dim=-1)
    return Calibration(ids, mask, plen, top2.indices[..., 0], top2.indices[..., 1], top2.values[..., 0] - top2.values[..., 1], logits)


@torch.no_grad()
def continuation_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, plen: int, batch_size: int) -> torch.Tensor:
    out, keep = [], ids.shape[1] - plen + 1  # the lm_head runs on the continuation positions only
    for s in range(0, ids.shape[0], batch_size):
        logits = model(input_ids=ids[s : s + batch_size], attention_mask=mask[s : s + batch_size], logits_to_keep=keep).logits
        out.append(logits[:, :-1].float())
    return torch.cat(out)


def expected_flips(calib: Calibration, logits: torch.Tensor, positions: int, tolerance: float = 0.0) -> float:
    """Expected greedy flips over `positions` unseen positions whose reference margin exceeds
    `tolerance` (the margin criterion; tolerance 0 counts every flip).

    A position of margin m flips when the change d of its top-1/top-2 gap exceeds m. With gap
    changes d ~ N(0, s^2) (s: RMS over the calibration positions) and reference margins of density
    f0 near zero (0.1 / the 10th-percentile margin), E[flips above t] = positions x f0 x E[(d - t)+]
    = positions x f0 x (s phi(t/s) - t (1 - Phi(t/s))), which is positions x f0 x s / sqrt(2 pi) at t = 0.
    """
    ref_gap = calib.margin
    top1 = logits.gather(-1, calib.top1[..., None])[..., 0]
    top2 = logits.gather(-1, calib.second[..., None])[..., 0]
    s = float(((top1 - top2) - ref_gap).square().mean().sqrt())
    f0 = 0.1 / max(float(ref_gap.flatten().quantile(0.1)), 1e-6)
    if s == 0.0:
        return 0.0
    z = tolerance / s
    tail = s * math.exp(-z * z / 2) / math.sqrt(2 * math.pi) - tolerance * 0.5 * math.erfc(z / math.sqrt(2))
    return positions * f0 * tail


def tie_equivalent(calib: Calibration, logits: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Per calibration position: the model's top-1 is the reference's, or the reference's margin
    is below `tolerance` and the two swapped their top-2 (a near-tie resolved the other way)."""
    top2 = logits.topk(2, dim=-1).indices
    swapped = (calib.margin < tolerance) & (top2[..., 0] == calib.second) & (top2[..., 1] == calib.top1)
    return (top2[..., 0] == calib.top1) | swapped


@dataclass
class Floor:
    """What serving the fine-tune in bfloat16 does on the calibration prompts: the floor target's bound."""

    expected_flips: float
    mean_kl: float


def kl_to(calib: Calibration, logits: torch.Tensor) -> float:
    """Mean KL(reference || model) over the calibration positions."""
    return float(torch.nn.functional.kl_div(logits.log_softmax(-1), calib.logits.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean())


@torch.no_grad()
def measure_floor(bf16_model: nn.Module, calib: Calibration, positions: int, tie_tolerance: float, batch_size: int = 8) -> Floor:
    """The floor target's bound from the fine-tune served in bfloat16 (`bf16_model`)."""
    logits = continuation_logits(bf16_model, calib.input_ids, calib.attention_mask, calib.prompt_len, batch_size)
    return Floor(expected_flips(calib, logits, positions, tie_tolerance), kl_to(calib, logits))


def guard(model: nn.Module, calib: Calibration, target: str = "tie", tolerance: float = 0.99, max_flips: float = 0.5,
          positions: int = 2048, batch_size: int = 8, tie_tolerance: float = TIE_TOLERANCE, floor: Floor | None = None) -> tuple[bool, dict]:
    """Judge the current model against the calibration reference (teacher-forced on its continuations).

    ``exact``: every logit identical (lossless). ``identical``: every calibration top-1 kept (greedy
    generation on the calibration prompts is then identical) and at most `max_flips` greedy flips
    expected over `positions` unseen positions. ``tie``: every position tie-equivalent
    (`tie_equivalent`, margin below `tie_tolerance`) and at most `max_flips` flips expected at
    margins above `tie_tolerance` (the fine-tune's fp32 deployment floor shows none). ``floor``: no
    more flips expected above `tie_tolerance` and no higher mean KL than `floor` (the fine-tune
    served in bfloat16). ``top1``: top-1 agreement >= `tolerance`; ``kl``: mean KL <= `tolerance`.
    """
    logits = continuation_logits(model, calib.input_ids, calib.attention_mask, calib.prompt_len, batch_size)
    agree = float((logits.argmax(-1) == calib.top1).float().mean())
    kl = kl_to(calib, logits)
    flips = expected_flips(calib, logits, positions)
    above = expected_flips(calib, logits, positions, tie_tolerance)
    tie = float(tie_equivalent(calib, logits, tie_tolerance).float().mean())
    max_diff = float((logits - calib.logits).abs().max())
    stats = {"top1_agreement": agree, "tie_agreement": tie, "expected_flips": flips, "expected_flips_above_tolerance": above,
             "max_abs_logit_diff": max_diff, "mean_kl": kl}
    if target == "exact":
        return max_diff == 0.0, stats
    if target == "identical":
        return agree == 1.0 and flips <= max_flips, stats
    if target == "tie":
        return tie == 1.0 and above <= max_flips, stats
    if target == "floor":
        if floor is None:
            raise ConfigError("the floor target needs the bfloat16 floor measured on the calibration prompts (`measure_floor`)")
        return above <= floor.expected_flips and kl <= floor.mean_kl, stats
    if target == "top1":
        return agree >= tolerance, stats
    return kl <= tolerance, stats


class GramCollector:
    """Accumulate X^T X of the inputs of chosen modules over non-padding positions."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.grams: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach().float()
            if isinstance(module, nn.Embedding) or (isinstance(module, DecomposedModule) and isinstance(module.base, nn.Embedding)):
                return
            x = x[self.mask.bool()] if self.mask is not None and x.shape[:2] == self.mask.shape else x.reshape(-1, x.shape[-1])
            gram = x.t() @ x
            self.grams[name] = self.grams[name] + gram if name in self.grams else gram

        return hook

    @torch.no_grad()
    def run(self, model: nn.Module, calib: Calibration, batch_size: int = 8) -> dict[str, torch.Tensor]:
        for s in range(0, calib.input_ids.shape[0], batch_size):
            self.mask = calib.attention_mask[s : s + batch_size]
            model(input_ids=calib.input_ids[s : s + batch_size], attention_mask=self.mask)
        for h in self.handles:
            h.remove()
        return self.grams


def weighted_lowrank(delta: torch.Tensor, gram: torch.Tensor | None, damping: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activation-aware SVD of a canonical (out, in) delta: returns (P*S, Q^T L^-1, S).

    The Cholesky factor of the damped Gram is taken in float64 (Grams are ill-conditioned), the SVD
    in float32 (fast, and its error is far below the truncation error).
    """
    if gram is None:
        u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
        return u * s, vh, s
    h = gram.double()
    h = h + damping * h.diagonal().mean().clamp_min(1e-12) * torch.eye(h.shape[0], dtype=h.dtype)
    chol = torch.linalg.cholesky(h).float()
    p, s, qh = torch.linalg.svd(delta.float() @ chol, full_matrices=False)
    v = torch.linalg.solve_triangular(chol, qh, upper=False, left=False)  # Q^T L^{-1}
    return p * s, v, s


def rank_for(s: torch.Tensor, eps: float, floor: int) -> int:
    """Fewest leading directions whose dropped energy is at most eps of the total."""
    energy = s.double() ** 2
    tail = energy.flip(0).cumsum(0).flip(0) / energy.sum().clamp_min(1e-30)  # tail[r] = dropped share at rank r
    ok = (tail <= eps**2).nonzero()
    r = int(ok[0]) if len(ok) else len(s)
    return max(r, floor)


@dataclass
class _Candidate:
    """A matrix's exact delta, its inputs' Gram ``X^T X`` and, once a level asks, its
    activation-weighted factors and rank floor."""

    full: TensorDelta
    gram: torch.Tensor | None
    config: DecomposedConfig
    _factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    _floor: int | None = None

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._factors is None:
            self._factors = weighted_lowrank(self.full.to_dense(), self.gram)
        return self._factors

    @property
    def floor(self) -> int:
        if self._floor is None:
            self._floor = spectral_test(self.full.to_dense(), self.config).rank if self.config.annealing["keep_supported"] else 0
        return self._floor


def anneal_model(model: nn.Module, deltas: dict[str, TensorDelta], finetuned_dir: Path, base_dir: Path, calibration, config: DecomposedConfig, progress: bool = True) -> tuple[dict[str, TensorDelta], dict]:
    """Anneal a model built exact from `deltas`, with the fine-tune's tokenizer (or the base's)."""
    if calibration is None:
        raise PromptError("mode='anneal' needs calibration prompts (decompose(..., calibration=...)), disjoint from evaluation prompts")
    prompts = load_prompts(calibration)[: int(config.annealing["calibration_prompts"])]
    try:
        tokenizer = AutoTokenizer.from_pretrained(finetuned_dir)
    except (OSError, ValueError):
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    module_names, gram_names = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, DecomposedModule):
            if module._tied is None:
                module_names[module.delta.name] = name
            gram_names[module.delta.name] = name  # a tied head (visited after its embedding) weighs by its inputs
    floor_model = None
    if config.annealing["target"] == "floor":  # the bound: the fine-tune itself, served in bfloat16
        from transformers import AutoModelForCausalLM

        floor_model = AutoModelForCausalLM.from_pretrained(finetuned_dir, dtype=torch.bfloat16).eval()
    return anneal(model, deltas, tokenizer, prompts, config, module_names, gram_names, progress, floor_model)


def anneal(
    model: nn.Module,
    deltas: dict[str, TensorDelta],
    tokenizer,
    calibration_prompts: list[str],
    config: DecomposedConfig,
    module_names: dict[str, str],
    gram_names: dict[str, str] | None = None,
    progress: bool = True,
    floor_model: nn.Module | None = None,
) -> tuple[dict[str, TensorDelta], dict]:
    """Anneal `model` (built exact from `deltas`) in place; return the kept deltas and the trace.

    `module_names` maps a delta's tensor name to its `DecomposedModule` in `model`; `gram_names`
    to the module whose inputs weigh it (default: the same). The ``floor`` target needs
    `floor_model`, the fine-tune served in bfloat16; the ``exact`` target keeps every delta as is.
    """
    gram_names = gram_names or module_names
    t0 = time.perf_counter()
    opts = config.annealing
    target = opts["target"]
    if target == "exact":  # lossless: nothing to anneal
        return dict(deltas), {"target": target, "ladder": [], "levels": [], "trace": [], "precision": {"dtype": "float32", "accepted": False},
                              "calibration_prompts": len(calibration_prompts), "calibration_tokens": opts["calibration_tokens"], "seconds": 0.0}
    if target == "floor" and floor_model is None:
        raise ConfigError("annealing.target='floor' needs the fine-tune served in bfloat16 (anneal(..., floor_model=...))")
    specs = [str(x) if isinstance(x, str) else f"lr{x}" for x in opts["levels"]]
    levels = [Level.parse(x) for x in opts["levels"]]
    calib = calibrate(model, tokenizer, calibration_prompts, opts["calibration_tokens"])
    floor = None if floor_model is None else measure_floor(floor_model, calib, opts["positions"], opts["tie_tolerance"])
    judge = {"target": target, "tolerance": opts["tolerance"], "max_flips": opts["expected_flips"], "positions": opts["positions"],
             "tie_tolerance": opts["tie_tolerance"], "floor": floor}
    names = [n for n, d in deltas.items() if n in module_names and d.get("dense") is not None and len(d.shape) == 2]
    grams = GramCollector({n: model.get_submodule(gram_names[n]) for n in names}).run(model, calib)
    cands = {n: _Candidate(deltas[n], grams.get(n), config) for n in names}
    del grams
    layers: dict[str, list[str]] = defaultdict(list)
    for n in names:
        layers[_layer_of(module_names[n])].append(n)
    order = sorted(layers, key=_layer_key)
    made: dict[tuple[str, int], TensorDelta] = {}  # each matrix's delta per level, built once

    def delta_at(name: str, level: int | None) -> TensorDelta:
        if level is None:
            return cands[name].full
        if (name, level) not in made:
            made[name, level] = _level_delta(cands[name], levels[level])
        return made[name, level]

    def install(layer: str, level: int | None) -> None:
        _install(model, {n: delta_at(n, level) for n in layers[layer]}, module_names)

    def check(label: str, level: int) -> bool:
        ok, stats = guard(model, calib, **judge)
        trace.append({"layer": label, "level": specs[level], "accepted": ok, **stats})
        bar.set_postfix(layer=_short(label), level=specs[level], flips=f"{stats['expected_flips']:.2f}", accepted=ok)
        return ok

    trace: list[dict] = []
    knapsack = opts["schedule"] == "knapsack" and target in ("tie", "identical", "floor")
    with tqdm(total=len(names) if knapsack else len(order), desc="annealing", unit="matrix" if knapsack else "layer", disable=not progress) as bar:
        if knapsack:
            weighers = {n: model.get_submodule(gram_names[n]) for n in names}
            put = lambda chosen: _install(model, chosen, module_names)  # noqa: E731
            choice = _knapsack(names, specs, delta_at, put, cands, model, weighers, calib, judge, trace, bar, opts["positions"])
        else:
            level_of = _ladder(order, len(levels), install, check, opts["max_time_s"] - (time.perf_counter() - t0), bar)
            choice = {n: level_of[layer] for layer in order for n in layers[layer]}
    kept = dict(deltas)
    per_layer = []
    for layer in order:
        chosen = {n: delta_at(n, choice[n]) for n in layers[layer]}
        _install(model, chosen, module_names)
        kept.update(chosen)
        picks = [choice[n] for n in layers[layer]]
        common = max(picks, key=picks.count)  # the layer's most common level (the figure's mark)
        per_layer.append({"layer": layer, "level": None if common is None else specs[common],
                          "matrix_levels": {n: None if choice[n] is None else specs[choice[n]] for n in layers[layer]},
                          "kept_params": sum(d.num_params() for d in chosen.values()),
                          "bytes": sum(d.nbytes() for d in chosen.values()),
                          "delta_params": sum(math.prod(d.shape) for d in chosen.values()),
                          "ranks": {n: chosen[n].rank for n in layers[layer]}})
    del made
    precision = _anneal_precision(model, kept, module_names, calib, judge) if opts["precision"] else {"dtype": "float32", "accepted": False}
    return kept, {"target": target, "tie_tolerance": opts["tie_tolerance"], "floor": None if floor is None else asdict(floor), "ladder": specs, "levels": per_layer, "trace": trace, "precision": precision, "calibration_prompts": len(calibration_prompts),
                  "calibration_tokens": opts["calibration_tokens"], "seconds": time.perf_counter() - t0}


def _ladder(order: list[str], n_levels: int, install, check, seconds: float, bar) -> dict[str, int | None]:
    """One temperature for the whole model by bisection over the levels, then each layer in model
    order heated further while the guard holds (rolled back to its last accepted level)."""
    t0 = time.perf_counter()
    lo, hi, best = 0, n_levels - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        for layer in order:
            install(layer, mid)
        if check("*", mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    level_of = dict.fromkeys(order, best)
    for layer in order:
        install(layer, best)
    for layer in order:
        bar.update(1)
        nxt = 0 if best is None else best + 1
        while nxt < n_levels and time.perf_counter() - t0 < seconds:
            install(layer, nxt)
            if not check(layer, nxt):
                install(layer, level_of[layer])
                break
            level_of[layer], nxt = nxt, nxt + 1
    return level_of


def _knapsack(names: list[str], specs: list[str], delta_at, put, cands: dict, model, weighers: dict[str, nn.Module], calib: Calibration,
              judge: dict, trace: list[dict], bar, positions: int, draws: int = 8, tries: int = 8) -> dict[str, int | None]:
    """Sensitivity-driven allocation per matrix (`allocation`): every matrix at every level (bytes and
    calibration-weighted output error), its gap sensitivity measured once at its most damaging level
    (`gap_sensitivity`), the knapsack solved for a budget of predicted gap variance, and the budget
    bisected against the guard (the largest accepted budget is kept)."""
    n_levels = len(specs)
    option: list[int | None] = [None, *range(n_levels)]  # option j of every matrix: exact, then each level
    costs, errors = [], []
    for n in names:  # bytes and calibration-weighted output error of every level
        full = cands[n].full.to_dense()
        per_level = [delta_at(n, k) for k in range(n_levels)]
        costs.append([float(cands[n].full.nbytes())] + [float(d.nbytes()) for d in per_level])
        errors.append([0.0] + [weighted_error(full - d.to_dense(), cands[n].gram) for d in per_level])
        bar.update(1)
    probe = {n: max(range(n_levels), key=lambda k, i=i: errors[i][k + 1]) for i, n in enumerate(names)}
    changes = {n: (lambda n=n: cands[n].full.to_dense() - delta_at(n, probe[n]).to_dense()) for n in names}
    sensitivity = gap_sensitivity(model, calib, weighers, changes, draws)
    floor = judge["floor"]  # the gap change the guard's bound allows: flips = positions x f0 x s / sqrt(2 pi)
    bound = floor.expected_flips if floor is not None else judge["max_flips"]
    stat = "expected_flips" if judge["target"] == "identical" else "expected_flips_above_tolerance"
    f0 = 0.1 / max(float(calib.margin.flatten().quantile(0.1)), 1e-6)
    allowed = (bound * math.sqrt(2 * math.pi) / (positions * f0)) ** 2
    damages = []
    for i, n in enumerate(names):
        worst = errors[i][probe[n] + 1]
        damages.append([sensitivity[n] * e / worst / allowed if worst > 0 else 0.0 for e in errors[i]])
    trace.append({"layer": "*", "level": "sensitivity", "accepted": None, "probe": True, "draws": draws,
                  "predicted_gap_rms_at_probes": math.sqrt(sum(sensitivity.values())), "allowed_gap_rms": math.sqrt(allowed)})
    accepted, lo, hi, scale = None, 0.0, None, 1.0
    for _ in range(tries):  # the largest budget the guard accepts: grow until a failure, then bisect
        if hi is not None and lo > 0 and hi / lo < 1.2:  # within 20%: a few bytes left to win
            break
        choice = solve(costs, damages, scale)
        put({n: delta_at(n, option[j]) for n, j in zip(names, choice)})
        ok = not any(choice)  # all exact: nothing to judge
        if not ok:
            ok, stats = guard(model, calib, **judge)
            trace.append({"layer": "*", "level": f"budget x{scale:.3g}", "accepted": ok, "bytes": sum(c[j] for c, j in zip(costs, choice)), **stats})
            bar.set_postfix(budget=f"x{scale:.3g}", flips=f"{stats['expected_flips_above_tolerance']:.2f}", accepted=ok)
        if ok:
            accepted, lo = choice, scale
            # flips grow with the gap change, i.e. with the square root of the budget: step toward the bound
            flips = stats[stat] if any(choice) else 0.0
            scale = scale * min(16.0, max(1.5, (bound / flips) ** 2 if flips > 0 else 16.0)) if hi is None else (lo * hi) ** 0.5
        else:
            hi = scale
            scale = (lo * hi) ** 0.5 if lo > 0 else scale / 4
    choice = accepted or [0] * len(names)
    return {n: option[j] for n, j in zip(names, choice)}


def _anneal_precision(model, kept: dict[str, TensorDelta], module_names: dict[str, str], calib: Calibration, judge: dict) -> dict:
    """Store low-rank factors in bfloat16 if the guard still passes."""
    lowrank = {n: d for n, d in kept.items() if [p.kind for p in d.parts] == ["lowrank"] and n in module_names}
    if not lowrank:
        return {"dtype": "float32", "accepted": False}
    proposal = {n: _with_dtype(d, torch.bfloat16) for n, d in lowrank.items()}
    _install(model, proposal, module_names)
    ok, stats = guard(model, calib, **judge)
    if ok:
        kept.update(proposal)
    else:
        _install(model, lowrank, module_names)
    return {"dtype": "bfloat16" if ok else "float32", "accepted": ok, **stats}


def _with_dtype(d: TensorDelta, dtype: torch.dtype) -> TensorDelta:
    lowrank = d.get("lowrank")
    return TensorDelta(d.name, d.shape, d.transposed, [LowRankPart(lowrank.u.to(dtype), lowrank.v.to(dtype))])


def _level_delta(c: _Candidate, level: Level) -> TensorDelta:
    """A matrix's delta at `level`: its leading weighted directions, the rest in low-bit codes."""
    full, (u, v, s) = c.full, c.factors
    r = 0 if level.eps is None else rank_for(s, level.eps, c.floor)
    if level.bits is None:  # low rank only
        if r >= min(full.shape) or r * sum(full.shape) >= full.num_params():
            return full
        return TensorDelta(full.name, full.shape, full.transposed, [LowRankPart(u[:, :r].contiguous(), v[:r].contiguous())])
    # the factors go to bfloat16 first, so the quantized residual absorbs their rounding too
    u, v = (u[:, :r].bfloat16().contiguous(), v[:r].bfloat16().contiguous()) if r else (None, None)
    residual = full.to_dense() if u is None else full.to_dense() - u.float() @ v.float()
    grid = c.config.annealing["grid"] if level.bits > 1 else "signed"  # one bit is the same on both grids
    codes, scales = quantize(residual, level.bits, level.group, gram=c.gram if c.config.annealing["error_feedback"] else None, grid=grid)
    kind = FullQuantPart if grid == "full" else QuantPart
    parts = [kind.from_packed(codes, scales, full.shape)] + ([] if u is None else [LowRankPart(u, v)])
    delta = TensorDelta(full.name, full.shape, full.transposed, parts)
    return delta if delta.nbytes() < full.nbytes() else full


def _install(model: nn.Module, deltas: dict[str, TensorDelta], module_names: dict[str, str]) -> None:
    for name, delta in deltas.items():
        module = model.get_submodule(module_names[name])
        module.set_delta(delta)


def _layer_of(module_name: str) -> str:
    parts = module_name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "h") and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return "~head"  # embeddings / tied head: annealed last, on the final hidden states


def _short(layer: str) -> str:
    return layer.rsplit(".", 1)[-1] if layer[-1:].isdigit() else layer


def _layer_key(layer: str) -> tuple[int, str]:
    tail = layer.rsplit(".", 1)[-1]
    return (int(tail), layer) if tail.isdigit() else (1 << 30, layer)
