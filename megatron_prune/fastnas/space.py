"""The search space of a traced model: each channel group's width choices, what is fixed and why, and its cost.

    space = build_space(model, dummy_input, rules=Rules.of(config.get("rules")), leaf_modules=())
    space.searchable        -> {"layer1.0.conv1": [32, 64], ...}   # ascending widths, the full width last
    space.fixed             -> {"fc": "its channels reach the model's output (node 'output')", ...}
    space.count(widths)     -> {"params": ..., "flops": ...}        # analytic, equal to the sliced model's
    print(space.table())    # groups, choices, min/max FLOPs and params of the space

A group's choices are the intersection of the rules of every module it runs through (as Model Optimizer does),
restricted to multiples of its block (GroupNorm). A group left with a single width is fixed and says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import torch.nn as nn

from megatron_prune.common.choices import ChoiceSpace, Rules
from megatron_prune.fastnas.graph import KNOWN_LEAVES, Analysis, analyze
from megatron_prune.fastnas.trace import Traced, trace
from megatron_prune.common.log import format_table


@dataclass(repr=False)
class SearchSpace(ChoiceSpace):
    analysis: Analysis
    choices: Dict[str, List[int]]   # every group, ascending; a fixed group has one choice (its width)
    fixed: Dict[str, str]           # fixed group -> reason

    @property
    def searchable(self) -> Dict[str, List[int]]:
        return {g: c for g, c in self.choices.items() if g not in self.fixed}

    def count(self, widths: Optional[Mapping[str, int]] = None) -> Dict[str, float]:
        return self.analysis.cost.count(widths or {})

    def table(self) -> str:
        """Groups, choices and the space's min/max cost, as plain text."""
        rows = []
        for g, choices in self.choices.items():
            grp = self.analysis.groups[g]
            shown = choices if len(choices) <= 8 else choices[:3] + ["..."] + choices[-3:]
            status = f"FIXED: {self.fixed[g]}" if g in self.fixed else f"{len(choices)} widths"
            rows.append((g, grp.units, len(grp.modules), "[" + ", ".join(map(str, shown)) + "]", status))
        lo, hi = self.count(self.smallest), self.count(self.full)
        head = format_table(["group", "width", "modules", "choices", "status"], rows)
        size = 1
        for c in self.searchable.values():
            size *= len(c)
        tail = format_table(["", "smallest subnet", "original", "smallest / original"],
                            [(m, f"{lo[m]:,.0f}", f"{hi[m]:,.0f}", f"{100 * lo[m] / hi[m]:.1f}%") for m in ("flops", "params")])
        return f"{head}\n\n{tail}\n{len(self.searchable)} searchable groups, {size:.3g} subnets"


def build_space(model: nn.Module, dummy_input, rules: Rules = Rules(), leaf_modules: Sequence = ()) -> SearchSpace:
    """Trace `model` (not modified) and derive its search space."""
    traced = trace(model, dummy_input, leaf_modules, KNOWN_LEAVES)
    return space_of(traced, rules)


def space_of(traced: Traced, rules: Rules) -> SearchSpace:
    analysis = analyze(traced)
    choices, fixed = {}, {}
    for name, grp in analysis.groups.items():
        if grp.fixed:
            choices[name], fixed[name] = [grp.units], grp.fixed
            continue
        allowed, frozen_by = None, None
        for module in grp.modules:
            rule = rules.for_module(module, type(traced.modules.get(module, nn.Module())).__name__)
            if rule is None:
                frozen_by = module
                break
            widths = set(rule.choices(grp.units, grp.block))
            allowed = widths if allowed is None else allowed & widths
        if frozen_by is not None:
            choices[name], fixed[name] = [grp.units], f"the rules freeze module {frozen_by!r}"
        elif not allowed or len(allowed) < 2:
            choices[name] = [grp.units]
            fixed[name] = f"no smaller width fits its rules ({grp.units} channels; lower the divisor to prune it)"
        else:
            choices[name] = sorted(allowed)
    return SearchSpace(analysis, choices, fixed)
