"""Equivalence: does the decomposed model generate what the fine-tuned model generates?

Greedy ``generate()`` of both models on held-out prompts, token for token, plus teacher-forced
logit metrics on the reference continuation (max |logit diff|, mean KL, top-1 agreement), the
reference's own top-1/top-2 margin where a generation diverges (a near-tie there flips under any
change of the weights), and the perplexity of both models on the prompt texts. The summary is computed by the `evaluate` metric
``hf_decompose/metrics/generation_equivalence``.

Three grades, reported together (see the metric for the exact rules): *exact* (identical token
sequences), *tie-equivalent* (identical, or the first divergence is a near-tie of the fine-tune,
margin below ``tie_tolerance`` = 1e-3 logits by default, resolved the other way: each model's
token is the other's runner-up) and vLLM's ``check_logprobs_close`` rule (at the first divergence
each token is in the other's top 5). `noise_floor` measures the same grades for the fine-tune
against itself under deployment changes (`hf_decompose.floor`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import PromptError
from .metrics import TIE_TOLERANCE, TOP_K, load_generation_equivalence

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
logger = logging.getLogger(__name__)
DATASET_FILES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


@dataclass
class EquivalenceResult:
    exact_match_rate: float
    num_prompts: int
    max_new_tokens: int
    first_divergence: list[int | None]
    max_abs_logit_diff: float
    mean_kl: float
    top1_agreement: float
    perplexity_reference: float
    perplexity_candidate: float
    per_prompt_max_abs_logit_diff: list[float] = field(default_factory=list)
    divergence_margins: list[float | None] = field(default_factory=list)  # reference top-1 - top-2 logit there
    dtype: str = ""  # the reference's parameter dtype: what the comparison ran in
    identical: int = 0  # prompts with identical continuations (the exact grade)
    tie_equivalent_rate: float = 0.0
    logprobs_close_rate: float = 0.0  # vLLM's check_logprobs_close rule
    tie_tolerance: float = TIE_TOLERANCE
    tie_equivalent: list[bool] = field(default_factory=list)
    logprobs_close: list[bool] = field(default_factory=list)
    candidate_divergence_margins: list[float | None] = field(default_factory=list)  # candidate's own margin there

    def to_dict(self) -> dict:
        return asdict(self)


def _load_dataset(source: str, split: str | None):
    """A `datasets` dataset from a data file (.csv, .json, .parquet, ...), a folder or a Hub dataset id."""
    import datasets

    path = Path(source)
    try:
        if path.is_file():
            extra = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
            data = datasets.load_dataset(DATASET_FILES[path.suffix], data_files=str(path), split=split or "train", **extra)
        else:
            data = datasets.load_dataset(str(source), split=split)
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError, ...)
        raise PromptError(f"cannot load prompts from {source!r} with datasets.load_dataset: {err}") from err
    if isinstance(data, datasets.DatasetDict):
        name = next((s for s in ("test", "validation", "train") if s in data), next(iter(data)))
        data = data[name]
    return data


def load_prompts(source, split: str | None = None, column: str | None = None) -> list[str]:
    """Prompts from a list of strings, a `datasets.Dataset` (`column`, default ``prompt`` or ``text``), a
    ``.txt`` (one per line) / ``.jsonl`` (``{"prompt": ...}`` or ``{"text": ...}``) file, or anything
    else `datasets.load_dataset` reads (a .csv / .json / .parquet file, a folder, a Hub dataset id;
    `split` defaults to test, then validation, then train)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if (path.suffix in DATASET_FILES) if path.is_file() else (path.suffix not in (".txt", ".jsonl")):
            source = _load_dataset(str(source), split)  # a data file, a folder or a Hub dataset id
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise PromptError(f"prompt file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise PromptError(f"{path}: not UTF-8 text ({err}); prompt files must be UTF-8") from err
        except OSError as err:
            raise PromptError(f"cannot read the prompt file {path}: {err}") from err
        if path.suffix == ".jsonl":
            try:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
                prompts = [row.get("prompt", row.get("text")) for row in rows]
            except (json.JSONDecodeError, AttributeError) as err:
                raise PromptError(f"{path}: not JSON lines with a 'prompt' or 'text' field ({err})") from err
        else:
            prompts = [line for line in text.splitlines() if line.strip()]
        where = str(path)
    elif hasattr(source, "column_names"):
        column = column or next((c for c in ("prompt", "text") if c in source.column_names), None)
        if column not in source.column_names:
            raise PromptError(f"dataset has no {column or 'prompt or text'!r} column (columns: {source.column_names})")
        prompts, where = list(source[column]), "dataset"
    elif isinstance(source, (list, tuple)):
        prompts, where = list(source), "prompt list"
    else:
        raise PromptError(f"prompts must be a list of strings, a file or a datasets.Dataset, not {type(source).__name__}")
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise PromptError(f"{where}: the prompt set is empty or holds empty/non-text prompts")
    return prompts


def check_disjoint(calib: list[str], eval: list[str]) -> None:
    """Raise `PromptError` naming a prompt found in both sets (whitespace-normalized)."""
    seen = {" ".join(p.split()) for p in calib}
    overlap = [p for p in eval if " ".join(p.split()) in seen]
    if overlap:
        raise PromptError(f"calibration and evaluation prompts overlap ({len(overlap)} shared), e.g. {overlap[0][:80]!r}")


def context_length(config) -> int | None:
    """The longest sequence a model's config admits (None when it states none)."""
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def bound_prompts(tokenizer, prompts: list[str], max_new_tokens: int, context: int | None, max_prompt_tokens: int | None = None) -> None:
    """Check prompt lengths before any model runs. Prompts over `max_prompt_tokens` tokens will be
    truncated to it (a warning says which); a prompt that, with `max_new_tokens`, would not fit the
    model's `context` raises `PromptError` naming it."""
    if max_prompt_tokens is not None and (type(max_prompt_tokens) is not int or max_prompt_tokens < 1):
        raise PromptError(f"max_prompt_tokens={max_prompt_tokens!r} must be a positive integer")
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    if 0 in lengths:  # nothing to condition on; an empty tokenizer (transformers' where a checkpoint ships none) encodes any text so
        i = lengths.index(0)
        raise PromptError(f"prompt {i} ({prompts[i][:40]!r}) encodes to no tokens with this tokenizer ({type(tokenizer).__name__})")
    if max_prompt_tokens is not None:
        long = [i for i, n in enumerate(lengths) if n > max_prompt_tokens]
        if long:
            logger.warning("%d prompt(s) longer than %d tokens are truncated to it (prompt %d: %d tokens)",
                           len(long), max_prompt_tokens, long[0], lengths[long[0]])
        lengths = [min(n, max_prompt_tokens) for n in lengths]
    if context is not None:
        worst = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[worst] + max_new_tokens > context:
            raise PromptError(
                f"prompt {worst} ({prompts[worst][:40]!r}...) has {lengths[worst]} tokens: with {max_new_tokens} new tokens it exceeds "
                f"the model's context of {context}; shorten it or pass --max-prompt-tokens / max_prompt_tokens= to truncate"
            )


def _encode(tokenizer, prompts: list[str], max_prompt_tokens: int | None):
    truncate = {} if max_prompt_tokens is None else {"truncation": True, "max_length": max_prompt_tokens}
    return tokenizer(prompts, return_tensors="pt", padding=True, **truncate)


def _prepare(tokenizer):
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@torch.no_grad()
def greedy_generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8, progress: bool = False, max_prompt_tokens: int | None = None
) -> list[torch.Tensor]:
    """New tokens of greedy generation, one tensor per prompt (padded to max_new_tokens after EOS);
    prompt lengths are checked first (`bound_prompts`)."""
    tokenizer = _prepare(tokenizer)
    bound_prompts(tokenizer, prompts, max_new_tokens, context_length(model.config), max_prompt_tokens)
    return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress, max_prompt_tokens)


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, progress: bool, max_prompt_tokens: int | None) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    outputs = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress):
        batch = _encode(tokenizer, prompts[start : start + batch_size], max_prompt_tokens).to(device)
        out = model.generate(
            **batch, do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None,
        )
        outputs.extend(row[batch["input_ids"].shape[1] :].cpu() for row in out)
    return outputs


