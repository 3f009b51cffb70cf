"""What FastNAS and GradNAS results share: the budgets, the achieved counts and the per-width penalties.

    class GradNASResult(SearchRecord): ...   # a dataclass with widths, limits, counts, original_counts, penalties
    result.fill()          -> {"params": 0.998}   # achieved share of each budget
    result.counts_table()  -> original / pruned / kept / budget per metric, as plain text
    result.to_dict()       -> JSON-friendly (penalty widths as strings)
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Dict

from megatron_prune.common.log import format_table


class SearchRecord:
    """Mixin for a dataclass with `limits`, `counts`, `original_counts` and `penalties`."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["penalties"] = {g: {str(w): p for w, p in c.items()} for g, c in self.penalties.items()}
        return d

    def fill(self) -> Dict[str, float]:
        """Achieved share of each budget."""
        return {m: self.counts[m] / lim for m, lim in self.limits.items()}

    def counts_table(self) -> str:
        return format_table(["", "original", "pruned", "kept", "budget"], [
            (m, f"{self.original_counts[m]:,.0f}", f"{self.counts[m]:,.0f}", f"{100 * self.counts[m] / self.original_counts[m]:.1f}%",
             f"{self.limits[m]:,.0f}" if m in self.limits else "-") for m in ("flops", "params")])
