"""Sensitivity-driven bit allocation: a multiple-choice knapsack over layers x levels.

Each layer picks one level (or stays exact). A choice costs stored bytes and adds to the model's
damage: per layer, the guard statistic measured once with only that layer at a probe level, scaled
to the other levels by their calibration-weighted output error ``tr(E X^T X E^T)``, ``E`` the
change of the delta (variances of independent errors add). The cheapest allocation whose summed
damage stays within a budget is found by a Lagrangian sweep: for a price ``lam`` each layer takes
``argmin bytes + lam * damage``; ``lam`` is bisected until the budget holds.
"""

from __future__ import annotations

import torch


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
