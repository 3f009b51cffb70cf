"""The FastNAS search: measure how much each group's width matters, then pick widths that fill the budget.

1. Sensitivity: score the recalibrated original (S0), then, one group at a time, a few narrower widths of that
   group alone (`sensitivity_points` per group, evenly spread over its choices, the narrowest included); the
   penalty of a width is `S0 - score`, interpolated linearly between measured widths and made monotone
   (narrower never loses less). Model Optimizer scores every choice; a few points carry the same curve.
2. Selection: candidate width sets from `common.solver` (`greedy`: least predicted loss per unit of cost;
   `threshold`: one penalty threshold for all groups, as Model Optimizer does; `uniform`: one ratio), each
   filled to the budget, each scored for real; the best score wins.

Every score is cached in the checkpoint, so an interrupted search resumes where it stopped and ends with
the same result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping

from megatron_prune.common import solver
from megatron_prune.common.record import SearchRecord
from megatron_prune.fastnas.space import SearchSpace
from megatron_prune.fastnas.subnet import Evaluator
from megatron_prune.common.log import format_table


@dataclass
class Candidate:
    selector: str
    widths: Dict[str, int]
    counts: Dict[str, float]
    predicted_loss: float
    score: float = float("nan")


@dataclass
class FastNASResult(SearchRecord):
    """What a search did; `to_dict()` is JSON-friendly."""
    widths: Dict[str, int]                      # every searchable group's chosen width
    original_widths: Dict[str, int]
    limits: Dict[str, float]                    # the budgets, in absolute units
    counts: Dict[str, float]                    # params and FLOPs of the result
    original_counts: Dict[str, float]
    original_score: float                       # the original model, BatchNorm recalibrated
    score: float                                # the result
    penalties: Dict[str, Dict[int, float]]      # predicted score lost per group and width
    candidates: List[Candidate]
    fixed: Dict[str, str]                       # groups that cannot be pruned, and why
    score_calls: int                            # score_func calls in this run (checkpointed ones not counted)
    reused_scores: int                          # scores taken from the checkpoint
    seconds: float
    settings: Dict[str, object] = field(default_factory=dict)

    def table(self) -> str:
        rows = [(g, self.original_widths[g], w, f"{100 * w / self.original_widths[g]:.0f}%") for g, w in self.widths.items()]
        out = [format_table(["group", "original", "pruned", "kept"], rows)]
        out.append(self.counts_table())
        rows = [(c.selector, f"{c.predicted_loss:.4f}", f"{c.score:.4f}",
                 " ".join(f"{m} {100 * c.counts[m] / self.original_counts[m]:.1f}%" for m in self.limits)) for c in self.candidates]
        out.append(format_table(["candidate", "predicted loss", "score", "cost"], rows))
        out.append(f"score: original {self.original_score:.4f} -> pruned {self.score:.4f}; {self.score_calls} score calls "
                   f"({self.reused_scores} reused from the checkpoint); {self.seconds:.1f} s")
        return "\n\n".join(out)


def probe_widths(choices: List[int], points: int) -> List[int]:
    """Up to `points` widths below full, evenly spread over the choices, the narrowest always included."""
    below = choices[:-1]
    if len(below) <= points:
        return below
    if points == 1:
        return [below[0]]
    return [below[i] for i in sorted({round(k * (len(below) - 1) / (points - 1)) for k in range(points)})]


def penalty_curve(choices: List[int], measured: Mapping[int, float]) -> Dict[int, float]:
    """Penalty at every choice: measured where measured (0 at full), linear in width in between, then made
    non-increasing in width and never negative."""
    known = sorted({**measured, choices[-1]: 0.0}.items())
    curve = {}
    for w in choices:
        lo = max((k for k in known if k[0] <= w), default=known[0])
        hi = min((k for k in known if k[0] >= w), default=known[-1])
        curve[w] = lo[1] if hi[0] == lo[0] else lo[1] + (hi[1] - lo[1]) * (w - lo[0]) / (hi[0] - lo[0])
    running = 0.0
    for w in reversed(choices):
        running = max(running, curve[w])
        curve[w] = running
    return curve


def run_search(space: SearchSpace, evaluator: Evaluator, limits: Mapping[str, float], points: int,
               selectors: List[str], log: Callable[[str], None]) -> FastNASResult:
    start = time.time()
    searchable = space.searchable
    s0 = evaluator.score({}, "the original model (BatchNorm recalibrated)")
    log(f"original score {s0:.4f}")
    penalties, todo = {}, sum(len(probe_widths(c, points)) for c in searchable.values())
    done = 0
    for g, choices in searchable.items():
        measured = {}
        for w in probe_widths(choices, points):
            measured[w] = s0 - evaluator.score({g: w}, f"{g}={w}")
            done += 1
            rate = (time.time() - start) / done
            log(f"sensitivity {done}/{todo}: {g} {w}/{choices[-1]}  loss {measured[w]:+.4f}  ETA {rate * (todo - done):.0f} s")
        penalties[g] = penalty_curve(choices, measured)
    cost = space.count
    candidates, seen = [], {}
    for name in selectors:
        widths = solver.SELECTORS[name](searchable, penalties, cost, limits)
        predicted = sum(penalties[g][w] for g, w in widths.items())
        cand = Candidate(name, widths, cost(widths), predicted)
        key = tuple(sorted(widths.items()))
        if key in seen:
            cand.score = seen[key]
        else:
            cand.score = seen[key] = evaluator.score(widths, f"candidate {name}")
        log(f"candidate {name}: score {cand.score:.4f} (predicted loss {predicted:.4f}), "
            + ", ".join(f"{m} {100 * cand.counts[m] / cost({})[m]:.1f}%" for m in limits))
        candidates.append(cand)
    best = max(candidates, key=lambda c: c.score)  # ties: the first selector listed
    return FastNASResult(
        widths=dict(best.widths), original_widths={g: c[-1] for g, c in searchable.items()}, limits=dict(limits),
        counts=best.counts, original_counts=cost({}), original_score=s0, score=best.score, penalties=penalties,
        candidates=candidates, fixed=dict(space.fixed), score_calls=evaluator.calls,
        reused_scores=evaluator.checkpoint.reused, seconds=time.time() - start)
