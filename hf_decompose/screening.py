"""The guard's statistics from a few head rows per position, certified against the whole vocabulary.

A guard check under the ``tie`` and ``identical`` targets needs, at each calibration position, the model's
two largest logits and its logits at the reference's top-1 and top-2 tokens: not the whole
(positions x vocabulary) logit matrix, whose head product and scoring were a sixth of a check on the default
pair. `HeadScreen` computes the logits of the reference's top-k tokens of each position only, and bounds
every other token j: with x the model's head input, x_r the reference's and W the head,

    x . w_j = x_r . w_j + (x - x_r) . w_j <= R + ||x - x_r|| max_i ||w_i||,

where R is the largest reference logit outside the top-k (for the head installed now). Where the model's
second candidate logit exceeds the bound, its top-2 lie among the candidates; elsewhere the position's whole
row is computed. The verdicts are those of the whole head; the mean KL and the largest logit change are
not computed (the ``floor``, ``kl`` and ``exact`` targets, which need them, run the whole head).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError
from .modules import DecomposedModule

if TYPE_CHECKING:
    from .annealing import Calibration

CANDIDATES = 64  # tokens per position whose logits a screened check computes
# the bound's room for float32 rounding: relative to the logits' size (a 576-term dot product rounds at ~1e-6 of it)
SLACK = 1e-4


class Screened(NamedTuple):
    """One prompt's screened positions: the model's top-2 tokens, the reference's top-1, top-2 and margin
    they are judged against, the change of the reference's top-1/top-2 gap, and how many positions' whole
    rows were computed."""

    top2: torch.Tensor
    top1: torch.Tensor
    second: torch.Tensor
    margin: torch.Tensor
    change: torch.Tensor
    whole_rows: int


class _HeadInput(Exception):
    def __init__(self, value: torch.Tensor):
        super().__init__("the head's input")
        self.value = value


def head_input(model: nn.Module, **inputs) -> torch.Tensor:
    """The input of `model`'s head (the final norm's output at the kept positions) on `inputs`: the model
    runs its own forward and stops at the head (the way GPTQ-style quantizers catch a block's input)."""

    def stop(module, args):
        raise _HeadInput(args[0])

    hook = model.get_output_embeddings().register_forward_pre_hook(stop)
    try:
        model(**inputs)
    except _HeadInput as caught:
        return caught.value
    finally:
        hook.remove()
    raise RuntimeError("the model's forward did not reach its output embeddings")


def head_linear(model: nn.Module) -> nn.Linear | None:
    """The float32 linear map `model`'s head computes (a decomposed head: its merged weight), if it is one."""
    head = model.get_output_embeddings()
    if isinstance(head, DecomposedModule):
        try:
            head = head.merged_module()
        except ConfigError:  # the base weights are offloaded
            return None
    if type(head) is not nn.Linear or head.weight.dtype != torch.float32:
        return None
    return head


class HeadScreen:
    """Screened guard statistics (`rows`) against `calib`'s reference, whose head inputs are `ref_inputs`
    (prompts, positions, hidden) and whose head is `head` (the exact one, as calibrated)."""

    def __init__(self, calib: Calibration, ref_inputs: torch.Tensor, head: nn.Linear, k: int = CANDIDATES):
        self.calib, self.ref_inputs = calib, ref_inputs
        self.cand = calib.logits.topk(min(k, calib.logits.shape[-1]), dim=-1).indices  # (prompts, positions, k)
        ref = torch.stack([self._candidate_logits(ref_inputs[p], p, head) for p in range(len(ref_inputs))])
        top2 = ref.topk(2, dim=-1)  # the reference in the arithmetic of a screened check: an exact model scores 0 change
        self.top1_at, self.second_at = top2.indices[..., 0], top2.indices[..., 1]
        self.top1, self.second = self.cand.gather(-1, self.top1_at[..., None])[..., 0], self.cand.gather(-1, self.second_at[..., None])[..., 0]
        self.margin = top2.values[..., 0] - top2.values[..., 1]
        self._bounds: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (head weight, R, max row norm), newest last

    @classmethod
    def of(cls, calib: Calibration, ref_inputs: torch.Tensor, model: nn.Module) -> HeadScreen | None:
        """A screen for `model`'s head, or None where the head is not a float32 linear map whose outputs are the
        model's logits (softcapped or scaled logits, a bfloat16 head: the guard runs the whole head)."""
        head = head_linear(model)
        if head is None:
            return None
        logits = F.linear(ref_inputs[0], head.weight, head.bias)
        if not torch.allclose(logits, calib.logits[0], rtol=0.0, atol=SLACK * (1.0 + float(calib.logits[0].abs().max()))):
            return None
        return cls(calib, ref_inputs, head)

    def _candidate_logits(self, x: torch.Tensor, p: int, head: nn.Linear) -> torch.Tensor:
        cand = self.cand[p]
        out = torch.bmm(head.weight[cand], x[:, :, None])[..., 0]
        return out if head.bias is None else out + head.bias[cand]

    def _bound(self, head: nn.Linear) -> tuple[torch.Tensor, float]:
        """R per position (the largest reference logit outside the candidates) and the head's largest row norm, for
        the head installed now (computed once per head weight: the head changes when its own layer is annealed; a
        refused level rolled back merges the same values again, found equal)."""
        for weight, outside, norm in self._bounds:
            if weight is head.weight or torch.equal(weight, head.weight):
                return outside, norm
        outside = torch.empty(self.cand.shape[:2], device=self.cand.device)
        for p in range(len(self.ref_inputs)):
            logits = F.linear(self.ref_inputs[p], head.weight, head.bias)
            outside[p] = logits.scatter_(-1, self.cand[p], float("-inf")).amax(-1)
        norm = float(head.weight.norm(dim=-1).max())
        self._bounds = [*self._bounds[-1:], (head.weight, outside, norm)]
        return outside, norm

    def rows(self, inputs: Iterable[torch.Tensor], head: nn.Linear) -> Iterator[Screened]:
        """Per prompt, from the model's head inputs (batches of consecutive prompts): its top-2 tokens and its gap
        change at the reference's top-1/top-2, against the reference in the same arithmetic."""
        outside, norm = self._bound(head)
        for p, x in enumerate(prompt for batch in inputs for prompt in batch):
            logits = self._candidate_logits(x, p, head)
            values, at = logits.topk(2, dim=-1)
            top2 = self.cand[p].gather(-1, at)
            change = logits.gather(-1, self.top1_at[p, :, None])[..., 0] - logits.gather(-1, self.second_at[p, :, None])[..., 0] - self.margin[p]
            top1, second, margin = self.top1[p].clone(), self.second[p].clone(), self.margin[p].clone()
            bound = outside[p] + (x - self.ref_inputs[p]).norm(dim=-1) * norm
            uncertain = values[:, 1] <= bound + SLACK * (1.0 + bound.abs())
            if uncertain.any():  # the whole row there, against the reference's whole-head logits
                whole = F.linear(x[uncertain], head.weight, head.bias)
                top2[uncertain] = whole.topk(2, dim=-1).indices
                ref = self.calib
                top1[uncertain], second[uncertain], margin[uncertain] = ref.top1[p][uncertain], ref.second[p][uncertain], ref.margin[p][uncertain]
                picked = whole.gather(-1, torch.stack([top1[uncertain], second[uncertain]], -1))
                change[uncertain] = picked[:, 0] - picked[:, 1] - margin[uncertain]
            yield Screened(top2, top1, second, margin, change, int(uncertain.sum()))
