"""NAS auto pruning: budgets -> fitting candidates -> top-k built and scored one at a time -> the winner.

Owns the search flow around calibration (algorithm §8): `prepare_search` runs before calibration (checks
the budgets and options, counts the whole search space analytically, raises if nothing fits);
`run_search` runs after it (drops candidates that would empty a pipeline stage under the layer ranking,
scores the top-k, caches each score, picks the best). Building a candidate is the caller's (api.py):
a plan, a sliced state dict and a rebuilt stock model, exactly as a manual prune of that export config.

Only one candidate model exists at a time: it is built, scored under `torch.no_grad()` in eval mode,
and freed before the next. Every rank uses the score of the first rank on the last pipeline stage
(where the loss is), so all ranks pick the same winner.
"""

from __future__ import annotations

import gc
import json
import math
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Protocol

import torch

from megatron_prune.errors import PruneConfigError
from megatron_prune.minitron.axes import format_sizes
from megatron_prune.minitron.config import ModelShape, SearchConfig, validate_budgets
from megatron_prune.common.log import format_table, log
from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.search.counting import Counts, Inventory, inventory_of
from megatron_prune.minitron.search.space import Candidate, SearchSpace, build_space, config_key, memory_spec, search_candidates

ScoreFunc = Callable[[torch.nn.Module], float]
_LABELS = {"params": "parameters", "active_params": "active parameters", "memory_mb": "of inference memory"}


@dataclass
class SearchPlan:
    """What `prepare_search` found before calibration."""

    budgets: Dict[str, float]  # priority order: the first is the primary budget
    config: SearchConfig
    space: SearchSpace
    original: Counts
    candidates: List[Candidate]  # within every budget and accepted by Megatron, best first
    inventory: Inventory  # for exact counts once the layer ranking is known (layers of different kinds)

    def first_sizes(self) -> Dict[str, int]:
        """Complete sizes of the candidate placed first (before calibration: the layer ranking is not known yet)."""
        return _sizes(self.space, self.candidates[0])


@dataclass
class SearchResult:
    """What the search did, for reports and plots (`megatron_prune.minitron.search.plot.plot_candidates`)."""

    budgets: Dict[str, float]
    space: Dict[str, List[int]]  # searched axes and their choices (heads as total heads unless groups are searched)
    space_size: int
    num_fitting: int  # candidates within every budget the parallel layout can build
    original: Counts
    candidates: List[Candidate]  # the top-k scored, ranked by the primary budget (closest first)
    winner: int  # index into `candidates`: the best score, the first one on ties

    @property
    def best(self) -> Candidate:
        return self.candidates[self.winner]


def prepare_search(model: torch.nn.Module, ctx: ParallelContext, shape: ModelShape, constraints, search,
                   score_func: Optional[ScoreFunc], megatron_problem: Callable[[Dict[str, int]], Optional[str]]) -> SearchPlan:  # fmt: skip
    """Validate and enumerate before calibration. `megatron_problem(sizes)` says why Megatron would refuse
    a candidate (None if it builds). Raises PruneConfigError naming the field on bad input."""
    config = SearchConfig.of(search)
    if score_func is None and config.top_k > 1:
        raise PruneConfigError(
            f"score_func is required to compare the top_k={config.top_k} NAS candidates (e.g. "
            "megatron_prune.lm_loss_score(held_out_batches)); or set search top_k=1 to take the closest fit unscored"
        )
    if score_func is not None and not callable(score_func):
        raise PruneConfigError(f"score_func must be a callable(model) -> float, got {type(score_func).__name__}")
    try:
        inventory = inventory_of(model, ctx)
    except ValueError as e:
        raise PruneConfigError(f"NAS needs analytic counts: {e}; prune with export_config instead") from e
    return plan_search(inventory, shape, constraints, config, megatron_problem, **ctx.sizes())