@torch.no_grad()
def verify_equivalence(
    reference,
    candidate,
    tokenizer,
    prompts,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: bool = True,
    reference_tokens: list[torch.Tensor] | None = None,
    max_prompt_tokens: int | None = None,
    *,
    tie_tolerance: float = TIE_TOLERANCE,
) -> EquivalenceResult:
    """Compare greedy generations and teacher-forced logits of `candidate` against `reference`
    (pass `reference_tokens`, from `greedy_generate`, to compare several candidates with one run).
    Prompt lengths are checked before either model runs (`bound_prompts`)."""
    prompts = load_prompts(prompts)
    tokenizer = _prepare(tokenizer)
    bound_prompts(tokenizer, prompts, max_new_tokens, context_length(reference.config), max_prompt_tokens)
    ref_tokens = reference_tokens or _generate(reference, tokenizer, prompts, max_new_tokens, batch_size, progress, max_prompt_tokens)
    cand_tokens = _generate(candidate, tokenizer, prompts, max_new_tokens, batch_size, progress, max_prompt_tokens)
    return compare(reference, candidate, tokenizer, prompts, ref_tokens, cand_tokens, batch_size, tie_tolerance, max_prompt_tokens)


def kl_divergence(reference: torch.Tensor, logits: torch.Tensor, change: torch.Tensor | None = None) -> torch.Tensor:
    """KL(reference || model) per position, from the logits' change d (`change`: ``logits - reference``, when at
    hand): ``log E_p[e^d] - E_p[d]`` under the reference's p, summed as ``log1p(E_p[expm1 d])``; the difference of
    two log-softmaxes loses a close model's small KL to float32 rounding (5% of 5e-7 on a 49152-token vocabulary)."""
    change = logits - reference if change is None else change
    p = reference.softmax(-1)
    return torch.log1p(torch.linalg.vecdot(p, torch.expm1(change))) - torch.linalg.vecdot(p, change)


