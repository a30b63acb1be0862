"""Structural annealing: remove unsupported structure layer by layer while generate() stays equal.

Schedule. Transformer layers are annealed in model order (then the embedding / tied head), so a
later layer is compressed on the activations of the already-annealed earlier ones. A layer moves
through increasingly aggressive *levels* (the temperature, `config.Level`). A level has two axes
of one budget: how many activation-weighted singular directions of each matrix's delta are kept
exactly (``lr<eps>``: the fewest whose left-out weighted norm is at most eps), and in how many bits
the rest is stored (``int<bits>[g<group>]``: every remaining entry as a signed integer of that many
bits, one scale per group of inputs of a row; the output head's rows coarser for tokens that stay far below the top
on calibration, `head_row_steps`). ``"int8"`` keeps every entry in 8 bits; ``"lr0.05"`` keeps directions only.
With ``keep_supported`` the criterion's spectrally supported directions are never dropped (a rank floor). The
schedule first finds one temperature for the whole model (bisection over the levels), then heats the layers further
in rounds, one level per layer and round, each while the guard holds.

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
calibration positions does not carry over: unseen prompts have their own near-ties.) The ``tie`` and ``identical``
targets judge from the head rows of each position's 64 likeliest reference tokens, the rest bounded (`screening`:
the same verdicts, at a sixth less per check). A level that fails rolls the layer back to its last accepted level. Precision (bf16
storage of low-rank-only factors) is a last annealing step under the same guard.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from .config import DecomposedConfig, Level
from .allocation import solve, weighted_error
from .criterion import spectral_test
from .equivalence import greedy_generate, kl_divergence, load_prompts
from .errors import ConfigError, PromptError
from .experts import dense_call, interface, routed_inputs
from .groups import LAYER_LISTS
from .heap import release_free_memory
from .inject import off_text_path
from .layerwise import DeltaStore, Hidden, Layerwise, batches, output_name
from .metrics import TIE_TOLERANCE
from .modules import DecomposedModule
from .quantize import Feedback, cholesky_lower, column_steps, quantize_codes, scaled_by_columns
from .screening import HeadScreen, Screened, head_input, head_linear
from .parts import FullQuantPart, LowRankPart, QuantLowRankPart, QuantPart, TensorDelta


@dataclass
class Calibration:
    """Reference continuations and logits of the fine-tuned model on the calibration prompts: token ids and mask on
    CPU, the reference's tokens, margins and logits where the guard's model runs."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    top1: torch.Tensor  # (n, t) reference greedy tokens
    second: torch.Tensor  # (n, t) reference runner-up tokens
    margin: torch.Tensor  # (n, t) reference top-1 minus top-2 logit
    logits: torch.Tensor  # (n, t, vocab) reference logits at the continuation positions (in the head's dtype)

    @property
    def logits_to_keep(self) -> int:
        return logits_to_keep(self.input_ids, self.prompt_len)


def logits_to_keep(ids: torch.Tensor, prompt_len: int) -> int:
    """The positions the head runs on: the prompt's last and each continuation token's (the last one's logits,
    predicting past the continuation, are dropped after)."""
    return ids.shape[1] - prompt_len + 1


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
    return _stacked(_batch_logits(model, ids, mask, plen, batch_size), len(ids))


def _stacked(batches: Iterable[torch.Tensor], rows: int) -> torch.Tensor:
    """Batches of rows as one tensor of `rows` rows, each copied in as it comes: no list of them beside the result."""
    out, row = None, 0
    for batch in batches:
        out = batch.new_empty(rows, *batch.shape[1:]) if out is None else out
        out[row : row + len(batch)] = batch
        row += len(batch)
    if out is None or row != rows:
        raise ValueError(f"{row} rows where {rows} were expected")
    return out


@torch.no_grad()
def _batch_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, plen: int, batch_size: int) -> Iterator[torch.Tensor]:
    keep = logits_to_keep(ids, plen)
    for batch_ids, batch_mask in batches(ids, mask, batch_size):
        yield model(input_ids=batch_ids, attention_mask=batch_mask, logits_to_keep=keep).logits[:, :-1].float()


def expected_flips(calib: Calibration, logits: torch.Tensor, positions: int, tolerance: float = 0.0) -> float:
    """Expected greedy flips over `positions` unseen positions whose reference margin exceeds
    `tolerance` (the margin criterion; tolerance 0 counts every flip).

    A position of margin m flips when the change d of its top-1/top-2 gap exceeds m. With gap
    changes d ~ N(0, s^2) (s: RMS over the calibration positions) and reference margins of density
    f0 near zero (0.1 / the 10th-percentile margin), E[flips above t] = positions x f0 x E[(d - t)+]
    = positions x f0 x (s phi(t/s) - t (1 - Phi(t/s))), which is positions x f0 x s / sqrt(2 pi) at t = 0.
    """
    return _flips(calib, float(_gap_change(calib, logits).square().mean().sqrt()), positions, tolerance)


def _gap_change(calib: Calibration, logits: torch.Tensor) -> torch.Tensor:
    """The change of each position's reference top-1/top-2 logit gap."""
    top1 = logits.gather(-1, calib.top1[..., None])[..., 0]
    top2 = logits.gather(-1, calib.second[..., None])[..., 0]
    return (top1 - top2) - calib.margin


def _flips(calib: Calibration, s: float, positions: int, tolerance: float) -> float:
    """`expected_flips` from the RMS gap change `s`."""
    f0 = 0.1 / max(float(calib.margin.flatten().quantile(0.1)), 1e-6)
    if s == 0.0:
        return 0.0
    z = tolerance / s
    tail = s * math.exp(-z * z / 2) / math.sqrt(2 * math.pi) - tolerance * 0.5 * math.erfc(z / math.sqrt(2))
    return positions * f0 * tail