def plan_search(inventory: Inventory, shape: ModelShape, constraints, search,
                megatron_problem: Callable[[Dict[str, int]], Optional[str]] = lambda sizes: None, verbose: bool = True,
                **parallel: int) -> SearchPlan:  # fmt: skip
    """`prepare_search` on an inventory, e.g. one counted from a config alone (`inventory_of_config`), so that a
    command line checks its budgets before importing the model (`verbose=False`: nothing logged). Percent
    budgets are resolved against the model's own counts. `parallel`: the layout's sizes (`ParallelContext.sizes`)."""
    config = SearchConfig.of(search)
    memory = memory_spec(config)
    original = inventory.count(shape.sizes(), memory)
    budgets = validate_budgets(constraints, {b: original.get(b) for b in _LABELS})
    for budget, limit in budgets.items():
        if limit >= original.get(budget):
            raise PruneConfigError(
                f"constraints[{budget!r}]={_fmt(budget, limit)} is not below the model's {_fmt(budget, original.get(budget))} "
                f"{_LABELS[budget]}: nothing to prune"
            )
    space = build_space(shape, config)
    if verbose:
        log(f"analytic counts: {original.params:,} parameters, {original.memory_mb:.1f} MB inference memory "
            f"({config.dtype_bytes}-byte weights, KV cache of {config.batch_size} x {config.seq_length} tokens)")
        log_space(space, config)
    if not space.choices:
        raise PruneConfigError(
            "the search space is empty: every axis is skipped (axes_to_skip) or left with one choice "
            "(a *_divisor larger than the axis, or max_width_pruning/max_depth_pruning too small)"
        )
    fitting = search_candidates(space, inventory, budgets, config, shape, **parallel)
    valid = [c for c in fitting.candidates if megatron_problem(_sizes(space, c)) is None]
    if fitting.filtered and verbose:
        log(f"candidate_filter rejected {fitting.filtered} candidates")
    if not valid:
        raise PruneConfigError(_nothing_fits(budgets, fitting, len(fitting.candidates) - len(valid)))
    if verbose:
        log(f"{len(valid)} of {space.size} candidates fit {_budgets_text(budgets)}")
    return SearchPlan(budgets, config, space, original, valid, inventory)


class CandidateSource(Protocol):
    """What NAS needs from the model being pruned (`source.PruneSource`)."""

    ctx: ParallelContext
    statistics: object  # .search: the scores file's search section

    def build_candidate(self, candidate: Candidate) -> torch.nn.Module: ...

    def kept_layers(self, candidate: Candidate) -> List[int]: ...

    def keeps_every_stage(self, candidate: Candidate) -> bool: ...

    def save_search(self, search_cache: dict) -> None: ...


def run_search(plan: SearchPlan, source: "CandidateSource", score_func: Optional[ScoreFunc],
               criteria: Optional[Mapping[str, str]] = None) -> SearchResult:
    """Score the top-k candidates (after calibration) and return the result. `source` builds each candidate
    (`source.PruneSource`): `keeps_every_stage(c)` drops those whose layers (by the layer ranking) would empty a
    pipeline stage; when layers differ (dense and MoE layers mixed) the candidates, counted before calibration at
    their smallest possible size, are counted exactly with the layers they keep (`kept_layers(c)`), and those over
    a budget dropped. `source.statistics.search` (the scores file's search section, updated in place and saved
    with `source.save_search` after each new score) supplies the scores of candidates already scored for the same
    budgets, score function and importance `criteria` (which decide what each candidate keeps)."""
    ctx, cache = source.ctx, source.statistics.search
    usable = [c for c in plan.candidates if source.keeps_every_stage(c)]
    if len(usable) < len(plan.candidates):
        log(f"{len(plan.candidates) - len(usable)} candidates dropped: their layer count would empty a pipeline stage")
    if not usable:
        raise PruneConfigError(
            "every fitting candidate would leave a pipeline stage without layers; re-run at a smaller pipeline "
            "size: the scores file is reusable there"
        )
    if not plan.inventory.uniform:
        usable = _recount(plan, usable, source.kept_layers)
    top = usable[: plan.config.top_k]
    key = cache_key(plan.budgets, score_func, criteria)
    cached = {config_key(c["export_config"]): c["score"] for c in cache.get(key, {}).get("candidates", [])}
    for c in top:
        c.score = cached.get(c.key)
    reused = sum(c.score is not None for c in top)
    log(f"top {len(top)} candidates" + (f" ({reused} scores from the scores file)" if reused else ""))
    log_candidates(top, plan.budgets)
    if score_func is None:  # top_k == 1: the closest fit wins unscored
        winner = 0
    else:
        for i, c in enumerate(top):
            if c.score is None:
                c.score = _score(source.build_candidate(c), score_func, ctx)
                cache[key] = {"budgets": plan.budgets, "score_func": _score_name(score_func), "candidates": [_record(t) for t in top]}
                source.save_search(cache)
                log(f"candidate {i + 1}/{len(top)} {format_sizes(c.export_config, sep=' ')}: score {c.score:.4f}")
        winner = max(range(len(top)), key=lambda i: (top[i].score, -i))
        log(f"top {len(top)} candidates with scores")
        log_candidates(top, plan.budgets, winner=winner)
    score = "" if top[winner].score is None else f", score {top[winner].score:.4f}"
    log(f"winner: {format_sizes(top[winner].export_config, sep=' ')} ({_counts_text(top[winner].counts, plan.budgets)}){score}")
    return SearchResult(plan.budgets, plan.space.display(), plan.space.size, len(usable), plan.original, top, winner)


