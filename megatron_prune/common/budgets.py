"""Budgets as users write them, for every algorithm: absolute counts, unit suffixes and percent strings.

    parse_budget("flops", "60%", original=1.2e9)   -> 7.2e8
    parse_budget("params", "350M")                  -> 3.5e8
    parse_budget("params", 3.5e8)                   -> 3.5e8
    resolve_budgets({"flops": "50%"}, allowed=("flops", "params"), originals={"flops": 2e9, "params": 1e7})

Owns the syntax only: what a budget measures (parameters, FLOPs, memory) and how it is counted belong to the
algorithm. A percent string is relative to the original model's value of the same metric and must lie in
(0, 100); a plain string without "%" or a unit is refused, since "60" could mean 60 or 60%.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, Iterable, Mapping, Optional

from megatron_prune.errors import PruneConfigError

UNITS = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def is_percent(value) -> bool:
    return isinstance(value, str) and value.strip().endswith("%")


def parse_count(text: str, field: str = "budget") -> float:
    """A number with an optional K/M/B/G/T suffix: "1.5B" -> 1.5e9, "3e9" -> 3e9 (command-line spelling)."""
    stripped = text.strip()
    scale = UNITS.get(stripped[-1:].upper(), 1.0)
    try:
        value = float(stripped[:-1] if scale != 1.0 else stripped) * scale
    except ValueError:
        raise PruneConfigError(f"{field}={text!r} is not a number (e.g. 3e9, 3B, 350M, or a percentage like 60%)") from None
    return _positive(field, value, text)


def parse_budget(field: str, value, original: Optional[float] = None) -> float:
    """An upper bound in absolute units from a number, a suffixed string ("350M") or a percent string ("60%")
    of `original`. Raises `PruneConfigError` naming `field` for anything else."""
    if isinstance(value, bool):
        raise PruneConfigError(f"{field}={value!r} must be a number or a percentage string like '60%'")
    if isinstance(value, numbers.Real):
        return _positive(field, float(value), value)
    if not isinstance(value, str):
        raise PruneConfigError(f"{field}={value!r} must be a number or a percentage string like '60%', not {type(value).__name__}")
    if is_percent(value):
        number = value.strip()[:-1].strip()
        try:
            share = float(number)
        except ValueError:
            raise PruneConfigError(f"{field}={value!r}: {number!r} before '%' is not a number (e.g. '60%')") from None
        if not math.isfinite(share) or not 0 < share < 100:
            raise PruneConfigError(f"{field}={value!r}: a percentage budget must lie strictly between 0% and 100% of the original")
        if original is None:
            raise PruneConfigError(f"{field}={value!r}: a percentage needs the original model's value, which is not known here")
        return share / 100 * float(original)
    if value.strip()[-1:].upper() not in UNITS:
        raise PruneConfigError(
            f"{field}={value!r} is a string without '%' or a unit: pass a number ({value.strip()}) or a percentage ('{value.strip()}%')")
    return parse_count(value, field)


def resolve_budgets(constraints, allowed: Iterable[str], originals: Mapping[str, float],
                    name: str = "constraints") -> Dict[str, float]:
    """`{key: budget}` with every key in `allowed` (in `allowed`'s order), each parsed by `parse_budget`
    against `originals[key]`; an empty dict, an unknown key or a malformed value is a `PruneConfigError`."""
    allowed = tuple(allowed)
    if not isinstance(constraints, Mapping):
        raise PruneConfigError(f"{name} must be a dict like {{'{allowed[0]}': '60%'}}, got {type(constraints).__name__}")
    if not constraints:
        raise PruneConfigError(f"{name} is empty: give at least one of {', '.join(allowed)}")
    unknown = [k for k in constraints if k not in allowed]
    if unknown:
        raise PruneConfigError(f"{name}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")
    return {k: parse_budget(f"{name}[{k!r}]", constraints[k], originals.get(k)) for k in allowed if k in constraints}


def _positive(field: str, value: float, given) -> float:
    if not math.isfinite(value) or value <= 0:
        raise PruneConfigError(f"{field}={given!r} must be a positive, finite number")
    return value
