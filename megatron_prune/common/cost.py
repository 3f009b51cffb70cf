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

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence, Tuple

from megatron_prune.common.extent import Extent, count_elements

METRICS = ("params", "flops")


@dataclass(frozen=True)
class Term:
    name: str                       # e.g. "layer1.0.conv1.weight" or "encoder.layer.0.attention[scores]"
    shape: Tuple[int, ...]          # the full (unpruned) shape
    dims: Dict[int, Extent] = field(default_factory=dict)  # pruned dims
    params: bool = False            # a parameter: counts its elements once
    flops: float = 0.0              # FLOPs per element (2 * positions, summed over every use)

    def elements(self, widths: Mapping[str, int]) -> int:
        return count_elements(self.shape, self.dims, widths)


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

    def per_group(self, groups: Sequence[str]) -> Dict[str, Dict[str, float]]:
        """How much of each metric each group's terms hold at full width (for profile tables)."""
        out = {}
        for g in groups:
            mine = [t for t in self.terms if any(g in e.groups for e in t.dims.values())]
            out[g] = {"params": float(sum(t.elements(self.full) for t in mine if t.params)),
                      "flops": float(sum(t.elements(self.full) * t.flops for t in mine))}
        return out
