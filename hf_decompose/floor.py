"""The noise floor: the fine-tune against itself under the numerical changes a deployment makes anyway.

Each variant is the same fine-tune served differently, graded on the same prompts as a decomposed
model (`equivalence.compare`): ``bfloat16`` (weights and compute in bfloat16, as most people serve
it), ``batch_size`` (generated at twice the batch size, scored one prompt at a time: other padding
and matmul shapes),
``threads`` (another CPU thread count) and ``delta_bfloat16`` (the weights rebuilt as base +
bfloat16(fine-tune - base); needs the base). A decomposed model whose grades and KL match the
floor's is as close to the fine-tune as the fine-tune is to itself when deployed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from torch import nn

from .equivalence import EquivalenceResult, compare, greedy_generate, load_prompts
from .errors import CheckpointError, ConfigError
from .metrics import TIE_TOLERANCE

VARIANTS = ("bfloat16", "batch_size", "threads", "delta_bfloat16")


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Deployed(nn.Module):
    """`model` run at `threads` CPU threads, and with `rows` one sequence per forward call."""

    def __init__(self, model: nn.Module, threads: int | None = None, rows: bool = False):
        super().__init__()
        self.model, self.threads, self.rows = model, threads, rows

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        with _threads(self.threads):
            if not self.rows:
                return self.model(input_ids=input_ids, attention_mask=attention_mask)
            masks = [None] * len(input_ids) if attention_mask is None else attention_mask
            logits = [self.model(input_ids=i[None], attention_mask=None if m is None else m[None]).logits for i, m in zip(input_ids, masks)]
            return SimpleNamespace(logits=torch.cat(logits))

    def generate(self, *args, **kwargs):
        with _threads(self.threads):
            return self.model.generate(*args, **kwargs)

    @property
    def config(self):
        return self.model.config


@torch.no_grad()
def with_bf16_delta(finetuned: nn.Module, base: nn.Module) -> nn.Module:
    """A copy of `finetuned` whose weights are base + bfloat16(finetuned - base)."""
    model = copy.deepcopy(finetuned)
    base_params = dict(base.named_parameters())
    for name, p in model.named_parameters():
        b = base_params.get(name)
        if b is None or b.shape != p.shape:
            raise CheckpointError(f"delta_bfloat16 floor: the base has no parameter {name} of shape {tuple(p.shape)}")
        p.copy_(b.float() + (p.float() - b.float()).bfloat16().float())
    return model


def variant(name: str, finetuned: nn.Module, base: nn.Module | None = None, batch_size: int = 8) -> tuple[nn.Module, str, int]:
    """(the fine-tune served as variant `name`, a description, the batch size it generates at)."""
    if name == "bfloat16":
        return copy.deepcopy(finetuned).to(torch.bfloat16), "weights and compute in bfloat16", batch_size
    if name == "batch_size":
        return Deployed(finetuned, rows=True), f"generated {2 * batch_size} prompts per batch, scored one at a time", 2 * batch_size
    if name == "threads":
        n = 1 if torch.get_num_threads() > 1 else 2
        return Deployed(finetuned, threads=n), f"{n} CPU thread(s) instead of {torch.get_num_threads()}", batch_size
    if name == "delta_bfloat16":
        if base is None:
            raise ConfigError("the delta_bfloat16 floor needs the base model")
        return with_bf16_delta(finetuned, base), "base + bfloat16(fine-tune - base)", batch_size
    raise ConfigError(f"unknown noise-floor variant {name!r}; expected one of {VARIANTS}")


def noise_floor(
    finetuned: nn.Module,
    tokenizer,
    prompts,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    base: nn.Module | None = None,
    variants: tuple[str, ...] | None = None,
    reference_tokens: list[torch.Tensor] | None = None,
    tie_tolerance: float = TIE_TOLERANCE,
    progress: bool = False,
) -> dict[str, dict]:
    """Grade each deployment variant of `finetuned` against `finetuned` itself on `prompts`.

    Returns ``{variant: EquivalenceResult.to_dict() | {"setting": ...}}``; by default every variant
    (``delta_bfloat16`` only when `base` is given).
    """
    prompts = load_prompts(prompts)
    names = variants or tuple(v for v in VARIANTS if v != "delta_bfloat16" or base is not None)
    ref_tokens = reference_tokens or greedy_generate(finetuned, tokenizer, prompts, max_new_tokens, batch_size, progress)
    out = {}
    for name in names:
        model, setting, gen_batch = variant(name, finetuned, base, batch_size)
        tokens = greedy_generate(model, tokenizer, prompts, len(ref_tokens[0]), gen_batch, progress)
        result: EquivalenceResult = compare(finetuned, model, tokenizer, prompts, ref_tokens, tokens, batch_size, tie_tolerance)
        out[name] = result.to_dict() | {"setting": setting}
        del model
    return out
