"""Equivalence: does the decomposed model generate what the fine-tuned model generates?

Greedy ``generate()`` of both models on held-out prompts, token for token, plus teacher-forced
logit metrics on the reference continuation (max |logit diff|, mean KL, top-1 agreement) and the
perplexity of both models on the prompt texts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import PromptError


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

    def to_dict(self) -> dict:
        return asdict(self)


def load_prompts(source) -> list[str]:
    """Prompts from a list of strings, a `datasets.Dataset` (column ``prompt`` or ``text``), or a
    ``.txt`` (one per line) / ``.jsonl`` (``{"prompt": ...}`` or ``{"text": ...}``) file."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise PromptError(f"prompt file {path} does not exist")
        if path.suffix == ".jsonl":
            try:
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                prompts = [row.get("prompt", row.get("text")) for row in rows]
            except (json.JSONDecodeError, AttributeError) as err:
                raise PromptError(f"{path}: not JSON lines with a 'prompt' or 'text' field ({err})") from err
        else:
            prompts = [line for line in path.read_text().splitlines() if line.strip()]
        where = str(path)
    elif hasattr(source, "column_names"):
        column = next((c for c in ("prompt", "text") if c in source.column_names), None)
        if column is None:
            raise PromptError(f"dataset has no 'prompt' or 'text' column (columns: {source.column_names})")
        prompts, where = list(source[column]), "dataset"
    else:
        prompts, where = list(source), "prompt list"
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise PromptError(f"{where}: the prompt set is empty or holds empty/non-text prompts")
    return prompts


def _prepare(tokenizer):
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8, progress: bool = False) -> list[torch.Tensor]:
    """New tokens of greedy generation, one tensor per prompt (padded to max_new_tokens after EOS)."""
    tokenizer = _prepare(tokenizer)
    device = next(model.parameters()).device
    outputs = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
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
) -> EquivalenceResult:
    """Compare greedy generations and teacher-forced logits of `candidate` against `reference`."""
    prompts = load_prompts(prompts)
    ref_tokens = greedy_generate(reference, tokenizer, prompts, max_new_tokens, batch_size, progress)
    cand_tokens = greedy_generate(candidate, tokenizer, prompts, max_new_tokens, batch_size, progress)
    first_div: list[int | None] = []
    for r, c in zip(ref_tokens, cand_tokens):
        diff = (r != c).nonzero()
        first_div.append(int(diff[0]) if len(diff) else None)
    max_diff, kl_sum, agree, n_pos = 0.0, 0.0, 0, 0
    nll = {"reference": [0.0, 0], "candidate": [0.0, 0]}
    device = next(reference.parameters()).device
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        cont = torch.stack(ref_tokens[start : start + batch_size])
        ids = torch.cat([enc["input_ids"], cont], 1).to(device)
        mask = torch.cat([enc["attention_mask"], torch.ones_like(cont)], 1).to(device)
        lr = reference(input_ids=ids, attention_mask=mask).logits.float()
        lc = candidate(input_ids=ids, attention_mask=mask).logits.float()
        plen = enc["input_ids"].shape[1]
        cr, cc = lr[:, plen - 1 : -1], lc[:, plen - 1 : -1]  # positions that predict the continuation
        max_diff = max(max_diff, float((cr - cc).abs().max()))
        kl_sum += float(F.kl_div(F.log_softmax(cc, -1), F.log_softmax(cr, -1), log_target=True, reduction="sum"))
        agree += int((cr.argmax(-1) == cc.argmax(-1)).sum())
        n_pos += cr.shape[0] * cr.shape[1]
        targets = ids[:, 1:plen]
        valid = mask[:, :plen - 1].bool() & mask[:, 1:plen].bool()
        for key, logits in (("reference", lr), ("candidate", lc)):
            loss = F.cross_entropy(logits[:, : plen - 1].transpose(1, 2), targets, reduction="none")
            nll[key][0] += float(loss[valid].sum())
            nll[key][1] += int(valid.sum())
    matches = sum(d is None for d in first_div)
    return EquivalenceResult(
        exact_match_rate=matches / len(prompts),
        num_prompts=len(prompts),
        max_new_tokens=max_new_tokens,
        first_divergence=first_div,
        max_abs_logit_diff=max_diff,
        mean_kl=kl_sum / max(n_pos, 1),
        top1_agreement=agree / max(n_pos, 1),
        perplexity_reference=float(torch.exp(torch.tensor(nll["reference"][0] / max(nll["reference"][1], 1)))),
        perplexity_candidate=float(torch.exp(torch.tensor(nll["candidate"][0] / max(nll["candidate"][1], 1)))),
    )
