"""Sensitivity-driven bit allocation: a multiple-choice knapsack over matrices x levels.

Each matrix delta picks one level (or stays exact). A choice costs stored bytes and adds to the
model's damage, the mean square change of the reference top-1/top-2 logit gaps it causes (the
statistic the guard's expected flips grow with): per matrix, its sensitivity measured once from
gradients of the gaps (`gap_sensitivity`, at its most damaging level), scaled to the other levels
by their calibration-weighted output error ``tr(E X^T X E^T)``, ``E`` the change of the delta
(variances of independent errors add). The cheapest allocation whose summed damage stays within a
budget is found by a Lagrangian sweep: for a price ``lam`` each matrix takes
``argmin bytes + lam * damage``; ``lam`` is bisected until the budget holds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def weighted_error(change: torch.Tensor, gram: torch.Tensor | None) -> float:
    """``tr(E G E^T)`` of a canonical ``(out, in)`` change `E` on inputs of Gram `G` (``||E||^2`` without one)."""
    e = change.double()
    return float((e @ gram.double() * e).sum()) if gram is not None else float(e.square().sum())


def solve(costs: list[list[float]], damages: list[list[float]], budget: float, iters: int = 60) -> list[int]:
    """Per layer the option index minimising total cost with total damage <= `budget`.

    `costs[i][j]`, `damages[i][j]`: option j of layer i. An option of zero damage should exist for
    every layer (the exact delta), so a feasible allocation always does.
    """

    def pick(lam: float) -> list[int]:
        return [min(range(len(c)), key=lambda j: (c[j] + lam * d[j], d[j])) for c, d in zip(costs, damages)]

    def damage(choice: list[int]) -> float:
        return sum(d[j] for d, j in zip(damages, choice))

    lo, hi = 0.0, 1.0
    if damage(pick(lo)) <= budget:
        return pick(lo)
    while damage(pick(hi)) > budget and hi < 1e300:
        hi *= 16
    for _ in range(iters):  # geometric bisection: prices span many decades
        mid = (lo * hi) ** 0.5 if lo > 0 else hi / 1024
        if damage(pick(mid)) <= budget:
            hi = mid
        else:
            lo = mid
    return pick(hi)


@torch.enable_grad()
def gap_sensitivity(model: nn.Module, calib, modules: dict[str, nn.Module], changes: dict[str, Callable[[], torch.Tensor]],
                    draws: int = 8, batch_size: int = 8, seed: int = 0) -> dict[str, float]:
    """Per matrix, the mean square change of the reference top-1/top-2 logit gaps over the calibration
    positions that a change ``E`` of its delta causes alone, to first order: ``E[<grad_W z, E>^2] / positions``
    with ``z = sum_p eps_p gap_p`` and random signs ``eps`` (Hutchinson's estimator over `draws`
    backward passes; the gradients of different positions do not cancel in expectation).

    `modules` maps a matrix to the module whose weight it changes (a tied embedding: its head);
    `changes` to a callable giving ``E`` canonical ``(out, in)``. `calib` holds the reference
    continuations (`annealing.Calibration`).
    """
    grads: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def capture(module, args, out):
            x = args[0].detach()
            if not out.requires_grad:
                out.requires_grad_()

            def on_grad(g: torch.Tensor) -> None:
                g = g.reshape(-1, g.shape[-1]).float()
                if x.is_floating_point():  # a linear map: grad_W = g^T x
                    grad = g.t() @ x.reshape(-1, x.shape[-1]).float()
                else:  # an embedding lookup: each row's gradient is the sum over its tokens
                    grad = torch.zeros(module.base.weight.shape, dtype=torch.float32).index_add_(0, x.reshape(-1), g)
                grads[name] = grads[name] + grad if name in grads else grad

            out.register_hook(on_grad)

        return capture

    handles = [model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_() if not out.requires_grad else None)]
    handles += [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    n, t = calib.top1.shape
    square = dict.fromkeys(modules, 0.0)
    try:
        for draw in range(draws):
            eps = torch.randint(0, 2, (n, t), generator=torch.Generator().manual_seed(seed + draw)).float() * 2 - 1
            grads.clear()
            for s in range(0, n, batch_size):
                logits = model(input_ids=calib.input_ids[s : s + batch_size], attention_mask=calib.attention_mask[s : s + batch_size], logits_to_keep=t + 1).logits[:, :-1].float()
                gap = logits.gather(-1, calib.top1[s : s + batch_size, :, None]) - logits.gather(-1, calib.second[s : s + batch_size, :, None])
                (gap[..., 0] * eps[s : s + batch_size]).sum().backward()
            for name in modules:
                grad = grads.get(name)
                change = changes[name]()
                if grad is not None:  # weights stored (in, out) (GPT-2's Conv1D) meet their canonical change transposed
                    square[name] += float(((grad if grad.shape == change.shape else grad.t()) * change).sum()) ** 2
    finally:
        for h in handles:
            h.remove()
    return {name: v / draws / (n * t) for name, v in square.items()}
