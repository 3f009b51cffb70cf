"""From gradient scores to widths: which units a width keeps, what it loses, and the budget search.

    kept = keep(scores, width=6, blocks=3)          # the 2 best query heads of each of 3 KV groups, ascending
    penalties = penalty_curves(space, group_scores)  # {variable: {width: score share dropped}}
    candidates = select(space, penalties, limits, ["greedy", "uniform"])

The penalty of a width is the sum of the normalised scores of the units it drops (lowest first; per KV group
for grouped-query attention). `common.solver` turns the penalty curves and the analytic cost into widths that
fit every budget and fill it (no group can be widened by one step without exceeding a budget).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional

import torch

from megatron_prune.common import solver
from megatron_prune.common.record import SearchRecord
from megatron_prune.fastnas.search import Candidate
from megatron_prune.gradnas.space import SearchSpace
from megatron_prune.common.log import format_table


def keep(scores: torch.Tensor, width: int, blocks: int = 1) -> torch.Tensor:
    """Indices of the `width` best units, `width // blocks` from each of `blocks` equal consecutive blocks, in
    ascending order (ties: the lower index wins)."""
    per = scores.numel() // blocks
    best = torch.argsort(scores.reshape(blocks, per), dim=1, descending=True, stable=True)[:, :width // blocks]
    return (best + per * torch.arange(blocks)[:, None]).reshape(-1).sort().values


def group_scores(space: SearchSpace, site_scores: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Each group's unit scores: a site's units, summed over the query heads of a KV group for `kv_groups`."""
    out = {}
    for g, grp in space.groups.items():
        s = site_scores[f"layers.{grp.layer}.{'ffn' if grp.kind == 'ffn' else 'heads'}"]
        out[g] = s.reshape(grp.units, grp.members).sum(1) if grp.members > 1 else s
    return out


def dropped(scores: torch.Tensor, width: int, blocks: int) -> float:
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask[keep(scores, width, blocks)] = False
    return float(scores[mask].sum())


def penalty_curves(space: SearchSpace, scores: Mapping[str, torch.Tensor]) -> Dict[str, Dict[int, float]]:
    """{search variable: {width: summed score share its groups drop}}."""
    out = {}
    for var, groups in space.variables.items():
        out[var] = {w: sum(dropped(scores[g], w, space.groups[g].blocks) for g in groups) for w in space.choices[groups[0]]}
    return out


def select(space: SearchSpace, penalties: Mapping[str, Mapping[int, float]], limits: Mapping[str, float],
           selectors: List[str]) -> List[Candidate]:
    """One candidate per selector (duplicates kept: each is reported), in the order given."""
    fast = space.cost.fast()

    def cost(values):
        return fast(space.expand(values))

    out = []
    for name in selectors:
        values = solver.SELECTORS[name](space.searchable, penalties, cost, limits)
        widths = space.expand(values)
        out.append(Candidate(name, widths, space.count(widths), solver.predicted_loss(penalties, values)))
    return out


@dataclass
class GradNASResult(SearchRecord):
    """What a search did; `to_dict()` is JSON-friendly."""
    widths: Dict[str, int]                      # every group's width (fixed ones at full)
    original_widths: Dict[str, int]
    limits: Dict[str, float]                    # the budgets, in absolute units
    counts: Dict[str, float]                    # params and FLOPs of the result (analytic = measured)
    original_counts: Dict[str, float]
    penalties: Dict[str, Dict[int, float]]      # per search variable: score share dropped at each width
    scores: Dict[str, List[float]]              # per mask site: each unit's share of the model's total score
    candidates: List[Candidate]
    fixed: Dict[str, str]                       # groups that are not searched, and why
    batches: int                                # batches of gradients (including checkpointed ones)
    samples: int
    reused_batches: int                         # taken from the checkpoint
    score_calls: int                            # score_func calls in this run
    config_update: Dict[str, object]            # HF config fields set on the pruned model
    hf_loadable: bool                           # `from_pretrained` of its `save_pretrained` folder rebuilds it
    seconds: float
    settings: Dict[str, object] = field(default_factory=dict)
    selector: str = "greedy"

    def table(self) -> str:
        layers = sorted({g.split(".")[1] for g in self.widths}, key=int)
        rows = []
        for i in layers:
            cells = [i]
            for kind in ("heads", "kv_groups", "ffn"):
                g = f"layers.{i}.{kind}"
                cells.append(f"{self.original_widths[g]} -> {self.widths[g]}" if g in self.widths else "-")
            rows.append(tuple(cells))
        out = [format_table(["layer", "heads", "KV groups", "FFN"], rows)]
        out.append(self.counts_table())
        out.append(format_table(["candidate", "predicted loss", "score", "cost"], [
            (c.selector + (" *" if c.selector == self.selector else ""), f"{c.predicted_loss:.4f}", f"{c.score:.4f}",
             " ".join(f"{m} {100 * c.counts[m] / self.original_counts[m]:.1f}%" for m in self.limits)) for c in self.candidates]))
        out.append(f"{self.batches} batches ({self.samples} samples) of gradients, {self.reused_batches} from the checkpoint; "
                   f"{self.score_calls} score_func calls; {self.seconds:.1f} s; "
                   + ("from_pretrained loads the result" if self.hf_loadable else "per-layer sizes: save with gradnas.save"))
        return "\n\n".join(out)


def best_candidate(candidates: List[Candidate], score: Optional[Callable[[Candidate], float]]) -> Candidate:
    """The highest-scored candidate (ties: the first listed); without a score function the first one."""
    if score is None:
        return candidates[0]
    for c in candidates:
        c.score = score(c)
    return max(candidates, key=lambda c: c.score)
