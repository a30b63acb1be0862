"""A mixture of experts' fused weights shared by the fine-tunes served by name, each fine-tune's changed expert
matrices kept as substructures (as a `TenantModule` keeps a linear layer's), not as a copy of the experts.

transformers runs fused experts (``experts.gate_up_proj``, ``experts.down_proj``: one matrix per expert, stacked)
through its experts interface (`use_experts_implementation`), whose flags say the layout: `has_gate`, `has_bias`,
`is_transposed`, `has_post_expert_norm`, and `_apply_gate`. `TenantExperts.forward` is that interface's loop over the
experts the tokens chose, each product the base expert's plus, on each fine-tune's tokens, that fine-tune's parts of
the expert's matrix (`DeltaOps`, low-bit codes in the compiled kernel's layouts; one fine-tune's tokens run the base
matrix and its codes in one pass of the kernel). Llama 4's experts, which run every token once per expert, take the
same loop through `DenseExperts` and `dense_call`. An experts module of another layout, or a delta that does not write
whole output rows of one expert, stays held whole (`multi.TenantParameters`). Annealing weighs each expert's matrices
by the inputs its tokens bring (`routed_inputs`, `annealing.GramCollector`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .inject import merged_values
from .names import Target
from .parts import DeltaOps, TensorDelta
from .parts.ops import runs_direct, weights_loaded
from .parts.quant import run_with_weight

MATRICES = ("gate_up_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Outputs:
    """The outputs ``[start, stop)`` of expert `expert`'s product with `attr` that a delta's canonical ``(out, in)``
    matrix writes (over the expert's whole input)."""

    attr: str
    expert: int
    start: int
    stop: int


def outputs(experts: nn.Module, attr: str, target: Target, transposed: bool = False) -> Outputs | None:
    """Where a delta at `target` (a view of `attr`; `transposed`: its canonical matrix is the stored one's transpose)
    writes in the experts' products; None where it is not a band of whole output rows of one expert (an expert's
    interleaved gate and up rows, a matrix stored the other way round)."""
    param = getattr(experts, attr, None)
    if attr not in MATRICES or param is None or param.dim() != 3 or target.strides is None or len(target.shape) != 2:
        return None
    (rows, cols), (row_stride, col_stride) = target.shape, target.strides
    if transposed:
        rows, cols, row_stride, col_stride = cols, rows, col_stride, row_stride
    _, a, b = param.shape
    expert, local = divmod(target.offset, a * b)
    first_a, first_b = divmod(local, b)
    if not experts.is_transposed and (row_stride, col_stride, first_b, cols) == (b, 1, 0, b) and first_a + rows <= a:
        return Outputs(attr, expert, first_a, first_a + rows)  # an expert's (out, in) matrix: a band of its rows
    if experts.is_transposed and (row_stride, col_stride, first_a, cols) == (1, b, 0, a) and first_b + rows <= b:
        return Outputs(attr, expert, first_b, first_b + rows)  # an expert's (in, out) matrix: a band of its columns
    return None


def runs_experts(experts: nn.Module) -> bool:
    """An experts module of transformers' experts interface, whose forward `TenantExperts` reproduces."""
    return all(hasattr(experts, a) for a in ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm", "_apply_gate", "num_experts"))


# experts run on every token, expert by expert (``(experts * tokens, hidden)``, each token's row scaled by its router
# score: zero where the router did not choose the expert), outside transformers' experts interface
DENSE_EXPERTS = ("Llama4TextExperts",)


class DenseExperts:
    """Experts of `DENSE_EXPERTS` as transformers' experts interface shows experts: gate and up fused (gate first),
    stored (in, out), no biases, no norm after them."""

    has_gate, has_bias, is_transposed, has_post_expert_norm = True, False, True, False

    def __init__(self, module: nn.Module):
        self.module = module

    def __getattr__(self, name: str):
        return getattr(self.module, name)

    def _apply_gate(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return self.module.act_fn(gate) * up


def interface(experts: nn.Module) -> nn.Module | DenseExperts | None:
    """`experts` as transformers' experts interface shows it (`runs_experts`; `DenseExperts` for `DENSE_EXPERTS`), None
    for any other module."""
    if runs_experts(experts):
        return experts
    return DenseExperts(experts) if type(experts).__name__ in DENSE_EXPERTS else None


def dense_call(experts: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dense experts module's input (`DENSE_EXPERTS`) as the interface's call (rows, each row's experts, their
    weights): each row its block's expert where it is not zero (elsewhere the experts' count, which the loop skips:
    the dense product of a zero row is zero), weight 1 (the router's score is in the row)."""
    count = experts.num_experts
    block = torch.arange(count, device=hidden_states.device).repeat_interleave(hidden_states.shape[0] // count)
    index = torch.where(hidden_states.ne(0).any(-1), block, count)[:, None]
    return hidden_states, index, torch.ones(index.shape, dtype=hidden_states.dtype, device=hidden_states.device)


def holds_experts(module: nn.Module) -> bool:
    """A module holding stacked expert matrices (3-D parameters, one matrix per expert), of any interface."""
    count = getattr(module, "num_experts", None)
    return isinstance(count, int) and any(p.dim() == 3 and p.shape[0] == count for p in module.parameters(recurse=False))


def product(experts: nn.Module, attr: str, expert: int, x: torch.Tensor) -> torch.Tensor:
    """`x` times matrix `expert` of `attr` (the experts' own layout), plus its bias."""
    weight = getattr(experts, attr)[expert]
    y = x @ weight if experts.is_transposed else F.linear(x, weight)
    return y + getattr(experts, attr + "_bias")[expert] if experts.has_bias else y


def first_matrix(experts: nn.Module) -> str:
    """The name of the experts' first matrix: their fused gate and up rows, or up rows alone."""
    return "gate_up_proj" if experts.has_gate else "up_proj"


def activate(experts: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The experts' gate (or activation) on their first product."""
    return experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)


def routed_inputs(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, down: bool) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """(expert, the inputs of its tokens, with `down` the inputs of its down projection) for each expert the tokens
    chose, as the experts' forward computes them (the annealing guard's Grams of each expert's matrices)."""
    for expert in torch.unique(top_k_index).tolist():
        if expert < experts.num_experts:  # not expert parallelism's sentinel
            x = hidden_states[(top_k_index == expert).any(-1)]
            yield expert, x, activate(experts, product(experts, first_matrix(experts), expert, x)) if down else None


class ExpertDeltas(nn.Module):
    """One fine-tune's changes to an experts module: each changed expert matrix's parts (``ops.<i>``) and the outputs
    they write, and each changed bias's delta (``biases.<attr>``, ``(experts, out)``)."""

    def __init__(self, parts: dict[Outputs, DeltaOps], biases: dict[str, torch.Tensor]):
        super().__init__()
        self.ops = nn.ModuleList(parts.values())
        self.biases = nn.ParameterDict({a: nn.Parameter(b, requires_grad=False) for a, b in biases.items()})
        self.where: dict[tuple[str, int], list[tuple[int, int, tuple[nn.Module, ...]]]] = {}  # the parts called directly:
        for out, ops in parts.items():  # `DeltaOps.forward` was a third of an expert's product at batch 1
            self.where.setdefault((out.attr, out.expert), []).append((out.start, out.stop, tuple(ops.parts())))

    def fused_product(self, experts: nn.Module, attr: str, expert: int, x: torch.Tensor) -> torch.Tensor | None:
        """`x` times `attr`'s matrix `expert` changed by this fine-tune in one pass of the compiled kernel over the base
        matrix and the parts (`parts.quant.run_with_weight`), band by band, where its bands cover the outputs and the
        kernel runs them all (float32 experts stored (out, in) on CPU, no gradient); otherwise None."""
        spans, weight = self.where.get((attr, expert)), getattr(experts, attr)
        if not spans or not runs_direct(*(p for span in spans for p in span[2])) or experts.is_transposed or experts.has_bias or x.dtype != torch.float32 or weight.dtype != torch.float32 \
                or x.device.type != "cpu" or weight.device.type != "cpu" or torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):  # fmt: skip
            return None
        bands, end = [], 0
        for start, stop, parts in sorted(spans, key=lambda span: span[0]):
            y = run_with_weight(weight[expert, start:stop].detach(), None, list(parts), x) if start == end else None
            if y is None:
                return None
            bands.append(y)
            end = stop
        if end != weight.shape[1]:
            return None
        return bands[0] if len(bands) == 1 else torch.cat(bands, dim=-1)

    def add_to(self, y: torch.Tensor, x: torch.Tensor, attr: str, expert: int) -> torch.Tensor:
        """`y` ``(tokens, out)`` plus this fine-tune's change of the product of `x` with `attr`'s matrix `expert`
        (in place: `y` is a product's own, never a parameter)."""
        for start, stop, parts in self.where.get((attr, expert), ()):
            c = parts[0](x, False)
            for part in parts[1:]:
                c = c + part(x, False)
            if stop - start == y.shape[1]:
                y += c.to(y)
            else:
                y[:, start:stop] += c.to(y)
        bias = self.biases[attr + "_bias"] if attr + "_bias" in self.biases else None
        return y if bias is None else y + bias[expert].to(y)


def expert_deltas(experts: nn.Module, attrs: dict[str, list[tuple[TensorDelta, Target]]]) -> ExpertDeltas | None:
    """A fine-tune's `ExpertDeltas` of `experts` from its deltas by parameter; None where one is not an expert matrix
    band (`outputs`) or an expert bias."""
    parts, biases = {}, {}
    for attr, found in attrs.items():
        if attr.endswith("_bias") and attr.removesuffix("_bias") in MATRICES:
            biases[attr] = merged_values(experts, {attr: found})[attr].float() - getattr(experts, attr).detach().float()
            continue
        for delta, target in found:
            out = outputs(experts, attr, target, delta.transposed)
            if out is None:
                return None
            parts[out] = DeltaOps(delta, target.view(getattr(experts, attr).detach())).compact()
    return ExpertDeltas(parts, biases)


class TenantExperts(nn.Module):
    """Fused experts shared by every fine-tune, plus each one's `ExpertDeltas` (``tenants.<name>``). Tokens of a
    mixed batch get their own fine-tune's changes in every expert they chose; several fine-tunes' add up."""

    def __init__(self, base: nn.Module, routing, name: str):
        super().__init__()
        self.base = base
        self.tenants = nn.ModuleDict()
        object.__setattr__(self, "routing", routing)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "layout", interface(base))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None, top_k_weights: torch.Tensor | None = None) -> torch.Tensor:
        if top_k_index is None:  # dense experts (`DENSE_EXPERTS`): every token once per expert, block by block
            groups = self._dense_groups(hidden_states.shape[0], hidden_states.device)
            if not groups:
                return self.base(hidden_states)
            hidden_states, top_k_index, top_k_weights = dense_call(self.base, hidden_states)
        else:
            groups = self.routing.groups_for(self.tenants, hidden_states.shape[0], hidden_states.device)
            if not groups:
                return self.base(hidden_states, top_k_index, top_k_weights)
        # the shared experts and the fine-tunes' biases, read in the loop, where they run (offloaded by Accelerate); the
        # parts are called (their hooks load them)
        with weights_loaded(self.base, *(deltas.biases for deltas in self.tenants.values())):
            return self._run(hidden_states, top_k_index, top_k_weights, groups)

    def _dense_groups(self, rows: int, device: torch.device) -> list:
        """The routing's groups of a dense call's rows: each token's, in every expert's block."""
        count = self.layout.num_experts
        tokens = rows // count
        blocks = torch.arange(count, device=device)[:, None] * tokens
        return [(names, None if idx is None else (blocks + idx[None]).flatten()) for names, idx in self.routing.groups_for(self.tenants, tokens, device)]

    def _run(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, groups) -> torch.Tensor:
        """The experts' loop over the experts the tokens chose, each product with the tokens' fine-tunes' changes."""
        experts = self.layout
        token_group = None
        if groups[0][1] is not None:  # a mixed batch: each token's group, 0 for the base alone
            token_group = torch.zeros(hidden_states.shape[0], dtype=torch.long, device=hidden_states.device)
            for g, (_, idx) in enumerate(groups):
                token_group[idx] = g + 1
        up = first_matrix(experts)
        final = torch.zeros_like(hidden_states)
        for expert in torch.unique(top_k_index).tolist():
            if expert >= experts.num_experts:  # expert parallelism's sentinel
                continue
            token, slot = torch.where(top_k_index == expert)
            chosen = self._chosen(groups, token_group, token)
            h = activate(experts, self._product(hidden_states[token], up, expert, chosen))
            h = self._product(h, "down_proj", expert, chosen)
            if experts.has_post_expert_norm:
                h = experts.post_expert_norm(h)
            final.index_add_(0, token, (h * top_k_weights[token, slot, None]).to(final.dtype))
        return final

    def _chosen(self, groups, token_group: torch.Tensor | None, token: torch.Tensor) -> list[tuple[list[ExpertDeltas], torch.Tensor | None]]:
        """(each group's fine-tunes' deltas, its positions among `token` or None for all) for one expert's tokens."""
        held = [[self.tenants[n] for n in names if n in self.tenants] for names, _ in groups]
        if token_group is None:
            return [(held[0], None)]
        of_token = token_group[token]
        return [(deltas, (of_token == g + 1).nonzero().squeeze(1)) for g, deltas in enumerate(held) if deltas]

    def _product(self, x: torch.Tensor, attr: str, expert: int, chosen: Sequence[tuple[list[ExpertDeltas], torch.Tensor | None]]) -> torch.Tensor:
        """`x` times `attr`'s matrix `expert` (and its bias), each group's tokens with its fine-tunes' changes."""
        if len(chosen) == 1 and chosen[0][1] is None and len(chosen[0][0]) == 1:  # one fine-tune's tokens: base and parts in one pass
            y = chosen[0][0][0].fused_product(self.layout, attr, expert, x)
            if y is not None:
                return y
        y = product(self.layout, attr, expert, x)
        for deltas, at in chosen:
            if at is None:
                for d in deltas:
                    y = d.add_to(y, x, attr, expert)
            elif at.numel():
                part, rows = y.index_select(0, at), x.index_select(0, at)
                for d in deltas:
                    part = d.add_to(part, rows, attr, expert)
                y = y.index_copy(0, at, part)
        return y
