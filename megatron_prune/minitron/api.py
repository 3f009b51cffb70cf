"""`prune()`: the whole flow, one step per line.

    model (GPTModel or hybrid MambaModel stage, any TP/PP/DP)
      --check--> shape, layout, depth controls --targets--> complete sizes, or a NAS search space (counted)
      --hooks + forward_loop--> raw statistics (this rank) --concat over TP, sum over DP, gather over PP-->
      statistics of all layers (cache: scores file) --criteria--> importance --> orders
      --PruneSource.build(target)--> plan --> pruned config + sliced state dict
      --> a stock GPTModel / MambaModel built from the pruned config, with the sliced weights loaded (strict)

With NAS budgets (`constraints=`) the target is chosen by search/nas.py: the whole search space is counted
before calibration, and after the one calibration each top-k candidate is built through the same
`PruneSource` (source.py), scored and freed; the winner is built last.
The input model is never modified; the pruned model is a new object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from megatron_prune.common.log import log
from megatron_prune.errors import PruneConfigError
from megatron_prune.minitron.config import ModelShape, layer_symbols, validate_export_config
from megatron_prune.minitron.depth import DepthOptions, ResolvedDepth, iterative_ranking
from megatron_prune.minitron.importance.calibration import Statistics, calibrate, obtain_statistics  # noqa: F401  (calibrate: public)
from megatron_prune.minitron.importance.criteria import criteria_at_layout, describe, resolve_criteria
from megatron_prune.minitron.importance.hooks import local_layer_numbers
from megatron_prune.minitron.axes import format_sizes
from megatron_prune.minitron.importance.statistics import StatStore
from megatron_prune.minitron.model_checks import check_model, model_shape
from megatron_prune.minitron.ranking import Importance, Orders, rank_orders, score_importance
from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.search.nas import SearchPlan, prepare_search, run_search
from megatron_prune.minitron.slicing.model import hybrid_pattern_of
from megatron_prune.minitron.source import (  # noqa: F401  (PruneResult, count_params: public)
    PruneResult, PruneSource, count_params, dry_run_rebuild, megatron_problem,
)


@dataclass
class _Model:
    """What the checks learn about the model before any work."""

    shape: ModelShape
    pattern: Optional[str]  # a hybrid model's layer pattern (None: GPT)
    depth: ResolvedDepth
    numbers: Dict[int, int]  # {global layer number: position in this stage's decoder.layers}
    stage_layers: List[List[int]]  # global layer numbers of each pipeline stage
    params_before: int


def prune(
    model: torch.nn.Module,
    export_config: Optional[Mapping[str, int]] = None,
    forward_loop: Optional[Callable[[torch.nn.Module], None]] = None,
    scores_path: Optional[str] = None,
    model_builder: Optional[Callable[[object], torch.nn.Module]] = None,
    *,
    constraints: Optional[Mapping[str, float]] = None,
    score_func: Optional[Callable[[torch.nn.Module], float]] = None,
    search=None,
    importance: Optional[Importance] = None,
    criteria: Optional[Mapping[str, str] | str] = None,
    reuse_scores: bool = False,
    all_statistics: bool = False,
    depth=None,
):
    """Prune an MCore `GPTModel` (this rank's pipeline stage) to the sizes in `export_config`, or to the
    best-scoring architecture within the budgets in `constraints` (NAS).

    Args:
        model: an unwrapped GPTModel stage at any TP/PP/DP layout (sequence parallel off), or a hybrid
            MambaModel stage (any TP); MoE layers at any TP, EP and expert TP (allgather or alltoall dispatcher); not modified.
        export_config: target sizes, any subset of the model's axes (`SUPPORTED_AXES`: hidden_size,
            ffn_hidden_size, num_attention_heads, num_query_groups, num_moe_experts, moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size, num_layers; TransformerConfig field names).
        forward_loop: `forward_loop(model)` runs calibration forwards (see `make_forward_loop`); with
            data parallelism each replica forwards its own share. Needed unless `scores_path` exists.
        scores_path: a file caching the statistics (and NAS candidate scores). If it exists (and matches
            this model) calibration is skipped; otherwise it is written after calibration. Reusable at
            any TP/PP/DP layout.
        model_builder: `model_builder(pruned_config) -> GPTModel stage`; by default the model is rebuilt
            with the same constructor arguments as `model`.
        constraints: NAS budgets instead of `export_config`: upper bounds on any of `params`,
            `active_params`, `memory_mb` (the first of these present is the primary budget).
        score_func: NAS: `score_func(model) -> float`, higher is better (e.g. `lm_loss_score(batches)`);
            every rank uses the value of the last pipeline stage. Required unless `search` has top_k=1.
            Scores are cached in the scores file under its `score_name` attribute (the built-ins name
            their data) or else its qualified name: rename it when its data change.
        search: NAS options: a `SearchConfig` or a dict of its fields (divisors, max_width_pruning, ...).
        importance: rank with this `Importance` instead of calibration statistics (e.g. a baseline such as
            random or weight-magnitude selection): no calibration, no scores file. Manual pruning only.
        criteria: the importance criterion per axis, e.g. {"num_attention_heads": "output_contribution",
            "ffn_hidden_size": "taylor"} or "heads=output_contribution,ffn=taylor" (`importance.criteria`;
            unnamed axes keep their defaults). Taylor criteria need a `forward_loop` that runs backward
            (`make_forward_loop(batches, backward=True)`). A scores file serves every criterion whose
            statistic it holds.
        reuse_scores: use an existing scores file even though it records other calibration data than
            `forward_loop`'s (by default that is an error naming the setting that changed).
        all_statistics: calibrate every forward-only statistic, not only what `criteria` read (a little slower;
            the scores file then serves any forward-only criterion later without calibrating).
        depth: depth controls, a `DepthOptions` or a dict of its fields (`megatron_prune.minitron.depth`):
            `layers_to_drop` (1-indexed; overrides the ranking and sets num_layers), `protected_layers` (never
            dropped, also by NAS; numbers, -1 for the last, "first", "last", "attention"), `iterative` (re-score
            block influence after each dropped layer: one more pass over `forward_loop`'s data per layer).

    Returns:
        (pruned_model, PruneResult). The pruned model is a stock GPTModel built from `result.config`
        holding the original weights sliced; kept channels/heads are in importance order. With NAS,
        `result.search` holds the search space, the scored candidates and the winner.
    """
    ctx = ParallelContext.from_megatron()
    if importance is not None and criteria is not None:
        raise PruneConfigError("importance= ranks with the given Importance: it cannot be combined with criteria=")
    criteria = resolve_criteria(criteria)
    m = _check(model, ctx, model_builder, depth)
    export_config, target, nas = _targets(model, ctx, m, export_config, constraints, score_func, search)
    if m.depth.iterative and (importance is not None or forward_loop is None):
        raise PruneConfigError("depth.iterative re-scores the layers with forward passes after each drop: it needs "
                               "forward_loop= (also when the statistics come from scores_path), not importance=")  # fmt: skip
    if importance is not None:
        if nas is not None:
            raise PruneConfigError("importance= ranks a manual prune: it cannot be combined with constraints (NAS)")
        _check_importance(importance, m.shape, layer_symbols(model.config, m.pattern))
        statistics, criteria = Statistics(StatStore(), False, None), None
    else:
        criteria, statistics = _statistics(model, ctx, m, criteria, target if nas is None else nas.first_sizes(),
                                           forward_loop, scores_path, reuse_scores, all_statistics, model_builder)  # fmt: skip
        importance = score_importance(statistics.stats, m.shape, criteria)
    orders = _orders(model, ctx, m, importance, forward_loop, target if nas is None else None, nas)
    src = PruneSource(
        model=model, ctx=ctx, shape=m.shape, numbers=m.numbers, stage_layers=m.stage_layers, importance=importance,
        orders=orders, params_before=m.params_before, statistics=statistics, model_builder=model_builder,
        pattern=m.pattern, criteria=criteria, depth=m.depth,
    )  # fmt: skip
    if nas is None:
        return src.build(target, requested=export_config)
    cache_criteria = criteria if not (m.depth.protected or m.depth.iterative) else {**criteria, **m.depth.cache_key()}
    found = run_search(nas, src, score_func, cache_criteria)
    pruned, result = src.build(src.sizes(found.best.export_config), found.best.export_config)
    result.search = found
    return pruned, result


def _check(model: torch.nn.Module, ctx: ParallelContext, model_builder, depth) -> _Model:
    """Refuse what cannot be pruned, and read the model's shape, layout and depth controls (no weights read)."""
    check_model(model, ctx, has_builder=model_builder is not None)
    pattern = hybrid_pattern_of(model)  # None for a GPTModel
    shape = model_shape(model, ctx, pattern)
    depth = DepthOptions.of(depth).resolve(shape.num_layers, layer_symbols(model.config, pattern))
    numbers = local_layer_numbers(model)  # {global: local}
    params_before = count_params(model, ctx)
    log(f"original model: {format_sizes(shape.sizes())}, {params_before:,} parameters; "
        f"TP={ctx.tp_size} PP={ctx.pp_size} DP={ctx.dp_size}")  # fmt: skip
    return _Model(shape, pattern, depth, numbers, ctx.gather_over_pp(sorted(numbers)), params_before)


def _targets(model, ctx: ParallelContext, m: _Model, export_config, constraints, score_func,
             search) -> Tuple[Optional[Mapping[str, int]], Optional[Dict[str, int]], Optional[SearchPlan]]:  # fmt: skip
    """(the axes asked for, with the depth the depth controls fix; the complete target sizes) of a manual prune, or
    the NAS search plan (the space counted): the others are None."""
    original_counts = [len(s) for s in m.stage_layers]

    def refused(target: Mapping[str, int]) -> Optional[str]:
        """Why Megatron (or the protected layers) cannot take these sizes; None if they can."""
        if target["num_layers"] < len(m.depth.protected):
            return f"num_layers={target['num_layers']} is fewer than the {len(m.depth.protected)} protected layers"
        return megatron_problem(model.config, m.shape, target, original_counts, m.pattern)

    if constraints is not None:
        if export_config is not None:
            raise PruneConfigError("export_config cannot be combined with constraints (NAS budgets): give one of them")
        if m.depth.layers_to_drop:
            raise PruneConfigError("depth.layers_to_drop fixes the depth, which NAS searches: prune those layers with "
                                   "export_config, or protect layers (depth.protected_layers) and let NAS choose")  # fmt: skip
        return None, None, prepare_search(model, ctx, m.shape, constraints, search, score_func, refused)
    if export_config is None:
        raise PruneConfigError("give export_config= (target sizes) or constraints= (NAS budgets)")
    if score_func is not None or search is not None:
        raise PruneConfigError("score_func and search are NAS options: they need budgets in constraints=")
    if m.depth.layers_to_drop or m.depth.protected:
        layers = m.depth.check_target(m.shape.num_layers, export_config.get("num_layers") if isinstance(export_config, Mapping) else None)
        if layers != m.shape.num_layers:
            export_config = {**export_config, "num_layers": layers}
    target = validate_export_config(export_config, m.shape, **ctx.sizes())
    problem = refused(target)
    if problem:
        raise PruneConfigError(problem)
    return export_config, target, None


def _statistics(model, ctx: ParallelContext, m: _Model, criteria: Dict[str, str], first_target: Mapping[str, int],
                forward_loop, scores_path, reuse_scores: bool, all_statistics: bool,
                model_builder) -> Tuple[Dict[str, str], Statistics]:  # fmt: skip
    """The criteria usable at this layout and the statistics they read: calibrated, or from the scores file. The
    pruned config is rebuilt once on the meta device first, so that nothing is calibrated for a model that cannot
    be built."""
    criteria, note = criteria_at_layout(criteria, m.shape, ctx.tp_size)
    if note:
        log(note)
    log(f"importance criteria: {describe(criteria, m.shape)}")
    dry_run_rebuild(model, ctx, m.shape, first_target, m.stage_layers, m.pattern, model_builder)
    return criteria, obtain_statistics(model, forward_loop, ctx, criteria, scores_path, reuse_scores, all_statistics)


def _orders(model, ctx: ParallelContext, m: _Model, importance: Importance, forward_loop,
            target: Optional[Mapping[str, int]], nas: Optional[SearchPlan]) -> Orders:  # fmt: skip
    """Orders of every axis; the layer ranking re-scored iteratively if asked, then the depth controls applied."""
    orders = rank_orders(importance, m.shape)
    fewest = target["num_layers"] if target is not None else min(nas.space.choices.get("num_layers", [m.shape.num_layers]))
    if m.depth.iterative and fewest < m.shape.num_layers:
        ranking, cost = iterative_ranking(model, forward_loop, ctx, orders.layer_ranking, m.depth.protected, fewest)
        log(f"iterative depth scoring: {cost['passes']} passes over the calibration data in {cost['seconds']:.1f}s")
        orders.layer_ranking = ranking
        m.depth.scoring.update(cost)
    orders.layer_ranking = m.depth.ranking(orders.layer_ranking)
    return orders


def _check_importance(importance: Importance, shape: ModelShape, symbols: List[str]) -> None:
    """A caller's Importance must cover every layer that has a module with one value per channel/head/expert.
    `symbols[n - 1]`: what layer n holds, in hybrid-pattern symbols (`config.layer_symbols`)."""
    layers = list(range(1, shape.num_layers + 1))
    if sorted(importance.layers) != layers:
        raise PruneConfigError(f"importance.layers must have an entry for each layer 1..{shape.num_layers}")

    def having(symbol: str) -> List[int]:
        return [n for n in layers if symbol in symbols[n - 1]]

    E, Fm, Fs = shape.num_moe_experts, shape.moe_ffn_hidden_size, shape.moe_shared_expert_intermediate_size
    expected = {  # axis short name: (layers that must have an entry, shape of each)
        "heads": (having("*"), (shape.num_attention_heads,)),
        "ffn": (having("-"), (shape.ffn_hidden_size,)),
        "experts": (having("E"), (E,)),
        "moe_ffn": (having("E"), (E, Fm)),
        "shared_ffn": (having("E") if Fs else [], (Fs,)),
        "mamba_head_dim": (having("M"), (shape.mamba_num_heads, shape.mamba_head_dim)),
        "groups": (having("*"), (shape.num_query_groups,)),  # optional: else the L2 of each group's heads
        "mamba_heads": (having("M"), (shape.mamba_num_heads,)),  # optional: else from `mamba_head_dim`
    }
    if tuple(importance.hidden.shape) != (shape.hidden_size,):
        raise PruneConfigError(f"importance.hidden has shape {tuple(importance.hidden.shape)}, expected ({shape.hidden_size},)")
    for name, (needed, want) in expected.items():
        per_layer = getattr(importance, name)
        if name in ("groups", "mamba_heads") and not per_layer:
            continue
        if sorted(per_layer) != needed:
            raise PruneConfigError(f"importance.{name} must have an entry for each of layers {needed}, got {sorted(per_layer)}")
        for n in needed:
            if tuple(per_layer[n].shape) != want:
                raise PruneConfigError(f"importance.{name}[{n}] has shape {tuple(per_layer[n].shape)}, expected {want}")