def _recount(plan: SearchPlan, candidates: List[Candidate], kept_layers: Callable[[Candidate], List[int]]) -> List[Candidate]:
    """Exact counts with the surviving layers; those within every budget, closest to the primary budget first."""
    memory = memory_spec(plan.config)
    for c in candidates:
        sizes = _sizes(plan.space, c)
        c.counts = plan.inventory.count(sizes, memory, kept_layers=kept_layers(c))
    fitting = [c for c in candidates if all(c.counts.get(b) <= limit for b, limit in plan.budgets.items())]
    if len(fitting) < len(candidates):
        log(f"{len(candidates) - len(fitting)} candidates dropped: counted with the layers the ranking keeps, they exceed the budget")
    if not fitting:
        raise PruneConfigError(
            f"no candidate fits {_budgets_text(plan.budgets)} with the layers the block-influence ranking keeps "
            "(before calibration they were counted with their smallest layers): raise the budget, or prune fewer layers"
        )
    primary = next(iter(plan.budgets))
    return sorted(fitting, key=lambda c: c.rank_key(primary))  # not the lower bounds' order: ties by search-space index


def _score(model: torch.nn.Module, score_func: ScoreFunc, ctx: ParallelContext) -> float:
    """Score a candidate in eval mode without gradients; it is freed on return (a full garbage collection
    only if something, e.g. a reference cycle made by `score_func`, still holds it)."""
    model.eval()
    value, problem = None, None
    try:  # a failure on one rank must not leave the others waiting in the next collective
        with torch.no_grad():
            value = score_func(model)
    except Exception as e:  # noqa: BLE001 - re-raised on every rank just below
        problem = (RuntimeError, f"score_func failed: {type(e).__name__}: {e}")
    ctx.raise_first(problem)
    alive = weakref.ref(model)
    del model
    if alive() is not None:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return agree_on_score(value, ctx)


def agree_on_score(value, ctx: ParallelContext) -> float:
    """The score of the first rank on the last pipeline stage, on every rank. Raises (on every rank) if
    it is not a finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    entries = ctx.gather_all((ctx.pp_rank, number, repr(value)[:80]))
    rank, (_, number, text) = next((r, e) for r, e in enumerate(entries) if e[0] == ctx.pp_size - 1)
    if number is None or not math.isfinite(number):
        raise PruneConfigError(f"score_func returned {text} on rank {rank} (last pipeline stage): it must return a finite float")
    return number


def _sizes(space: SearchSpace, c: Candidate) -> Dict[str, int]:
    return {**space.original, **c.export_config}


def cache_key(budgets: Mapping[str, float], score_func: Optional[ScoreFunc], criteria: Optional[Mapping[str, str]] = None) -> str:
    """Where a search's candidates live in the scores file: its budgets, score function and criteria."""
    return json.dumps({"budgets": dict(budgets), "score_func": _score_name(score_func), "criteria": dict(criteria or {})})


