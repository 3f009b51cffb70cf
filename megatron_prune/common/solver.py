"""Pick a width per group that fits budgets and loses as little as predicted, and fills the budget.

Inputs: each group's ascending `choices` (full width last), a predicted `penalty[group][width]` (score lost when
only that group is narrowed; 0 at full width), an analytic `cost(widths) -> {metric: value}` and upper
`limits` per metric. All selectors return widths that fit every limit and are *maximal*: widening any single
group by one choice would exceed a limit. That is the budget-fill guarantee: the result is never over the
budget, and under it by less than one width step of one group.

    greedy(choices, penalty, cost, limits)     # least penalty per unit of cost saved, one step at a time
    threshold(choices, penalty, cost, limits)  # Model Optimizer's rule: one penalty threshold for every group
    uniform(choices, penalty, cost, limits)    # the same ratio of every group's width
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Tuple

Widths = Dict[str, int]
Choices = Mapping[str, List[int]]
Penalty = Mapping[str, Mapping[int, float]]
Cost = Callable[[Mapping[str, int]], Mapping[str, float]]


def fits(cost: Cost, widths: Mapping[str, int], limits: Mapping[str, float]) -> bool:
    c = cost(widths)
    return all(c[m] <= limits[m] for m in limits)


def _over(c: Mapping[str, float], limits: Mapping[str, float]) -> float:
    return sum(max(0.0, c[m] - limits[m]) / limits[m] for m in limits)


def _best_step(choices: Choices, cost: Cost, widths: Widths, groups: List[str], step: int,
               rate: Callable[..., Optional[tuple]]) -> Optional[Tuple[Widths, Mapping[str, float]]]:
    """The best move of one group in `groups` by one choice (`step` -1: narrower, +1: wider): `rate(g, old, new,
    trial_cost)` is its sort key (lower is better; ties go to the earlier group) or None to rule it out. Returns
    (widths, their cost), or None if no move is allowed."""
    best = None
    for rank, g in enumerate(groups):
        i = choices[g].index(widths[g]) + step
        if not 0 <= i < len(choices[g]):
            continue
        trial = {**widths, g: choices[g][i]}
        c = cost(trial)
        key = rate(g, widths[g], choices[g][i], c)
        if key is not None and (best is None or (*key, rank) < best[0]):
            best = ((*key, rank), trial, c)
    return None if best is None else best[1:]


def _descend(choices: Choices, penalty: Penalty, cost: Cost, limits: Mapping[str, float], widths: Mapping[str, int],
             frozen: str = "") -> Widths:
    """Narrow, one choice at a time, the group (other than `frozen`) whose step loses the least penalty per
    unit of (relative) over-budget cost it saves, until every limit holds. Raises ValueError if it cannot."""
    groups = [g for g in choices if g != frozen]
    widths, current = dict(widths), cost(widths)

    def rate(g: str, old: int, new: int, c: Mapping[str, float]):  # `current`: the cost of `widths` as the loop stands
        saved = _over(current, limits) - _over(c, limits)
        return None if saved <= 0 else ((penalty[g][new] - penalty[g][old]) / saved, -saved)

    while _over(current, limits) > 0:
        step = _best_step(choices, cost, widths, groups, -1, rate)
        if step is None:
            raise ValueError("no group can be narrowed further and the limits still do not hold")
        widths, current = step
    return widths


def predicted_loss(penalty: Penalty, widths: Mapping[str, int]) -> float:
    return sum(penalty[g][w] for g, w in widths.items())


def greedy(choices: Choices, penalty: Penalty, cost: Cost, limits: Mapping[str, float]) -> Widths:
    """Least predicted loss per unit of cost saved, one step at a time, until within the limits; then `fill`."""
    return fill(choices, penalty, cost, limits, _descend(choices, penalty, cost, limits, {g: c[-1] for g, c in choices.items()}))


def fill(choices: Choices, penalty: Penalty, cost: Cost, limits: Mapping[str, float], widths: Mapping[str, int]) -> Widths:
    """Use the budget left over: widen groups one choice at a time while every limit holds (the most penalty
    recovered per unit of cost first; with nothing to recover, the step that uses the most budget); then try
    exchanges (widen one group, narrow others until the limits hold) that lower the predicted loss, or keep it
    and use more budget, and widen again after each."""
    widths = _widen(choices, penalty, cost, limits, widths)
    while True:
        here_loss, here_used = predicted_loss(penalty, widths), _used(cost(widths), limits)
        best = None
        for g in choices:
            i = choices[g].index(widths[g])
            if i + 1 == len(choices[g]):
                continue
            try:
                trial = _descend(choices, penalty, cost, limits, {**widths, g: choices[g][i + 1]}, frozen=g)
            except ValueError:
                continue
            trial = _widen(choices, penalty, cost, limits, trial)
            loss, used = predicted_loss(penalty, trial), _used(cost(trial), limits)
            better = loss < here_loss - 1e-12 or (loss <= here_loss + 1e-12 and used > here_used + 1e-9)
            if better and (best is None or (loss, -used) < best[0]):
                best = ((loss, -used), trial)
        if best is None:
            return widths
        widths = best[1]


def _used(c: Mapping[str, float], limits: Mapping[str, float]) -> float:
    return min(c[m] / limits[m] for m in limits)


def _widen(choices: Choices, penalty: Penalty, cost: Cost, limits: Mapping[str, float], widths: Mapping[str, int]) -> Widths:
    """Widen one choice at a time while every limit holds: most penalty recovered per unit of budget first."""
    widths, current = dict(widths), cost(widths)

    def rate(g: str, old: int, new: int, c: Mapping[str, float]):  # `current`: the cost of `widths` as the loop stands
        if any(c[m] > limits[m] for m in limits):
            return None
        used = max(sum((c[m] - current[m]) / limits[m] for m in limits), 1e-12)
        return (-((penalty[g][old] - penalty[g][new]) / used), -used)

    while True:
        step = _best_step(choices, cost, widths, list(choices), +1, rate)
        if step is None:
            return widths
        widths, current = step


def threshold(choices: Choices, penalty: Penalty, cost: Cost, limits: Mapping[str, float]) -> Widths:
    """The narrowest width of each group whose penalty is at most t, for the smallest t that fits; then `fill`."""
    def at(t: float) -> Widths:
        return {g: next(w for w in choices[g] if penalty[g][w] <= t) for g in choices}

    levels = sorted({p for g in choices for p in penalty[g].values()})
    feasible = [t for t in levels if fits(cost, at(t), limits)]
    start = at(min(feasible)) if feasible else {g: c[0] for g, c in choices.items()}
    return fill(choices, penalty, cost, limits, start)


def uniform(choices: Choices, penalty: Penalty, cost: Cost, limits: Mapping[str, float]) -> Widths:
    """Every group at (about) the same fraction of its width: the widest choice at or below r * full, for the
    largest r that fits; then `fill`."""
    def at(r: float) -> Widths:
        return {g: max([w for w in c if w <= r * c[-1]] or [c[0]]) for g, c in choices.items()}

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(cost, at(mid), limits) else (lo, mid)
    return fill(choices, penalty, cost, limits, at(lo))


SELECTORS = {"greedy": greedy, "threshold": threshold, "uniform": uniform}
