"""Which widths a group may take: ratios of its width rounded to a divisor, with per-module rules.

    width_choices(768, ratios=DEFAULT_RATIOS, divisor=32) -> [64, 96, ..., 736, 768]
    rules = Rules.of({"*": {"divisor": 16}, "fc": None, "layer4.*": {"ratios": [0.5, 1.0]}})
    rules.for_module("layer4.0.conv1")  -> Rule(ratios=(0.5, 1.0), divisor=16)

Defaults follow Model Optimizer's FastNAS (20 ratios 0.05..1.0, divisor 32; the rounding never goes down by
more than 10%, and the full width is always a choice), so the two search the same widths. A rule of `None`
freezes the module: every group it belongs to keeps its width.

Rules are matched by `fnmatch` pattern on the qualified module name, in dict order, later patterns overriding
earlier ones field by field. Model Optimizer's type-keyed form (`{"nn.Conv2d": {"*": {"channels_ratio": ...,
"channel_divisor": ...}}}`) is accepted too, so its configs carry over unchanged.
"""

from __future__ import annotations

import fnmatch
import numbers
from dataclasses import dataclass, replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from megatron_prune.errors import PruneConfigError

DEFAULT_RATIOS = tuple(round(0.05 * i, 2) for i in range(1, 21))
DEFAULT_DIVISOR = 32


def make_divisible(value: float, divisor: int) -> int:
    """The multiple of `divisor` nearest to `value`, at least `divisor`, never more than 10% below `value`."""
    n = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return n + divisor if n < 0.9 * value else n


def width_choices(full: int, ratios: Optional[Sequence[float]] = DEFAULT_RATIOS, divisor: int = DEFAULT_DIVISOR,
                  block: int = 1) -> List[int]:
    """Ascending widths for a group of `full` units: each ratio's width rounded to `divisor`, capped at `full`,
    plus `full` itself (`ratios=None`: every multiple of `divisor`); with `block` > 1 only multiples of `block`
    (e.g. GroupNorm's channels per group)."""
    widths = range(divisor, full, divisor) if ratios is None else (make_divisible(r * full, divisor) for r in ratios)
    return sorted({full} | {w for w in widths if w < full and w % block == 0})


@dataclass(frozen=True)
class Rule:
    ratios: Optional[Tuple[float, ...]] = DEFAULT_RATIOS  # None: every multiple of the divisor
    divisor: int = DEFAULT_DIVISOR

    def choices(self, full: int, block: int = 1) -> List[int]:
        return width_choices(full, self.ratios, self.divisor, block)


class ChoiceSpace:
    """Mixin for a search space with `choices`: {group: ascending widths, the full width last}."""

    @property
    def full(self) -> Dict[str, int]:
        return {g: c[-1] for g, c in self.choices.items()}

    @property
    def smallest(self) -> Dict[str, int]:
        return {g: c[0] for g, c in self.choices.items()}

    def __repr__(self) -> str:  # a dataclass repr would list every tensor extent; `table()` is the readable form
        return f"{type(self).__name__}({len(self.searchable)} searchable, {len(self.fixed)} fixed; .table() shows them)"


_MO_FIELDS = {"channels_ratio": "ratios", "features_ratio": "ratios", "channel_divisor": "divisor",
              "feature_divisor": "divisor", "ratios": "ratios", "divisor": "divisor"}


@dataclass(frozen=True)
class Rules:
    """Ordered (type name or None, pattern, rule fields or None) entries."""
    entries: Tuple[Tuple[Optional[str], str, Optional[Dict[str, object]]], ...] = ()

    @classmethod
    def of(cls, spec: Optional[Mapping], name: str = "config['rules']") -> "Rules":
        if spec is None:
            return cls()
        if isinstance(spec, Rules):
            return spec
        if not isinstance(spec, Mapping):
            raise PruneConfigError(f"{name} must be a dict of module-name pattern -> rule, got {type(spec).__name__}")
        entries = []
        for key, value in spec.items():
            if not isinstance(key, str):
                raise PruneConfigError(f"{name}: key {key!r} must be a module-name pattern (a string)")
            if key.startswith("nn.") or key.startswith("hf."):  # Model Optimizer's {type: {pattern: rule}}
                if value is None:  # the whole type is frozen
                    value = {"*": None}
                if not isinstance(value, Mapping):
                    raise PruneConfigError(f"{name}[{key!r}] must be a dict of pattern -> rule")
                if not any(isinstance(v, Mapping) or v is None for v in value.values()):
                    value = {"*": value}
                for pattern, rule in value.items():
                    entries.append((key[3:], pattern, _fields(rule, f"{name}[{key!r}][{pattern!r}]")))
            else:
                entries.append((None, key, _fields(value, f"{name}[{key!r}]")))
        return cls(tuple(entries))

    def for_module(self, qualified_name: str, type_name: str = "") -> Optional[Rule]:
        """The merged rule for one module; None if a matching entry freezes it."""
        rule = Rule()
        for type_key, pattern, fields in self.entries:
            if type_key is not None and type_key != type_name:
                continue
            if not fnmatch.fnmatchcase(qualified_name, pattern):
                continue
            if fields is None:
                return None
            rule = replace(rule, **fields)
        return rule


def _fields(rule, where: str) -> Optional[Dict[str, object]]:
    if rule is None:
        return None
    if not isinstance(rule, Mapping):
        raise PruneConfigError(f"{where} must be a dict like {{'ratios': [0.25, 0.5, 1.0], 'divisor': 16}} or None")
    out = {}
    for k, v in rule.items():
        if k == "kernel_size":  # Model Optimizer's, nothing to do with widths
            continue
        if k not in _MO_FIELDS:
            raise PruneConfigError(f"{where}: unknown field {k!r}; a rule has 'ratios' and 'divisor'")
        field = _MO_FIELDS[k]
        if field == "divisor":
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise PruneConfigError(f"{where}[{k!r}]={v!r} must be a positive integer")
            out[field] = int(v)
        elif v is None:  # Model Optimizer's spelling of "every width"
            out[field] = None
        else:
            try:
                ratios = tuple(float(r) for r in v)
            except TypeError:
                raise PruneConfigError(f"{where}[{k!r}]={v!r} must be a list of ratios in (0, 1]") from None
            if not ratios or not all(0 < r <= 1 for r in ratios):
                raise PruneConfigError(f"{where}[{k!r}]={v!r} must be a non-empty list of ratios in (0, 1]")
            out[field] = ratios
    return out