def tie_equivalent(calib: Calibration, logits: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Per calibration position: the model's top-1 is the reference's, or the reference's margin
    is below `tolerance` and the two swapped their top-2 (a near-tie resolved the other way)."""
    return _tie_equivalent(calib, logits.topk(2, dim=-1).indices, tolerance)


# the most a token's row steps grow by (`head_row_steps`): at `step1.2`, four times coarser rounds 98% of a Gaussian row to zero
HEAD_ROW_CAP = 4.0


def head_row_steps(calib: Calibration, gap: float, cap: float = HEAD_ROW_CAP) -> torch.Tensor:
    """Step multipliers ``(vocab,)`` for the rows of the output head: ``min(cap, max(1, d / gap))``, ``d`` the least
    distance (logits) of the token below the reference's top-1 over the calibration positions. A row's rounding moves
    its token's logit only, which flips a greedy choice only where the token is near the top: tokens that stay far
    below it take coarser steps. Tokens of the calibration prompts and continuations keep 1 (a tied head's rows are
    also their input embeddings). Computed where the reference logits are; the steps are on CPU."""
    least = torch.full((calib.logits.shape[-1],), float("inf"), device=calib.logits.device)
    for logits in calib.logits:  # a prompt at a time: one (positions, vocab) temporary
        logits = logits.float()
        least = torch.minimum(least, (logits.amax(-1, keepdim=True) - logits).amin(0))
    rows = (least / gap).clamp_(1.0, cap).cpu()
    rows[calib.input_ids[calib.attention_mask.bool()]] = 1.0
    return rows


def _tie_equivalent(calib: Calibration | Screened, top2: torch.Tensor, tolerance: float) -> torch.Tensor:
    """`tie_equivalent` from the model's top-2 token ids."""
    swapped = (calib.margin < tolerance) & (top2[..., 0] == calib.second) & (top2[..., 1] == calib.top1)
    return (top2[..., 0] == calib.top1) | swapped


@dataclass
class Floor:
    """What serving the fine-tune in bfloat16 does on the calibration prompts: the floor target's bound."""

    expected_flips: float
    mean_kl: float


@torch.no_grad()
def measure_floor(bf16_model: nn.Module, calib: Calibration, positions: int, tie_tolerance: float, batch_size: int = 8) -> Floor:
    """The floor target's bound from the fine-tune served in bfloat16 (`bf16_model`)."""
    logit_batches = _batch_logits(bf16_model, calib.input_ids, calib.attention_mask, calib.prompt_len, batch_size)
    stats = _scores(calib, logit_batches, positions, tie_tolerance)
    return Floor(stats["expected_flips_above_tolerance"], stats["mean_kl"])


def _scores(calib: Calibration, logit_batches: Iterable[torch.Tensor], positions: int, tie_tolerance: float) -> dict[str, float]:
    """The guard's statistics, gathered one batch of continuation logits at a time (consecutive rows of
    the calibration set), so that no (prompts, tokens, vocab) tensor but the reference's is held; within a
    batch prompt by prompt, so that each pass over its (tokens, vocab) logits stays in cache (2.6x faster)."""
    n, agree, tie, square, kl, max_diff, row = 0, 0, 0, 0.0, 0.0, 0.0, 0
    for logits in (prompt for batch in logit_batches for prompt in batch):
        ref = Calibration(*(getattr(calib, f)[row : row + 1] for f in ("input_ids", "attention_mask")), calib.prompt_len,
                          *(getattr(calib, f)[row] for f in ("top1", "second", "margin")), calib.logits[row].float())
        row += 1
        n += ref.top1.numel()
        top2 = logits.topk(2, dim=-1).indices
        agree += int((top2[..., 0] == ref.top1).sum())
        tie += int(_tie_equivalent(ref, top2, tie_tolerance).sum())
        square += float(_gap_change(ref, logits).double().square().sum())
        change = logits - ref.logits
        kl += float(kl_divergence(ref.logits, logits, change).double().sum())
        max_diff = max(max_diff, *(abs(float(x)) for x in torch.aminmax(change)))
    s = math.sqrt(square / n)
    return {"top1_agreement": agree / n, "tie_agreement": tie / n, "expected_flips": _flips(calib, s, positions, 0.0),
            "expected_flips_above_tolerance": _flips(calib, s, positions, tie_tolerance), "max_abs_logit_diff": max_diff, "mean_kl": kl / n}


def guard(model: nn.Module, calib: Calibration, target: str = "tie", tolerance: float = 0.99, max_flips: float = 0.25,
          positions: int = 2048, batch_size: int = 8, tie_tolerance: float = TIE_TOLERANCE, floor: Floor | None = None,
          screen: HeadScreen | None = None) -> tuple[bool, dict]:
    """Judge the current model against the calibration reference (teacher-forced on its continuations).

    ``exact``: every logit identical (lossless). ``identical``: every calibration top-1 kept (greedy
    generation on the calibration prompts is then identical) and at most `max_flips` greedy flips
    expected over `positions` unseen positions. ``tie``: every position tie-equivalent
    (`tie_equivalent`, margin below `tie_tolerance`) and at most `max_flips` flips expected at
    margins above `tie_tolerance` (the fine-tune's fp32 deployment floor shows none). ``floor``: no
    more flips expected above `tie_tolerance` and no higher mean KL than `floor` (the fine-tune
    served in bfloat16). ``top1``: top-1 agreement >= `tolerance`; ``kl``: mean KL <= `tolerance`.
    `model`: a model, or an annealing engine (`_StreamEngine`: the model run layer by layer). `screen`: the
    ``tie`` and ``identical`` targets on an engine judge from a few head rows per position (`screening`;
    no mean KL then).
    """
    head = model.head() if screen is not None and target in ("tie", "identical") and not isinstance(model, nn.Module) else None
    if head is not None:
        stats = _screened_scores(calib, screen.rows(model.head_inputs(calib), head), positions, tie_tolerance)
    else:
        if isinstance(model, nn.Module):
            logit_batches = _batch_logits(model, calib.input_ids, calib.attention_mask, calib.prompt_len, batch_size)
        else:
            logit_batches = model.logits(calib)
        stats = _scores(calib, logit_batches, positions, tie_tolerance)
    agree, tie, flips, above = (stats[k] for k in ("top1_agreement", "tie_agreement", "expected_flips", "expected_flips_above_tolerance"))
    if target == "exact":
        return stats["max_abs_logit_diff"] == 0.0, stats
    if target == "identical":
        return agree == 1.0 and flips <= max_flips, stats
    if target == "tie":
        return tie == 1.0 and above <= max_flips, stats
    if target == "floor":
        if floor is None:
            raise ConfigError("the floor target needs the bfloat16 floor measured on the calibration prompts (`measure_floor`)")
        return above <= floor.expected_flips and stats["mean_kl"] <= floor.mean_kl, stats
    if target == "top1":
        return agree >= tolerance, stats
    return stats["mean_kl"] <= tolerance, stats


def _screened_scores(calib: Calibration, rows: Iterable[Screened], positions: int, tie_tolerance: float) -> dict[str, float]:
    """`_scores` from screened positions (`HeadScreen.rows`), without the mean KL and the largest logit change."""
    n, agree, tie, square, whole = 0, 0, 0, 0.0, 0
    for row in rows:
        n += row.top1.numel()
        agree += int((row.top2[..., 0] == row.top1).sum())
        tie += int(_tie_equivalent(row, row.top2, tie_tolerance).sum())
        square += float(row.change.double().square().sum())
        whole += row.whole_rows
    s = math.sqrt(square / n)
    return {"top1_agreement": agree / n, "tie_agreement": tie / n, "expected_flips": _flips(calib, s, positions, 0.0),
            "expected_flips_above_tolerance": _flips(calib, s, positions, tie_tolerance), "whole_head_positions": whole}


class GramCollector:
    """Accumulate X^T X of the inputs of chosen modules over non-padding positions; for a tensor of `experts` (name ->
    ("in" or "down", expert), its module a mixture's experts), of the inputs of that expert's matrix: its tokens'
    hidden states, or its down projection's inputs (`experts.routed_inputs`)."""

    def __init__(self, modules: dict[str, nn.Module], experts: dict[str, tuple[str, int]] | None = None):
        experts = experts or {}
        self.grams: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items() if name not in experts]
        by_module: dict[int, dict[str, tuple[str, int]]] = defaultdict(dict)
        for name in experts:
            by_module[id(modules[name])][name] = experts[name]
        self.shared: dict[tuple[int, str, int], torch.Tensor] = {}  # an expert's inputs' Gram, shared by its gate and up rows
        self.handles += [modules[next(iter(names))].register_forward_pre_hook(self._experts_hook(names)) for names in by_module.values()]
        self.experts = {name: (id(modules[name]), *key) for name, key in experts.items()}

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach().float()
            if isinstance(module, nn.Embedding) or (isinstance(module, DecomposedModule) and isinstance(module.base, nn.Embedding)):
                return
            x = x[self.mask.to(x.device).bool()] if self.mask is not None and x.shape[:2] == self.mask.shape else x.reshape(-1, x.shape[-1])
            gram = x.t() @ x
            self.grams[name] = self.grams[name] + gram if name in self.grams else gram

        return hook

    def _experts_hook(self, names: dict[str, tuple[str, int]]):
        wanted = {key: [n for n, k in names.items() if k == key] for key in set(names.values())}
        down = any(kind == "down" for kind, _ in wanted)

        def hook(module, args):
            x, index = (args[0].detach(), args[1]) if len(args) > 1 else dense_call(module, args[0].detach())[:2]
            if self.mask is not None and x.shape[0] % self.mask.numel() == 0:  # the tokens flattened (a dense call: once per expert)
                keep = self.mask.to(x.device).flatten().bool().repeat(x.shape[0] // self.mask.numel())  # padding left out
                x, index = x[keep], index[keep]
            for expert, inputs, down_inputs in routed_inputs(interface(module), x, index, down):
                for kind, value in (("in", inputs), ("down", down_inputs)):
                    if (kind, expert) in wanted:
                        value = value.float()
                        key = (id(module), kind, expert)
                        self.shared[key] = self.shared[key] + value.t() @ value if key in self.shared else value.t() @ value
                        for name in wanted[(kind, expert)]:
                            self.grams[name] = self.shared[key]

        return hook

    @torch.no_grad()
    def run(self, model: nn.Module, calib: Calibration, batch_size: int = 8) -> dict[str, torch.Tensor]:
        for ids, self.mask in batches(calib.input_ids, calib.attention_mask, batch_size):
            model(input_ids=ids, attention_mask=self.mask)
        return self.close()

    def close(self) -> dict[str, torch.Tensor]:
        """Remove the hooks; the Grams gathered, on CPU (where the candidates are made; an expert's gate and up rows
        share one). An expert no calibration token chose weighs by its layer's experts' mean Gram (as a typical
        expert: an error the guard cannot see would otherwise look free)."""
        for h in self.handles:
            h.remove()
        for name, (module, kind, _) in self.experts.items():
            if name not in self.grams:
                seen = [g for (m, k, _), g in self.shared.items() if (m, k) == (module, kind)]
                if seen:
                    self.grams[name] = self.shared.setdefault((module, kind, -1), sum(seen) / len(seen))
        on_cpu = {id(g): g.cpu() for g in self.grams.values()}
        return {name: on_cpu[id(gram)] for name, gram in self.grams.items()}


# out / in from which `weighted_lowrank` factors a matrix through its Gram: on the 1.5B synthetic Llama's (49152, 2048)
# tied embedding the SVD took 1.62 GiB above what was held before it, the Gram's way 0.94 GiB with the factors it keeps
# (`benchmarks/anneal_memory.py`)
TALL = 8


def weighted_lowrank(delta: torch.Tensor, gram: torch.Tensor | None, damping: float = 1e-2,
                     rank: Callable[[torch.Tensor], int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activation-aware SVD of a canonical (out, in) delta: returns (P*S, Q^T L^-1, S), the factors cut to the
    leading ``rank(S)`` directions where `rank` is given (the same values as the whole factors' leading columns).

    The Cholesky factor of the damped Gram is taken in float64 (Grams are ill-conditioned; in its own memory), the SVD
    in float32 (fast, and its error is far below the truncation error). A matrix at least `TALL` times
    taller than wide (a vocabulary-sized head) goes through `_tall_svd` instead, in a fraction of the memory.
    """
    if gram is None:
        chol = None
    else:
        h = gram.to(torch.float64, copy=True)
        h.diagonal().add_(damping * h.diagonal().mean().clamp_min(1e-12))
        chol = cholesky_lower(h).float()
        del h
    if delta.shape[0] >= TALL * delta.shape[1]:
        p_s, qh, s = _tall_svd(delta, chol, rank)
    else:
        p, s, qh = torch.linalg.svd(delta.float() if chol is None else delta.float() @ chol, full_matrices=False)
        kept = len(s) if rank is None else rank(s)
        p_s = p[:, :kept] * s[:kept]
    r = p_s.shape[1]
    v = qh if chol is None else torch.linalg.solve_triangular(chol, qh, upper=False, left=False)  # Q^T L^{-1}
    return p_s, v if r == len(v) else v[:r].contiguous(), s


def _tall_svd(delta: torch.Tensor, chol: torch.Tensor | None, rank: Callable[[torch.Tensor], int] | None = None,
              rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P*S, Q^T, S) of ``B = delta @ chol`` (``chol`` None: the identity) for a tall ``(out, in)`` delta, from the
    eigenvectors of its ``(in, in)`` Gram in float64, both passes a block of `rows` at a time: besides P*S (its leading
    ``rank(S)`` columns where `rank` is given; Q^T whole), nothing of the matrix's size is held (in float64, the Gram's
    eigenvalues keep the float32 SVD's accuracy)."""
    out, n = delta.shape
    gram = torch.zeros(n, n, dtype=torch.float64)
    for r in range(0, out, rows):
        b = delta[r : r + rows].float()
        b = (b if chol is None else b @ chol).double()
        gram.addmm_(b.t(), b)
    energy, vecs = torch.linalg.eigh(gram)
    energy, vecs = energy.flip(0).clamp_min(0.0), vecs.flip(1)  # descending
    s = energy.sqrt().float()
    k = n if rank is None else rank(s)
    right = (vecs if chol is None else chol.double() @ vecs).float()  # B V = delta (chol V)
    p_s = torch.empty(out, k)
    for r in range(0, out, rows):  # whole products cut: the columns kept are those of the whole factors, bit for bit
        block = torch.mm(delta[r : r + rows].float(), right)
        p_s[r : r + rows] = block[:, :k]
    return p_s, vecs.t().float().contiguous(), s


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
    _feedback: Feedback | None = None
    _columns: torch.Tensor | None = None
    rows: torch.Tensor | None = None  # multipliers of the steps per row on the signed grid (an output head's: `head_row_steps`)
    cut: bool = False  # factors cut to the most directions a level of the config's ladder keeps (`_Candidates`' are)
    rounded: dict[tuple[int, int], QuantLowRankPart] = field(default_factory=dict)  # (directions, bits): `rounded_factors`
    # error-feedback factors by their Gram's id, shared by a layer's candidates (`_Candidates`): an expert's gate and up
    # rows share one Gram, so one factor (of a mixture's every expert: an input-sized square each)
    feedbacks: dict[int, Feedback] = field(default_factory=dict)

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`weighted_lowrank`'s factors; `cut`: only the leading `rank_needed` directions."""
        if self._factors is None:
            self._factors = weighted_lowrank(self.full.to_dense(), self.gram, rank=self.rank_needed if self.cut else None)
        return self._factors

    def rank_needed(self, s: torch.Tensor) -> int:
        """The most leading directions a level of the ladder keeps, from the singular values `s`: `rank_for` at
        each level's eps (mixed levels: every direction). No more are held or stored (of the 1.5B synthetic Llama's
        tied embedding, 762 of 2048)."""
        levels = self.config.annealing_levels()
        if any(level.mix is not None for level in levels):
            return len(s)
        return max([rank_for(s, eps, self.floor) for eps in {level.eps for level in levels if level.eps is not None}], default=0)

    def rounded_factors(self, r: int, bits: int, target: torch.Tensor | None = None) -> QuantLowRankPart:
        """The leading `r` directions in `bits`-bit factors, u refit to the rounded v on the Gram when error feedback
        is on (`QuantLowRankPart.quantize`; `target`: the dense delta, if at hand), made once: every level with
        these directions and bits has the same factors, so a revisit needs neither the Gram nor a refit."""
        if (r, bits) not in self.rounded:
            u, v, _ = self.factors
            if target is None and self.refit_gram is not None:
                target = self.full.to_dense()
            self.rounded[r, bits] = QuantLowRankPart.quantize(u[:, :r], v[:r], bits, self.refit_gram, target)
        return self.rounded[r, bits]

    def round_factors(self) -> None:
        """Make the rounded factors of every level of the config with `factor_bits` (before the Gram is let go)."""
        _, _, s = self.factors
        for level in self.config.annealing_levels():
            if level.factor_bits is not None and level.eps is not None and (r := rank_for(s, level.eps, self.floor)):
                self.rounded_factors(r, level.factor_bits)

    @property
    def refit_gram(self) -> torch.Tensor | None:
        """The Gram low-bit factors' u is refit on (`QuantLowRankPart.quantize`): None with ``error_feedback`` off."""
        return self.gram if self.config.annealing["error_feedback"] else None

    @property
    def feedback(self) -> Feedback | None:
        """Error feedback's factor of the Gram (None without a Gram or with ``error_feedback`` off), made once."""
        if self._feedback is None and self.gram is not None and self.config.annealing["error_feedback"]:
            if id(self.gram) not in self.feedbacks:
                self.feedbacks[id(self.gram)] = Feedback.of(self.gram)
            self._feedback = self.feedbacks[id(self.gram)]
        return self._feedback

    @property
    def columns(self) -> torch.Tensor | None:
        """Step levels' multipliers per column (`quantize.column_steps` of the Gram's diagonal; None without a Gram or
        with ``column_steps`` 0), made once."""
        power = self.config.annealing["column_steps"]
        if self._columns is None and power and self.gram is not None:
            self._columns = column_steps(self.gram.diagonal(), power)
        return self._columns

    @property
    def floor(self) -> int:
        if self._floor is None:
            self._floor = spectral_test(self.full.to_dense(), self.config).rank if self.config.annealing["keep_supported"] else 0
        return self._floor


def _tokenizer(finetuned_dir: Path, base_dir: Path, prompts: list[str]):
    """The fine-tune's tokenizer, or the base's: the first that encodes every calibration prompt to tokens
    (transformers builds an empty tokenizer, which encodes any text to none, for a checkpoint without tokenizer files)."""
    found = []
    for directory in (finetuned_dir, base_dir):
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError) as err:
            found.append(f"{directory}: {type(err).__name__}: {str(err).splitlines()[0]}")
            continue
        empty = next((i for i, ids in enumerate(tokenizer(prompts)["input_ids"]) if not ids), None)
        if empty is None:
            return tokenizer
        found.append(f"{directory}: encodes calibration prompt {empty} ({prompts[empty][:40]!r}) to no tokens")
    raise PromptError("mode='anneal' runs the fine-tune on its calibration prompts, with its tokenizer or the base's; neither "
                      f"encodes them ({'; '.join(found)}): save the tokenizer beside the fine-tune")


def _prompts(calibration, config: DecomposedConfig) -> list[str]:
    if calibration is None:
        raise PromptError("mode='anneal' needs calibration prompts (decompose(..., calibration=...)), disjoint from evaluation prompts")
    return load_prompts(calibration)[: int(config.annealing["calibration_prompts"])]


def anneal_model(model: nn.Module, deltas: dict[str, TensorDelta], finetuned_dir: Path, base_dir: Path, calibration, config: DecomposedConfig, progress: bool = True) -> tuple[dict[str, TensorDelta], dict]:
    """Anneal a model held in memory, built exact from `deltas` (`model.build_model`), with the fine-tune's
    tokenizer (or the base's). `anneal_streaming` does the same without the model."""
    prompts = _prompts(calibration, config)
    module_names, gram_names, unseen = {}, {}, off_text_path(model)
    for name, module in model.named_modules():
        if isinstance(module, DecomposedModule) and name not in unseen:
            if module._tied is None:
                module_names[module.delta.name] = name
            gram_names[module.delta.name] = name  # a tied head (visited after its embedding) weighs by its inputs
    floor_model = None
    if config.annealing["target"] == "floor":  # the bound: the fine-tune itself, served in bfloat16
        from transformers import AutoModelForCausalLM

        floor_model = AutoModelForCausalLM.from_pretrained(finetuned_dir, dtype=torch.bfloat16).eval()
    return anneal(model, deltas, _tokenizer(finetuned_dir, base_dir, prompts), prompts, config, module_names, gram_names, progress, floor_model)


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
    if config.annealing["target"] == "floor" and floor_model is None:
        raise ConfigError("annealing.target='floor' needs the fine-tune served in bfloat16 (anneal(..., floor_model=...))")
    names = [n for n, d in deltas.items() if n in module_names and d.get("dense") is not None and len(d.shape) == 2]
    layers: dict[str, list[str]] = defaultdict(list)
    for n in names:
        layers[_layer_of(module_names[n])].append(n)
    engine = _ModelEngine(model, module_names, gram_names or module_names, {n: deltas[n] for n in names})
    floor = (lambda calib: measure_floor(floor_model, calib, config.annealing["positions"], config.annealing["tie_tolerance"])) if floor_model is not None else None
    made: dict = {}
    choice, overrides, report = _drive(engine, dict(layers), lambda layer: {n: deltas[n] for n in layers[layer]}, made, tokenizer,
                                       calibration_prompts, config, progress, floor)
    kept = dict(deltas)
    for key in choice.values():
        kept.update(made[key])
    kept.update(overrides)
    return kept, report


def anneal_streaming(lw: Layerwise, annealed: dict[str, list[str]], store: DeltaStore, exact_key: dict[str, str], module_names: dict[str, str],
                     gram_names: dict[str, str], tokenizer, calibration_prompts: list[str], config: DecomposedConfig, progress: bool = True,
                     reference: Callable[[torch.dtype], Layerwise] | None = None) -> tuple[Callable[[str], dict[str, TensorDelta]], dict]:
    """Anneal layer by layer (`layerwise`): `lw` runs the base with the exact deltas of `store` (tensor name
    -> its key there: `exact_key`); `annealed` lists the tensors annealed per layer. `reference(dtype)` is
    the fine-tune's own runner in a dtype (greedy continuations; the floor target's bfloat16 bound).

    Returns the kept deltas of a tensor group as a function (what the artifact writer asks for) and the report.
    """
    made = _StoredLevels(store, exact_key, annealed)
    engine = _StreamEngine(lw, module_names, gram_names, made, reference)
    floor = None
    if config.annealing["target"] == "floor":
        floor = lambda calib: engine.floor(calib, config.annealing["positions"], config.annealing["tie_tolerance"])  # noqa: E731
    choice, overrides, report = _drive(engine, annealed, made.exact, made, tokenizer, calibration_prompts, config, progress, floor)
    lw.layer_deltas = lambda i: {}  # the engine is done: the runner no longer holds it (nor it the runner, in a cycle)
    chosen = {n: key for key in choice.values() for n in made.names(key)}

    def kept(key: str) -> dict[str, TensorDelta]:
        out = store.get(key)
        for name in [n for n in out if n in chosen and chosen[n][1] is not None]:
            out[name] = made.get(chosen[name], [name])[name]
        out.update({n: d for n, d in overrides.items() if n in out})
        return out

    return kept, report


def _drive(engine, layers: dict[str, list[str]], exact_of: Callable[[str], dict[str, TensorDelta]], made, tokenizer,
           calibration_prompts: list[str], config: DecomposedConfig, progress: bool, floor_of) -> tuple[dict, dict, dict]:
    """The schedule on an engine (`_ModelEngine`, `_StreamEngine`): returns each layer's chosen (layer,
    level) key in `made`, the deltas the precision step replaced, and the report."""
    t0 = time.perf_counter()
    opts = config.annealing_options()
    target = opts["target"]
    if target == "exact":  # lossless: nothing to anneal
        return {}, {}, {"target": target, "ladder": [], "levels": [], "trace": [], "precision": {"dtype": "float32", "accepted": False},
                        "calibration_prompts": len(calibration_prompts), "calibration_tokens": opts["calibration_tokens"], "seconds": 0.0}
    specs = [str(x) if isinstance(x, str) else f"lr{x}" for x in opts["levels"]]
    levels = config.annealing_levels()
    by_length = sorted(calibration_prompts, key=lambda p: len(tokenizer(p)["input_ids"]))  # batches of like lengths pad little (`batches`)
    calib = engine.calibrate(tokenizer, by_length, opts["calibration_tokens"])
    floor = None if floor_of is None else floor_of(calib)
    judge = {"target": target, "tolerance": opts["tolerance"], "max_flips": opts["expected_flips"], "positions": opts["positions"],
             "tie_tolerance": opts["tie_tolerance"], "floor": floor, "screen": engine.screen(calib) if target in ("tie", "identical") else None}
    rows = {}
    if opts["head_row_steps"]:  # the output head's matrix, a tied embedding's too: the delta its inputs weigh
        out = output_name(engine.model)
        head = [n for n in layers.get("~head", []) if engine.gram_names.get(n) == out]
        rows = dict.fromkeys(head, head_row_steps(calib, opts["head_row_steps"])) if head else {}
    cands = _Candidates(layers, exact_of, engine.grams, config, made.store if isinstance(made, _StoredLevels) else None, rows)
    order = sorted(layers, key=_layer_key)
    level_of: dict[str, int | None] = dict.fromkeys(order)

    def install(layer: str, level: int | None) -> dict[str, TensorDelta]:
        key = (layer, level)
        if key not in made:
            made[key] = exact_of(layer) if level is None else {n: _made_once(cands, n, levels[level]) for n in layers[layer]}
            if level is not None:  # its candidates' float64 transients, freed between the factors kept: pages given back
                release_free_memory()
        engine.install(layer, key, made)
        return made[key]

    def check(group: list[str] | str, level: int) -> bool:
        """The guard on the installed state; `group`: the layers just moved to `level` ("*": all of them)."""
        ok, stats = guard(engine, calib, **judge)
        if isinstance(group, str) or len(group) == 1:
            moved = {"layer": group if isinstance(group, str) else group[0]}
        else:  # a group of layers, in model order
            moved = {"layer": f"{_short(group[0])}-{_short(group[-1])}", "layers": group}
        trace.append({**moved, "level": specs[level], "accepted": ok, **stats})
        bar.set_postfix(layer=_short(moved["layer"]), level=specs[level], flips=f"{stats['expected_flips']:.2f}", accepted=ok)
        return ok

    trace: list[dict] = []
    with tqdm(total=len(order), desc="annealing", unit="layer", disable=not progress) as bar:
        if opts["schedule"] == "knapsack" and target in ("tie", "identical", "floor"):
            level_of.update(_knapsack(order, specs, install, cands, layers, engine, calib, judge, trace, bar))
        else:
            level_of.update(_ladder(order, len(levels), install, check, opts["max_time_s"] - (time.perf_counter() - t0), bar))
    cands.clear()
    per_layer, lowrank = [], {}
    for layer in order:
        chosen = install(layer, level_of[layer])
        lowrank.update({n: d for n, d in chosen.items() if [p.kind for p in d.parts] == ["lowrank"]})
        per_layer.append({"layer": layer, "level": None if level_of[layer] is None else specs[level_of[layer]],
                          "kept_params": sum(d.num_params() for d in chosen.values()),
                          "bytes": sum(d.nbytes() for d in chosen.values()),
                          "delta_params": sum(math.prod(d.shape) for d in chosen.values()),
                          "ranks": {n: chosen[n].rank for n in layers[layer]}})
        del chosen
    overrides = dict(lowrank)
    precision = _anneal_precision(engine, overrides, engine.module_names, calib, judge) if opts["precision"] else {"dtype": "float32", "accepted": False}
    overrides = {n: d for n, d in overrides.items() if d is not lowrank[n]}
    choice = {layer: (layer, level_of[layer]) for layer in order}
    return choice, overrides, {"target": target, "tie_tolerance": opts["tie_tolerance"], "floor": None if floor is None else asdict(floor), "schedule": opts["schedule"], "ladder": specs,
                               "levels": per_layer, "trace": trace, "precision": precision, "calibration_prompts": len(calibration_prompts),
                               "calibration_tokens": opts["calibration_tokens"], "seconds": time.perf_counter() - t0}


class _Candidates:
    """The `_Candidate`s of a layer (exact deltas, the Grams of their inputs on the exact model), made
    when first asked for. Without a `store` every layer's stay in memory; with one, only the layer last
    asked for does, and a layer left behind leaves its factors, error-feedback factors and the Grams a later
    visit may still use there, a Gram or factor its candidates share (an expert's gate and up rows') once."""

    def __init__(self, layers: dict[str, list[str]], exact_of: Callable[[str], dict[str, TensorDelta]], grams, config: DecomposedConfig,
                 store: DeltaStore | None = None, rows: dict[str, torch.Tensor] | None = None):
        self.layer_of = {n: layer for layer, names in layers.items() for n in names}
        self.exact_of, self.grams, self.config, self.store, self.rows = exact_of, grams, config, store, rows or {}
        opts = config.annealing_options()  # the knapsack weighs errors by the Grams, mixed levels refit on them
        self.grams_reused = opts["schedule"] == "knapsack" or any(level.mix is not None for level in config.annealing_levels())
        self.layer: str | None = None
        self.items: dict[str, _Candidate] = {}
        self.held: dict[str, dict[str, _Candidate]] = {}
        self.stored_as: dict[str, str] = {}  # "NAME.gram" / "NAME.feedback" stored under another candidate's name: the shared tensor's

    def __getitem__(self, name: str) -> _Candidate:
        layer = self.layer_of[name]
        if layer != self.layer:
            self.clear()
            self.items, self.layer = self.held.get(layer) or self._make(layer), layer
            if self.store is None:
                self.held[layer] = self.items
        return self.items[name]

    def _make(self, layer: str) -> dict[str, _Candidate]:
        deltas = self.exact_of(layer)
        key = f"candidates:{layer}"
        feedbacks: dict[int, Feedback] = {}
        if self.store is None or key not in self.store:
            grams = self.grams(layer, list(deltas))
            return {n: _Candidate(d, grams.get(n), self.config, rows=self.rows.get(n), cut=True, feedbacks=feedbacks) for n, d in deltas.items()}
        saved = self.store.get_tensors(key)
        saved |= {name: saved[src] for name, src in self.stored_as.items() if src in saved}  # the same tensor again, not a copy
        items, loaded = {}, {}
        for n, d in deltas.items():
            factors = tuple(saved[f"{n}.{k}"] for k in "uvs") if f"{n}.u" in saved else None
            floor = int(saved[f"{n}.floor"]) if f"{n}.floor" in saved else None
            feedback = None
            if f"{n}.feedback" in saved:  # a factor stored once for several candidates is one tensor here: made into one
                rows = saved[f"{n}.feedback"]
                if id(rows) not in loaded:
                    loaded[id(rows)] = Feedback(_upper_of(rows, len(saved[f"{n}.dead"])), saved[f"{n}.dead"])
                feedback = loaded[id(rows)]
            items[n] = _Candidate(d, saved.get(f"{n}.gram"), self.config, _factors=factors, _floor=floor, _feedback=feedback,
                                  _columns=saved.get(f"{n}.columns"), rows=self.rows.get(n), cut=True, rounded=_rounded_of(saved, n),
                                  feedbacks=feedbacks)
        return items

    def clear(self) -> None:
        """Forget the layer last asked for (with a store: saved there first, its Grams and factors)."""
        key = f"candidates:{self.layer}"
        if self.store is not None and self.layer is not None and key not in self.store:  # a first visit builds every factor it needs
            saved, first = {}, {}  # first: a shared tensor's name in the store, by its id

            def share(name: str, tensor: torch.Tensor) -> bool:  # whether `tensor` is stored under `name` (else under its first holder's)
                src = first.setdefault(id(tensor), name)
                if src != name:
                    self.stored_as[name] = src
                return src == name

            for n, c in self.items.items():
                if c.gram is not None and c._factors is not None:
                    c.round_factors()
                if c.gram is not None and self._gram_needed(c) and share(f"{n}.gram", c.gram):
                    saved[f"{n}.gram"] = c.gram
                if c._factors is not None:
                    saved.update({f"{n}.{k}": t for k, t in zip("uvs", c._factors)})
                if c._floor is not None:
                    saved[f"{n}.floor"] = torch.tensor(c._floor)
                if c._feedback is not None:
                    saved[f"{n}.dead"] = c._feedback.dead
                    if share(f"{n}.feedback", c._feedback.factor):
                        saved[f"{n}.feedback"] = _upper_rows(c._feedback.factor)
                if c.columns is not None:  # from the Gram, which a later visit may not have
                    saved[f"{n}.columns"] = c.columns
                for (r, bits), part in c.rounded.items():
                    saved.update({f"{n}.rounded.{r}.{bits}.{k}": getattr(part, k) for k in QuantLowRankPart.fields})
            if saved:
                self.store.put_tensors(key, saved)
        self.layer, self.items = None, {}
        release_free_memory()  # a layer's Grams, factors and their float64 transients: gone from resident memory, not only freed

    def let_go_of_gram(self, name: str) -> None:
        """Drop candidate `name`'s Gram where no later level needs it, what it gives made first (8-bit factors, column
        steps): a mixture's every expert holds an input-sized Gram (a 64-expert layer's 256 MiB, beside as much in
        error-feedback factors)."""
        c = self[name]
        if c.gram is not None and not self._gram_needed(c):
            c.round_factors()
            _ = c.columns
            c.gram = None

    def _gram_needed(self, c: _Candidate) -> bool:
        """Whether a later visit may use `c`'s Gram: for factors or an error-feedback factor not built yet, the knapsack's
        errors or a mixed level's refit (low-bit factors are rounded before it goes, `round_factors`). Else it stays
        out of the store (on the 1.5B synthetic Llama: a third of 1 GiB a layer)."""
        return self.grams_reused or c._factors is None or (c._feedback is None and bool(self.config.annealing["error_feedback"]))


def _rounded_of(saved: dict[str, torch.Tensor], name: str) -> dict[tuple[int, int], QuantLowRankPart]:
    """A candidate's rounded factors as `_Candidates.clear` stored them (``NAME.rounded.R.BITS.FIELD``)."""
    prefix, found = f"{name}.rounded.", defaultdict(dict)
    for key, t in saved.items():
        if key.startswith(prefix):
            r, bits, k = key[len(prefix) :].split(".")
            found[int(r), int(bits)][k] = t
    return {(r, bits): QuantLowRankPart(**f, bits=bits) for (r, bits), f in found.items()}


def _upper_rows(factor: torch.Tensor) -> torch.Tensor:
    """An upper-triangular matrix's rows from the diagonal on, one after another: half its bytes (the error-feedback
    factors were 8 of the 12.5 GB the 1.5B synthetic Llama's anneal stored)."""
    return torch.cat([factor[i, i:] for i in range(len(factor))])


def _upper_of(rows: torch.Tensor, n: int) -> torch.Tensor:
    """The (n, n) upper-triangular matrix whose `_upper_rows` are `rows`."""
    out, start = rows.new_zeros(n, n), 0
    for i in range(n):
        out[i, i:] = rows[start : start + n - i]
        start += n - i
    return out


class _ModelEngine:
    """Annealing on a model held in memory: every module a `DecomposedModule` whose delta is swapped."""

    def __init__(self, model: nn.Module, module_names: dict[str, str], gram_names: dict[str, str], annealed: dict[str, TensorDelta]):
        self.model, self.module_names, self.gram_names, self.annealed = model, module_names, gram_names, annealed
        self._grams: dict[str, torch.Tensor] | None = None
        self.calib: Calibration | None = None

    def calibrate(self, tokenizer, prompts: list[str], tokens: int) -> Calibration:
        self.calib = calibrate(self.model, tokenizer, prompts, tokens)
        self._grams = GramCollector({n: self.model.get_submodule(self.gram_names[n]) for n in self.annealed}).run(self.model, self.calib)
        return self.calib

    def grams(self, layer: str, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: self._grams[n] for n in names if n in self._grams}

    def install(self, layer: str, key, made) -> None:
        _install(self.model, made[key], self.module_names)

    def install_deltas(self, deltas: dict[str, TensorDelta]) -> None:
        _install(self.model, deltas, self.module_names)

    def logits(self, calib: Calibration, batch_size: int = 8) -> Iterator[torch.Tensor]:
        return _batch_logits(self.model, calib.input_ids, calib.attention_mask, calib.prompt_len, batch_size)

    @torch.no_grad()
    def head_inputs(self, calib: Calibration, batch_size: int = 8) -> Iterator[torch.Tensor]:
        """The head's inputs at the continuation positions, batch by batch (`logits` stopped at the head)."""
        for ids, mask in batches(calib.input_ids, calib.attention_mask, batch_size):
            yield head_input(self.model, input_ids=ids, attention_mask=mask, logits_to_keep=calib.logits_to_keep)[:, :-1].float()

    def head(self) -> nn.Linear | None:
        return head_linear(self.model)

    def screen(self, calib: Calibration) -> HeadScreen | None:
        """The guard's screened head (`screening`) on the exact model, as calibrated."""
        return HeadScreen.of(calib, _stacked(self.head_inputs(calib), len(calib.input_ids)), self.model)


# bytes of annealed levels held decoded in memory beside the store: a guard check re-materialises every layer after
# the one it changed, and decoding their codes again cost 1 s of a 7.3 s check on the default pair (every layer's level
# and the one tried there fit; two layers' of the 1.5B synthetic Llama)
HELD_BYTES = 2**27
# bytes of hidden states a guard check keeps beside the layer it starts from (`_StreamEngine.logits`): a check
# re-runs the layers after the first one it changed, from the nearest kept input (a refused group's halves start inside it)
INPUT_BYTES = 2**27


class _StoredLevels:
    """Each layer's deltas per level, built once, kept on disk (`DeltaStore`) and, within `held_bytes`, decoded
    in memory (the latest layers first: every check re-materialises the layers after the one it changed);
    level None: the exact deltas."""

    def __init__(self, store: DeltaStore, exact_key: dict[str, str], layers: dict[str, list[str]], held_bytes: int = HELD_BYTES):
        self.store, self.exact_key = store, exact_key
        self.layer_names = dict(layers)
        self.held: dict[tuple, dict[str, TensorDelta]] = {}
        self.held_sizes: dict[tuple, int] = {}
        self.held_bytes = held_bytes

    def __contains__(self, key) -> bool:
        return key[1] is None or self._key(key) in self.store

    def __setitem__(self, key, deltas: dict[str, TensorDelta]) -> None:
        if key[1] is not None:
            self.store.put(self._key(key), deltas)
            self._hold(key, deltas)

    def _hold(self, key, deltas: dict[str, TensorDelta]) -> None:
        """Keep `deltas` in memory with the level before it of the same layer (the installed one, if the guard refuses
        this), dropping the earliest layers' levels, oldest first, where the budget asks."""
        for old in [k for k in self.held if k[0] == key[0]][:-1]:
            del self.held[old], self.held_sizes[old]
        self.held[key] = deltas
        self.held_sizes[key] = sum(t.numel() * t.element_size() for d in deltas.values() for p in d.parts for t in p.buffers())
        while sum(self.held_sizes.values()) > self.held_bytes:
            out = min(self.held, key=lambda k: _layer_key(k[0]))
            del self.held[out], self.held_sizes[out]

    def __getitem__(self, key) -> dict[str, TensorDelta]:
        return self.get(key, None)

    def get(self, key, names: list[str] | None) -> dict[str, TensorDelta]:
        names = self.layer_names[key[0]] if names is None else names
        if key[1] is None:
            by_key: dict[str, list[str]] = defaultdict(list)
            for n in names:
                by_key[self.exact_key[n]].append(n)
            return {n: d for k, ns in by_key.items() for n, d in self.store.get(k, ns).items()}
        held = self.held.get(key)
        if held is None:
            held = self.store.get(self._key(key))
            self._hold(key, held)
        return {n: held[n] for n in names}

    def names(self, key) -> list[str]:
        return self.layer_names[key[0]]

    def exact(self, layer: str) -> dict[str, TensorDelta]:
        return self.get((layer, None), None)

    @staticmethod
    def _key(key) -> str:
        return f"{key[0]}@{key[1]}"


class _StreamEngine:
    """Annealing layer by layer (`Layerwise`): each decoder layer's installed level is a key into the
    stored levels, read when the layer is materialised; the hidden states entering each layer are kept for
    the installed state, so a change in layer i reruns layers i..N only."""

    def __init__(self, lw: Layerwise, module_names: dict[str, str], gram_names: dict[str, str], made: _StoredLevels, reference):
        self.lw, self.module_names, self.gram_names, self.made, self.reference = lw, module_names, gram_names, made, reference
        self.installed: dict[int, tuple] = {}  # decoder layer -> its installed (layer, level) key
        self.overrides: dict[int, dict[str, TensorDelta]] = defaultdict(dict)  # the precision step's proposals
        self.fixed: dict[int, dict[str, TensorDelta]] = {}  # deltas of tensors not annealed (norms, biases), read once
        self.inputs: dict[int, Hidden] = {}  # hidden states entering layer i in the installed state
        self.calls: list = []
        self.calib: Calibration | None = None
        self.keep_inputs = False
        self.ref_inputs: torch.Tensor | None = None  # the exact model's head inputs, from `calibrate` until `screen`
        lw.layer_deltas = self._deltas

    @property
    def model(self) -> nn.Module:
        return self.lw.model

    def _deltas(self, index: int) -> dict[str, TensorDelta]:
        if index not in self.fixed:
            names = [n for n in self.lw.by_layer.get(index, []) if n not in self.module_names]
            self.fixed[index] = self.made.get((None, None), names) if names else {}
        out = dict(self.fixed[index])
        key = self.installed.get(index)
        out.update(self.made[key] if key is not None else self._exact_annealed(index))
        out.update(self.overrides[index])
        return out

    def _exact_annealed(self, index: int) -> dict[str, TensorDelta]:
        names = [n for n in self.lw.by_layer.get(index, []) if n in self.module_names]
        return self.made.get((None, None), names) if names else {}

    def _index(self, layer: str) -> int | None:
        return self.lw.index_of(layer + ".")

    def install(self, layer: str, key, made) -> None:
        index = self._index(layer)
        if index is None:  # the resident embedding / head: swapped in place, every layer's input may change
            _install(self.lw.model, made[key], self.module_names)
            self.inputs.clear()
            return
        if self.installed.get(index) != key:
            self.installed[index] = key
            self._invalidate(index)

    def install_deltas(self, deltas: dict[str, TensorDelta]) -> None:
        resident = {n: d for n, d in deltas.items() if self._index(self.module_names[n]) is None}
        if resident:
            _install(self.lw.model, resident, self.module_names)
            self.inputs.clear()
        for n, d in deltas.items():
            index = self._index(self.module_names[n])
            if index is not None:
                self.overrides[index][n] = d
                self._invalidate(index)

    def _invalidate(self, index: int) -> None:
        for i in [i for i in self.inputs if i > index]:
            del self.inputs[i]

    def calibrate(self, tokenizer, prompts: list[str], tokens: int) -> Calibration:
        """Greedy continuations from the fine-tune's own runner; reference logits (and the exact model's
        inputs of every layer, for the Grams) from this one."""
        reference, bs = self.reference(self.lw.dtype), self.lw.batch_size
        jobs = [lambda b=prompts[s : s + bs], m=reference.model: greedy_generate(m, tokenizer, b, tokens, bs)  # batched as `greedy_generate` does
                for s in range(0, len(prompts), bs)]
        cont = torch.stack([t for batch in reference.in_step(jobs) for t in batch])
        del reference, jobs
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        ids = torch.cat([enc["input_ids"], cont], 1)
        mask = torch.cat([enc["attention_mask"], torch.ones_like(cont)], 1)
        self.calib = Calibration(ids, mask, enc["input_ids"].shape[1], *(torch.empty(0),) * 4)
        self.keep_inputs = True  # every layer's input on the exact model (its Grams' inputs), kept on disk until asked for
        final = self._final(self.calib)
        self.keep_inputs = False
        # held in the head's dtype: a bfloat16 model's logits are bfloat16 values (half the memory; float32 where used)
        logits = _stacked((out[:, :-1] for out in self.lw.head(final, ids, mask, self.calib.logits_to_keep)), len(ids))
        self.ref_inputs = _stacked(self._head(final, self.calib, inputs=True), len(ids))
        top2 = [row.float().topk(2, dim=-1) for row in logits]
        top1, second = torch.stack([t.indices[..., 0] for t in top2]), torch.stack([t.indices[..., 1] for t in top2])
        margin = torch.stack([t.values[..., 0] - t.values[..., 1] for t in top2])
        self.calib = Calibration(ids, mask, self.calib.prompt_len, top1, second, margin, logits)
        return self.calib

    def screen(self, calib: Calibration) -> HeadScreen | None:
        """The guard's screened head (`screening`) on the exact model's head inputs, kept from `calibrate`."""
        screen, self.ref_inputs = HeadScreen.of(calib, self.ref_inputs, self.lw.model), None
        return screen

    def logits(self, calib: Calibration) -> Iterator[torch.Tensor]:
        """The installed state's logits at the continuation positions, batch by batch."""
        return self._head(self._final(calib), calib)

    def head_inputs(self, calib: Calibration) -> Iterator[torch.Tensor]:
        """The installed state's head inputs at the continuation positions, batch by batch."""
        return self._head(self._final(calib), calib, inputs=True)

    def head(self) -> nn.Linear | None:
        return head_linear(self.lw.model)

    @torch.no_grad()
    def _head(self, final: Hidden, calib: Calibration, inputs: bool = False) -> Iterator[torch.Tensor]:
        """The logits (`inputs`: the head's inputs) at the continuation positions from the final hidden states."""
        for out in self.lw.head(final, calib.input_ids, calib.attention_mask, calib.logits_to_keep, inputs=inputs):
            yield out[:, :-1].float()

    @torch.no_grad()
    def _final(self, calib: Calibration) -> Hidden:
        """The installed state's final hidden states, from the latest kept layer input."""
        if 0 not in self.inputs:
            self.inputs[0], self.calls = self.lw.capture(calib.input_ids, calib.attention_mask)
        start = max(self.inputs)
        hidden = self.inputs[start]
        self.inputs = {i: h for i, h in self.inputs.items() if i in (0, start)}
        stride = max(1, math.ceil((len(self.lw.meta_layers) - start) * sum(h.nbytes for h in hidden) / INPUT_BYTES))
        for i, hidden in itertools.chain([(start, hidden)], self.lw.run(hidden, self.calls, start)):
            if self.keep_inputs:
                self.made.store.put_tensors(f"inputs:{i}", {str(b): h for b, h in enumerate(hidden)})
            if i == start + 1 or (i - start) % stride == 0:  # the next layer (a schedule's next move), and every stride-th
                self.inputs[i] = hidden
        return hidden

    @torch.no_grad()
    def grams(self, layer: str, names: list[str]) -> dict[str, torch.Tensor]:
        """X^T X of the inputs of `names`' modules on the exact model (its cached layer inputs)."""
        calib, index = self.calib, self._index(layer)
        bs = self.lw.batch_size
        if index is None:  # the head: its input is the final norm's output (no head delta changes it)
            collector = GramCollector({n: self.lw.model.get_submodule(self.gram_names[n]) for n in names})
            final = self._exact_inputs(len(self.lw.meta_layers))
            heads = self.lw.head(final, calib.input_ids, calib.attention_mask)
            for _, collector.mask in batches(calib.input_ids, calib.attention_mask, bs):
                next(heads)
            heads.close()
            return collector.close()
        layer_module = self.lw.layer(index, self._deltas_exact(index))
        skip = len(f"{self.lw.prefix}.{index}.")
        experts = {n: self.lw.expert_inputs[n] for n in names if n in self.lw.expert_inputs}
        collector = GramCollector({n: layer_module.get_submodule(self.gram_names[n][skip:]) for n in names}, experts)
        masks = (mask for _, mask in batches(calib.input_ids, calib.attention_mask, bs))
        for b, (h, collector.mask) in enumerate(zip(self._exact_inputs(index), masks)):  # asked for once: the candidates keep their Grams
            layer_module(h, *self.calls[b][index][0], **self.calls[b][index][1])
        return collector.close()

    def _exact_inputs(self, index: int) -> Hidden:
        """The hidden states entering layer `index` (the final ones: N) on the exact model, per batch."""
        saved = self.made.store.get_tensors(f"inputs:{index}")
        return [saved[str(b)].to(self.lw.device) for b in range(len(saved))]

    def _deltas_exact(self, index: int) -> dict[str, TensorDelta]:
        self._deltas(index)  # reads the fixed deltas
        return {**self.fixed[index], **self._exact_annealed(index)}

    def floor(self, calib: Calibration, positions: int, tie_tolerance: float) -> Floor:
        """The floor target's bound: the fine-tune served in bfloat16, layer by layer."""
        bf16 = self.reference(torch.bfloat16)
        hidden, calls = bf16.capture(calib.input_ids, calib.attention_mask)
        for _, hidden in bf16.run(hidden, calls, 0):
            pass
        heads = bf16.head(hidden, calib.input_ids, calib.attention_mask, calib.logits_to_keep)
        stats = _scores(calib, (x[:, :-1].float() for x in heads), positions, tie_tolerance)
        return Floor(stats["expected_flips_above_tolerance"], stats["mean_kl"])


def _ladder(order: list[str], n_levels: int, install, check, seconds: float, bar) -> dict[str, int | None]:
    """One temperature for the whole model by bisection over the levels, then heating in rounds: each round
    takes every layer still heating one level further, kept while the guard holds (rolled back and frozen at
    its first refusal), until no layer heats or `seconds` are spent, so that a time cap leaves the layers
    heated alike rather than the first ones fully and the last ones not at all. A round tries its layers in
    groups (in model order), one check a group; a refused group is split in halves, down to single layers
    (`_group_size`: groups shrink as the refused checks of the round before grow: near the guard's limit a check
    is a coin flip and single layers are cheapest). A check is started only while it and one more (the
    precision step's) fit in `seconds` at the longest check's pace."""
    t0, longest = time.perf_counter(), 0.0

    def timed(group: list[str] | str, level: int) -> bool:
        nonlocal longest
        start = time.perf_counter()
        ok = check(group, level)
        longest = max(longest, time.perf_counter() - start)
        return ok

    def room() -> bool:
        return time.perf_counter() - t0 + 2 * longest <= seconds

    lo, hi, best = 0, n_levels - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        for layer in order:
            install(layer, mid)
        if timed("*", mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    level_of = dict.fromkeys(order, best)
    for layer in order:
        install(layer, best)
    at = best  # the level every layer still heating is at
    heating = list(order) if at is None or at + 1 < n_levels else []
    refusals = 1
    while heating and room():
        nxt = 0 if at is None else at + 1
        size = _group_size(len(heating), refusals)
        if at == best:  # the first round: the bisection refused all of them together at its level
            size = min(size, (len(heating) + 1) // 2)
        pending = [heating[i : i + size] for i in range(0, len(heating), size)]
        refused, refused_checks = [], 0
        while pending and room():
            group = pending.pop(0)
            for layer in group:
                install(layer, nxt)
            if timed(group, nxt):
                level_of.update(dict.fromkeys(group, nxt))
                continue
            refused_checks += 1
            for layer in group:
                install(layer, level_of[layer])
            if len(group) == 1:
                refused += group
            else:
                pending[:0] = [group[: len(group) // 2], group[len(group) // 2 :]]
        heating = [layer for layer in heating if layer not in refused]
        bar.update(len(refused))
        if pending:  # the time ran out mid-round
            break
        at, refusals = nxt, refused_checks
        if nxt + 1 == n_levels:  # at the top: frozen
            break
    bar.update(len(heating))
    return level_of


def _group_size(layers: int, refusals: int) -> int:
    """Hwang's generalised binary splitting (1972): with about `refusals` of `layers` expected refused, groups of
    2^floor(log2((layers - refusals + 1) / refusals)) layers; single layers from about half refused."""
    if refusals <= 0:
        return layers
    if layers <= 2 * refusals - 2:
        return 1
    return 1 << int(math.log2((layers - refusals + 1) / refusals))  # at most (layers - refusals + 1) / refusals <= layers


def _knapsack(order: list[str], specs: list[str], install, cands: dict, layers: dict, model, calib: Calibration, judge: dict,
              trace: list[dict], bar, tries: int = 8) -> dict[str, int | None]:
    """Sensitivity-driven allocation (`allocation`): probe each layer alone at its most damaging
    level, scale to every level by the weighted output error, solve the knapsack for a damage
    budget, and bisect the budget against the guard (the largest accepted budget is kept)."""
    n_levels = len(specs)
    option: list[int | None] = [None, *range(n_levels)]  # option j of every layer: exact, then each level
    floor = judge["floor"]
    costs, damages = [], []
    for layer in order:
        full = {n: cands[n].full.to_dense() for n in layers[layer]}
        per_level = [install(layer, k) for k in range(n_levels)]  # bytes and calibration-weighted output error of every level
        cost = [float(sum(cands[n].full.nbytes() for n in layers[layer]))] + [float(sum(d.nbytes() for d in m.values())) for m in per_level]
        error = [0.0] + [sum(weighted_error(full[n] - m[n].to_dense(), cands[n].gram) for n in m) for m in per_level]
        del full, per_level
        probe = max(range(n_levels), key=lambda k: error[k + 1])
        install(layer, probe)  # the layer alone at its most damaging level
        _, stats = guard(model, calib, **judge)
        install(layer, None)
        trace.append({"layer": layer, "level": specs[probe], "accepted": None, "probe": True, **stats})
        if floor is None:  # flips scale with the RMS gap change: their squares add
            unit = stats["expected_flips"] ** 2 / judge["max_flips"] ** 2
        else:
            unit = stats["expected_flips"] ** 2 / max(floor.expected_flips, 1e-12) ** 2 + stats["mean_kl"] / max(floor.mean_kl, 1e-30)
        worst = error[probe + 1]
        costs.append(cost)
        damages.append([unit * e / worst if worst > 0 else 0.0 for e in error])
        bar.update(1)
    accepted, lo, hi, scale = None, 0.0, None, 1.0
    for _ in range(tries):  # the largest budget the guard accepts: grow x4 until a failure, then bisect
        choice = solve(costs, damages, scale)
        for layer, j in zip(order, choice):
            install(layer, option[j])
        ok = not any(choice)  # all exact: nothing to judge
        if not ok:
            ok, stats = guard(model, calib, **judge)
            trace.append({"layer": "*", "level": f"budget x{scale:.3g}", "accepted": ok, "bytes": sum(c[j] for c, j in zip(costs, choice)), **stats})
        if ok:
            accepted, lo = choice, scale
            scale = scale * 4 if hi is None else (lo * hi) ** 0.5
        else:
            hi = scale
            scale = (lo * hi) ** 0.5 if lo > 0 else scale / 4
    choice = accepted or [0] * len(order)
    return {layer: option[j] for layer, j in zip(order, choice)}


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


def _made_once(cands: _Candidates, name: str, level: Level) -> TensorDelta:
    """`name`'s delta at `level`, its Gram let go where no later level needs it (one candidate at a time: a layer's
    experts do not hold theirs until the last is made)."""
    delta = _level_delta(cands[name], level)
    cands.let_go_of_gram(name)
    return delta


def _level_delta(c: _Candidate, level: Level) -> TensorDelta:
    """A matrix's delta at `level`: its leading weighted directions, the rest in low-bit codes."""
    if level.mix is not None:
        return _mixed_lowrank(c, level.mix)
    full, (u, v, s) = c.full, c.factors
    r = 0 if level.eps is None else rank_for(s, level.eps, c.floor)
    if r > u.shape[1]:
        raise ValueError(f"level {level} keeps {r} directions of {full.name}; its candidate holds {u.shape[1]} (cut to its config's ladder)")
    if level.bits is None:  # low rank only
        if r >= min(full.shape) or r * sum(full.shape) >= full.num_params():
            return full
        return TensorDelta(full.name, full.shape, full.transposed, [LowRankPart(u[:, :r].contiguous(), v[:r].contiguous())])
    # the factors are rounded first (to bfloat16, or to codes of `factor_bits` with u refit to the rounded v on the
    # calibration Gram), so that the codes of the residual absorb their rounding too
    residual, lowrank = full.to_dense(), None
    if r:
        if level.factor_bits is None:
            lowrank = LowRankPart(u[:, :r].bfloat16().contiguous(), v[:r].bfloat16().contiguous())
            fu, fv = lowrank.u, lowrank.v
        else:
            lowrank = c.rounded_factors(r, level.factor_bits, residual)
            fu, fv = lowrank.factors()
        residual.addmm_(fu.float(), fv.float(), alpha=-1)  # in place: no second matrix of the delta's size
    # one bit is the same on both grids; a step quantizer is the signed grid with a step per row (and per column)
    grid = "signed" if level.bits == 1 or level.step is not None else c.config.annealing["grid"]
    feedback, columns = c.feedback, c.columns if level.step is not None else None
    if columns is not None:  # rounding w / columns on the Gram C H C is rounding w with a step per column
        residual.div_(columns.float())
        feedback = None if feedback is None else scaled_by_columns(feedback, columns)
    rows = c.rows if grid == "signed" and level.bits > 1 else None
    codes, scales = quantize_codes(residual, level.bits, level.group, gram=feedback, grid=grid, step=level.step, overwrite=True, row_steps=rows)
    del residual  # rounded over: freed before the codes' stored form is made
    kind = FullQuantPart if grid == "full" else QuantPart
    parts = [kind(codes, scales, level.bits, columns)] + ([] if lowrank is None else [lowrank])
    delta = TensorDelta(full.name, full.shape, full.transposed, parts)
    return delta if delta.nbytes() < full.nbytes() else full


# relative squared error of one factor rounded to b bits with a scale per direction (full grid, Gaussian entries)
FACTOR_ERROR = {0: 0.5, 2: 0.12, 3: 0.037, 4: 0.0113, 5: 0.0033, 6: 0.00095, 8: 6.4e-5}


def mixed_widths(s: torch.Tensor, shape: tuple[int, int], bits: float) -> list[int]:
    """Bits per factor entry of each direction (0: dropped) within `bits` per matrix entry: reverse water-filling
    over the directions' weighted energies ``s^2`` (Delta-CoMe's mixed precision, allocated by the numbers
    rather than by rank position). A direction at b bits leaves ``s^2 * 2 * FACTOR_ERROR[b]`` (u and v both
    rounded); each step up is taken in order of error removed per stored bit while the budget lasts."""
    m, n = shape
    ladder = sorted(FACTOR_ERROR)
    energy = s.double().square().tolist()
    steps = []  # (error removed per bit, direction, width): within a direction the ratios fall, so the order keeps steps in sequence
    for i, e in enumerate(energy):
        for lo, hi in zip(ladder, ladder[1:]):
            cost = (hi - lo) * (m + n) + (32 if lo == 0 else 0)  # a direction's first step pays its two bfloat16 scales
            steps.append((2 * e * (FACTOR_ERROR[lo] - FACTOR_ERROR[hi]) / cost, cost, i, hi))
    widths, budget = [0] * len(energy), bits * m * n
    for gain, cost, i, width in sorted(steps, key=lambda t: -t[0]):
        if gain <= 0 or cost > budget:
            break
        widths[i], budget = width, budget - cost
    return widths


def _mixed_lowrank(c: _Candidate, bits: float) -> TensorDelta:
    """A matrix's delta as its weighted directions in low-bit factors (`mixed_widths`) within `bits` per entry,
    the rest dropped; with ``error_feedback`` each width's ``u`` is refit to its rounded ``v`` on the calibration Gram."""
    full, (u, v, s) = c.full, c.factors
    widths = torch.tensor(mixed_widths(s, full.shape, bits))
    if widths[u.shape[1] :].any():
        raise ValueError(f"mix{bits} keeps directions of {full.name} past the {u.shape[1]} its candidate holds (cut to its config's ladder)")
    parts, dense, gram = [], full.to_dense(), c.refit_gram
    for width in sorted({int(w) for w in widths if w}, reverse=True):
        idx = (widths == width).nonzero()[:, 0]
        part = QuantLowRankPart.quantize(u[:, idx], v[idx], width, gram, None if gram is None else dense)
        parts.append(part)
        du, dv = part.factors()
        dense = dense - du @ dv  # the next width's refit sees what this one left
    delta = TensorDelta(full.name, full.shape, full.transposed, parts)
    return delta if delta.nbytes() < full.nbytes() else full


def _install(model: nn.Module, deltas: dict[str, TensorDelta], module_names: dict[str, str]) -> None:
    if not isinstance(model, nn.Module):  # an annealing engine
        model.install_deltas(deltas)
        return
    for name, delta in deltas.items():
        module = model.get_submodule(module_names[name])
        module.set_delta(delta)


def _layer_of(module_name: str) -> str:
    parts = module_name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in LAYER_LISTS and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return "~head"  # embeddings / tied head: annealed last, on the final hidden states


def _short(layer: str) -> str:
    return layer.rsplit(".", 1)[-1] if layer[-1:].isdigit() else layer


def _layer_key(layer: str) -> tuple[int, str]:
    tail = layer.rsplit(".", 1)[-1]
    return (int(tail), layer) if tail.isdigit() else (1 << 30, layer)
