"""What FastNAS and GradNAS check the same way before any work: option dicts in Model Optimizer's spelling, and
budgets against the range a search space can reach.

    opts = merge_options(DEFAULTS, [config, keyword_options], aliases={"max_iter_data_loader": "max_batches"},
                         ignored=("num_iters", "deployment"))
    check_selectors(opts["selectors"])
    limits = reachable_limits(constraints, ("flops", "params"), space.count(), space.count(space.smallest),
                              hint="see gradnas.profile()")

Every error is a `PruneConfigError` that names the field.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, Mapping, Optional, Sequence

from megatron_prune.common.budgets import resolve_budgets
from megatron_prune.common import solver
from megatron_prune.errors import PruneConfigError


def dataclass_of(cls, value, name: str):
    """An instance of the dataclass `cls` from None (its defaults), an instance, or a dict of its fields; anything
    else, or unknown fields, is a PruneConfigError naming `name` and the known fields."""
    if value is None or isinstance(value, cls):
        return cls() if value is None else value
    if not isinstance(value, Mapping):
        raise PruneConfigError(f"{name} must be a {cls.__name__} or a dict, got {type(value).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise PruneConfigError(f"{name}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**value)


# Model Optimizer's options that mean nothing here (accepted and dropped, so its configs run unchanged)
MODELOPT_IGNORED = ("num_iters", "deployment")


def merge_options(defaults: Mapping[str, object], sources: Iterable[Mapping[str, object]],
                  aliases: Optional[Mapping[str, str]] = None, ignored: Sequence[str] = MODELOPT_IGNORED) -> Dict[str, object]:
    """`defaults` overridden by each source in turn (a `config` dict, then keyword options, ...); `aliases` rename
    keys (Model Optimizer's names), `ignored` keys are dropped, any other unknown key is an error."""
    merged, aliases = dict(defaults), aliases or {}
    for source in sources:
        for k, v in source.items():
            k = aliases.get(k, k)
            if k in ignored:
                continue
            if k not in merged:
                raise PruneConfigError(f"config: unknown option {k!r}; known: {', '.join(sorted(set(merged) | set(aliases)))}")
            merged[k] = v
    return merged


def check_selectors(value) -> None:
    if isinstance(value, str) or not value or any(s not in solver.SELECTORS for s in value):
        raise PruneConfigError(f"config['selectors']={value!r} must be a non-empty list of {', '.join(solver.SELECTORS)}")


def reachable_limits(constraints, metrics: Sequence[str], full: Mapping[str, float], smallest: Mapping[str, float],
                     hint: str = "") -> Dict[str, float]:
    """Budgets in absolute units (`budgets.resolve_budgets`), each below the original and at or above the
    smallest subnet; `hint` ends the latter error (where to see what is fixed)."""
    limits = resolve_budgets(constraints, metrics, full)
    for m, v in limits.items():
        if v >= full[m]:
            raise PruneConfigError(f"constraints[{m!r}] = {v:,.0f} is not below the original model's {full[m]:,.0f}: nothing to prune")
        if v < smallest[m]:
            raise PruneConfigError(f"constraints[{m!r}] = {v:,.0f} is below the smallest reachable subnet's {smallest[m]:,.0f} "
                                   f"({100 * smallest[m] / full[m]:.1f}% of the original){'; ' + hint if hint else ''}")
    return limits
