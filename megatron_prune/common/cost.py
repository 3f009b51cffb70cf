"""Parameters and FLOPs of a subnet, analytically, from the group widths alone.

A model's cost is a sum over its tensors (`Term`): each parameter counts its elements once, and each weight a
matrix multiply or convolution reads counts `2 * positions` FLOPs per element (a multiply and an add per
output position). Attention score/value products are terms too (GradNAS adds them). Because a term's element
count comes from `Extent.length`, the count predicted for any widths equals the count of the model sliced to
them (tested on every model family).

    cost = CostModel(terms)
    cost.count(widths)    -> {"params": 1.23e6, "flops": 4.5e7}
    cost.count(cost.full) -> the original model's values
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

from megatron_prune.common.extent import Extent

METRICS = ("params", "flops")


@dataclass(frozen=True)
class Term:
    name: str                       # e.g. "layer1.0.conv1.weight" or "encoder.layer.0.attention[scores]"
    shape: Tuple[int, ...]          # the full (unpruned) shape
    dims: Dict[int, Extent] = field(default_factory=dict)  # pruned dims
    params: bool = False            # a parameter: counts its elements once
    flops: float = 0.0              # FLOPs per element (2 * positions, summed over every use)

    def elements(self, widths: Mapping[str, int]) -> int:
        """Elements of this tensor when its pruned dims keep `widths`."""
        return math.prod(self.dims[d].length(widths) if d in self.dims else size for d, size in enumerate(self.shape))


@dataclass
class CostModel:
    terms: List[Term]
    full: Dict[str, int]  # every group's unpruned width

    def count(self, widths: Mapping[str, int]) -> Dict[str, float]:
        """{"params": ..., "flops": ...} of the subnet with `widths` (groups not named keep their full width)."""
        w = {**self.full, **widths}
        params = flops = 0.0
        for t in self.terms:
            n = t.elements(w)
            params += n if t.params else 0
            flops += n * t.flops
        return {"params": params, "flops": flops}

    def fast(self) -> Callable[[Mapping[str, int]], Dict[str, float]]:
        """`count`, sped up for a solver that calls it thousands of times: when every term depends on at most one
        group (no tensor is pruned on two groups at once, as in transformer layers), each group's share is computed
        once per width and summed; otherwise `count` itself. The values are the same (integers in float64)."""
        owners = [{g for e in t.dims.values() for g in e.groups} for t in self.terms]
        if any(len(o) > 1 for o in owners):
            return self.count
        fixed = CostModel([t for t, o in zip(self.terms, owners) if not o], self.full).count({})
        by_group: Dict[str, List[Term]] = {}
        for t, o in zip(self.terms, owners):
            if o:
                by_group.setdefault(next(iter(o)), []).append(t)
        shares: Dict[Tuple[str, int], Dict[str, float]] = {}

        def count(widths: Mapping[str, int]) -> Dict[str, float]:
            params, flops = fixed["params"], fixed["flops"]
            for g, terms in by_group.items():
                key = (g, widths.get(g, self.full[g]))
                if key not in shares:
                    shares[key] = CostModel(terms, self.full).count({g: key[1]})
                params, flops = params + shares[key]["params"], flops + shares[key]["flops"]
            return {"params": params, "flops": flops}

        return count

    def per_group(self, groups: Sequence[str]) -> Dict[str, Dict[str, float]]:
        """How much of each metric each group's terms hold at full width (for profile tables)."""
        out = {}
        for g in groups:
            mine = [t for t in self.terms if any(g in e.groups for e in t.dims.values())]
            out[g] = {"params": float(sum(t.elements(self.full) for t in mine if t.params)),
                      "flops": float(sum(t.elements(self.full) * t.flops for t in mine))}
        return out