@torch.no_grad()
def compare(reference, candidate, tokenizer, prompts: list[str], ref_tokens: list[torch.Tensor], cand_tokens: list[torch.Tensor],
            batch_size: int = 8, tie_tolerance: float = TIE_TOLERANCE, max_prompt_tokens: int | None = None) -> EquivalenceResult:
    """Grade continuations already generated, with both models' teacher-forced logits on the reference's."""
    tokenizer = _prepare(tokenizer)
    kl, top1, max_diff, margins, cand_margins, ref_top, cand_top = [], [], [], [], [], [], []  # per prompt
    nll = {"reference": [0.0, 0], "candidate": [0.0, 0]}
    device = next(reference.parameters()).device
    for start in range(0, len(prompts), batch_size):
        enc = _encode(tokenizer, prompts[start : start + batch_size], max_prompt_tokens)
        cont = torch.stack(ref_tokens[start : start + batch_size])
        ids = torch.cat([enc["input_ids"], cont], 1).to(device)
        mask = torch.cat([enc["attention_mask"], torch.ones_like(cont)], 1).to(device)
        lr = reference(input_ids=ids, attention_mask=mask).logits.float()
        lc = candidate(input_ids=ids, attention_mask=mask).logits.float()
        plen = enc["input_ids"].shape[1]
        cr, cc = lr[:, plen - 1 : -1], lc[:, plen - 1 : -1]  # positions that predict the continuation
        max_diff += (cr - cc).abs().amax(dim=(1, 2)).tolist()
        kl += [kl_divergence(r, c).tolist() for r, c in zip(cr, cc)]  # prompt by prompt: in cache
        top1 += (cr.argmax(-1) == cc.argmax(-1)).int().tolist()
        for logits, tops, gaps in ((cr, ref_top, margins), (cc, cand_top, cand_margins)):
            best = logits.topk(TOP_K, dim=-1)
            tops += best.indices.tolist()
            gaps += (best.values[..., 0] - best.values[..., 1]).tolist()
        targets = ids[:, 1:plen]
        valid = mask[:, :plen - 1].bool() & mask[:, 1:plen].bool()
        for key, logits in (("reference", lr), ("candidate", lc)):
            loss = F.cross_entropy(logits[:, : plen - 1].transpose(1, 2), targets, reduction="none")
            nll[key][0] += float(loss[valid].sum())
            nll[key][1] += int(valid.sum())
    summary = load_generation_equivalence().compute(
        predictions=[t.tolist() for t in cand_tokens], references=[t.tolist() for t in ref_tokens],
        position_kl=kl, position_top1=top1, prompt_max_abs_logit_diff=max_diff,
        reference_top=ref_top, candidate_top=cand_top, reference_margin=margins, tie_tolerance=tie_tolerance,
    )
    divergence = summary["first_divergence"]
    return EquivalenceResult(
        exact_match_rate=summary["exact_match_rate"],
        num_prompts=len(prompts),
        max_new_tokens=len(ref_tokens[0]) if ref_tokens else 0,
        first_divergence=divergence,
        max_abs_logit_diff=summary["max_abs_logit_diff"],
        mean_kl=summary["mean_kl"],
        top1_agreement=summary["top1_agreement"],
        perplexity_reference=float(torch.exp(torch.tensor(nll["reference"][0] / max(nll["reference"][1], 1)))),
        perplexity_candidate=float(torch.exp(torch.tensor(nll["candidate"][0] / max(nll["candidate"][1], 1)))),
        per_prompt_max_abs_logit_diff=summary["per_prompt_max_abs_logit_diff"],
        divergence_margins=summary["divergence_margins"],
        dtype=str(next(reference.parameters()).dtype).removeprefix("torch."),
        identical=sum(d is None for d in divergence),
        tie_equivalent_rate=summary["tie_equivalent_rate"],
        logprobs_close_rate=summary["logprobs_close_rate"],
        tie_tolerance=tie_tolerance,
        tie_equivalent=summary["tie_equivalent"],
        logprobs_close=summary["logprobs_close"],
        candidate_divergence_margins=[None if d is None or d >= len(m) else m[d] for d, m in zip(divergence, cand_margins)],
    )