def _score_name(score_func: Optional[ScoreFunc]) -> str:
    """Built-in score functions carry a `score_name` that states their data; otherwise the qualified name."""
    if score_func is None:
        return "none"
    return getattr(score_func, "score_name", None) or getattr(score_func, "__qualname__", type(score_func).__name__)


def search_record(search: SearchResult) -> dict:
    """A JSON-serialisable record of a search: budgets, space, candidates with counts and scores, the winner."""
    return {"budgets": dict(search.budgets), "space": {k: list(v) for k, v in search.space.items()},
            "space_size": search.space_size, "num_fitting": search.num_fitting, "winner": search.winner,
            "candidates": [_record(c) for c in search.candidates]}  # fmt: skip


def _record(c: Candidate) -> dict:
    return {"export_config": dict(c.export_config), "params": c.counts.params, "active_params": c.counts.active_params,
            "memory_mb": c.counts.memory_mb, "score": c.score}  # fmt: skip


# ----------------------------------------------------------------------------------------- logging


def log_space(space: SearchSpace, config: SearchConfig) -> None:
    title = f"search space (<= {config.max_width_pruning * 100:.0f}% width / <= {config.max_depth_pruning * 100:.0f}% depth pruning)"
    rows = [[axis, str(choices)] for axis, choices in space.display().items()]
    if "num_attention_heads" in space.choices and "num_query_groups" in space.choices:
        rows = [[a + (" (per query group)" if a == "num_attention_heads" else ""), c] for a, c in rows]
    if config.axes_to_skip:
        rows.append(["skipped", ", ".join(config.axes_to_skip)])
    _log_table(title, ["axis", "choices"], rows + [["search space size", str(space.size)]])


def log_candidates(candidates: List[Candidate], budgets: Mapping[str, float], winner: Optional[int] = None) -> None:
    metrics = list(budgets) + [m for m in ("params", "memory_mb") if m not in budgets]
    rows = []
    for i, c in enumerate(candidates):
        mark = " *" if i == winner else ""
        score = "" if c.score is None else f"{c.score:.4f}"
        rows.append([f"{i + 1}{mark}", format_sizes(c.export_config, sep=' '), *(_fmt(m, c.counts.get(m)) for m in metrics), score])
    _log_table(None, ["#", "export_config", *metrics, "score"], rows)


def _log_table(title: Optional[str], header: List[str], rows: List[List[str]]) -> None:
    if title:
        log(title)
    for text in format_table(header, rows).splitlines():
        log(f"  {text}")


def _nothing_fits(budgets: Mapping[str, float], fitting, rejected_by_megatron: int) -> str:
    parts = [f"no candidate fits {_budgets_text(budgets)}"]
    for budget, limit in budgets.items():
        smallest = fitting.smallest.get(budget)
        if smallest is not None and smallest[0] > limit:
            parts.append(f"the smallest reachable is {_fmt(budget, smallest[0])} {_LABELS[budget]} ({format_sizes(smallest[1], sep=' ')})")
    if fitting.filtered:
        parts.append(f"candidate_filter rejected {fitting.filtered} candidates")
    if rejected_by_megatron:
        parts.append(f"megatron-core rejects the {rejected_by_megatron} that fit")
    return "; ".join(parts) + ". Raise the budget or widen the search (max_width_pruning, max_depth_pruning, smaller divisors)"


def _budgets_text(budgets: Mapping[str, float]) -> str:
    return "constraints " + ", ".join(f"{k} <= {_fmt(k, v)}" for k, v in budgets.items())


def _counts_text(counts: Counts, budgets: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {_fmt(k, counts.get(k))}" for k in budgets)


def _fmt(metric: str, value: float) -> str:
    """memory in MB with 3 decimals; counts human-readable (1.23M)."""
    if metric == "memory_mb":
        return f"{value:.3f} MB"
    for unit in ("", "K", "M", "B"):
        if abs(value) < 1000:
            return f"{value:.2f}{unit}" if unit else f"{value:g}"
        value /= 1000
    return f"{value:.2f}T"
