"""`prune()`: validate, score (or reuse cached scores), rank, plan, slice, rebuild. The whole flow.

    model (GPTModel or hybrid MambaModel stage, any TP/PP/DP) --hooks + forward_loop--> raw statistics (this rank)
      --concat over TP, sum over DP, gather over PP--> statistics of all layers --(cache: scores file)-->
      importance --> orders --(export_config)--> plan --> pruned config + sliced state dict
      --> a stock GPTModel / MambaModel built from the pruned config, with the sliced weights loaded (strict)

With NAS budgets (`constraints=`) the target is chosen by search/nas.py: the whole search space is counted
before calibration, and after the one calibration each top-k candidate is built by the same
plan/slice/rebuild step (`_build`), scored and freed; the winner is built last.
The input model is never modified; the pruned model is a new object.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional

import torch

from megatron_prune.minitron.config import (
    SUPPORTED_AXES, ModelShape, PruneConfigError, layer_symbols, validate_export_config,
)
from megatron_prune.minitron.depth import DepthOptions, ResolvedDepth, iterative_ranking
from megatron_prune.minitron.importance.calibration import Statistics, calibrate, obtain_statistics  # noqa: F401  (calibrate: public)
from megatron_prune.minitron.importance.criteria import criteria_at_layout, describe, resolve_criteria
from megatron_prune.minitron.importance.hooks import local_layer_numbers
from megatron_prune.minitron.importance.statistics import StatStore
from megatron_prune.common.log import log
from megatron_prune.minitron.model_checks import check_model, model_shape
from megatron_prune.minitron.ranking import Importance, Orders, rank_orders, score_importance
from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.search.nas import SearchResult, prepare_search, run_search
from megatron_prune.minitron.slicing.model import hybrid_pattern_of, pruned_config, rebuild
from megatron_prune.minitron.slicing.plan import PrunePlan, plan_pruning
from megatron_prune.minitron.slicing.state_dict import load_streaming, sliced_tensors


@dataclass
class PruneResult:
    """What a prune did. Layer numbers are global and 1-indexed."""

    config: object  # the pruned TransformerConfig
    export_config: Dict[str, int]  # complete target sizes
    original_sizes: Dict[str, int]
    importance: Importance
    orders: Orders
    plan: PrunePlan
    stage_layers: List[List[int]]  # original global numbers of the layers each pipeline stage keeps
    params_before: int
    params_after: int
    calibrated: bool  # False when statistics came from the scores file
    calibration_calls: int = 0
    scores_path: Optional[str] = None
    search: Optional[SearchResult] = None  # NAS: the space, the scored candidates and the winner
    criteria: Optional[Dict[str, str]] = None  # {axis: importance criterion}; None when `importance=` was given
    calibration: Optional[dict] = None  # what the statistics were computed on (`calibration_record`), when known
    depth: Optional[dict] = None  # depth controls used: protected, layers_to_drop, iterative scoring and its cost


@dataclass
class _Source:
    """The model to prune and what one calibration (or the scores file) gives every prune of it."""

    model: torch.nn.Module
    ctx: ParallelContext
    shape: ModelShape
    numbers: Dict[int, int]  # {global layer number: position in this stage's decoder.layers}
    stage_layers: List[List[int]]  # original global layer numbers of each pipeline stage
    importance: Importance
    orders: Orders
    params_before: int
    statistics: Statistics
    model_builder: Optional[Callable[[object], torch.nn.Module]]
    pattern: Optional[str] = None  # a hybrid model's layer pattern (whole model)
    criteria: Optional[Dict[str, str]] = None
    depth: Optional[ResolvedDepth] = None


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
            MambaModel stage (TP=1); MoE layers at TP=EP=1; not modified.
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
    check_model(model, ctx, has_builder=model_builder is not None)
    pattern = hybrid_pattern_of(model)  # None for a GPTModel
    shape = model_shape(model, ctx, pattern)
    depth = DepthOptions.of(depth).resolve(shape.num_layers, layer_symbols(model.config, pattern))
    numbers = local_layer_numbers(model)  # {global: local}
    stage_layers = ctx.gather_over_pp(sorted(numbers))
    original_counts = [len(s) for s in stage_layers]
    params_before = count_params(model, ctx)
    log(f"original model: {_sizes(shape.sizes())}, {params_before:,} parameters; "
        f"TP={ctx.tp_size} PP={ctx.pp_size} DP={ctx.dp_size}")  # fmt: skip

    def megatron_problem(target: Mapping[str, int]) -> Optional[str]:
        if target["num_layers"] < len(depth.protected):
            return f"num_layers={target['num_layers']} is fewer than the {len(depth.protected)} protected layers"
        return _megatron_problem(model.config, shape, target, original_counts, pattern)

    nas = None
    if constraints is None:
        if export_config is None:
            raise PruneConfigError("give export_config= (target sizes) or constraints= (NAS budgets)")
        if score_func is not None or search is not None:
            raise PruneConfigError("score_func and search are NAS options: they need budgets in constraints=")
        if depth.layers_to_drop or depth.protected:
            layers = depth.check_target(shape.num_layers, export_config.get("num_layers") if isinstance(export_config, Mapping) else None)
            if layers != shape.num_layers:
                export_config = {**export_config, "num_layers": layers}
        target = validate_export_config(export_config, shape, pp_size=ctx.pp_size, tp_size=ctx.tp_size, ep_size=ctx.ep_size)
        problem = megatron_problem(target)
        if problem:
            raise PruneConfigError(problem)
    else:
        if export_config is not None:
            raise PruneConfigError("export_config cannot be combined with constraints (NAS budgets): give one of them")
        if depth.layers_to_drop:
            raise PruneConfigError("depth.layers_to_drop fixes the depth, which NAS searches: prune those layers with "
                                   "export_config, or protect layers (depth.protected_layers) and let NAS choose")  # fmt: skip
        nas = prepare_search(model, ctx, shape, constraints, search, score_func, megatron_problem)
    if depth.iterative and (importance is not None or forward_loop is None):
        raise PruneConfigError("depth.iterative re-scores the layers with forward passes after each drop: it needs "
                               "forward_loop= (also when the statistics come from scores_path), not importance=")  # fmt: skip
    if importance is not None:
        if nas is not None:
            raise PruneConfigError("importance= ranks a manual prune: it cannot be combined with constraints (NAS)")
        _check_importance(importance, shape, layer_symbols(model.config, pattern))
        statistics, ranked_by_statistics = Statistics(StatStore(), False, None), False
    else:
        criteria, note = criteria_at_layout(criteria, shape.num_query_groups, ctx.tp_size)
        if note:
            log(note)
        log(f"importance criteria: {describe(criteria, shape)}")
        _dry_run_rebuild(model, ctx, shape, target if nas is None else nas.first_sizes(), stage_layers, pattern, model_builder)
        statistics = obtain_statistics(model, forward_loop, ctx, criteria, scores_path, reuse_scores, all_statistics)
        importance, ranked_by_statistics = score_importance(statistics.stats, shape, criteria), True

    orders = rank_orders(importance, shape)
    fewest = target["num_layers"] if nas is None else min(nas.space.choices.get("num_layers", [shape.num_layers]))
    if depth.iterative and fewest < shape.num_layers:
        ranking, cost = iterative_ranking(model, forward_loop, ctx, orders.layer_ranking, depth.protected, fewest)
        log(f"iterative depth scoring: {cost['passes']} passes over the calibration data in {cost['seconds']:.1f}s")
        orders.layer_ranking = ranking
        depth.scoring.update(cost)
    orders.layer_ranking = depth.ranking(orders.layer_ranking)
    src = _Source(
        model=model, ctx=ctx, shape=shape, numbers=numbers, stage_layers=stage_layers, importance=importance,
        orders=orders, params_before=params_before, statistics=statistics,
        model_builder=model_builder, pattern=pattern, criteria=criteria if ranked_by_statistics else None, depth=depth,
    )  # fmt: skip
    if nas is None:
        return _build(src, target, requested=export_config)

    def save(search_cache: dict) -> None:
        statistics.save_search(search_cache, ctx)

    def build_candidate(candidate) -> torch.nn.Module:
        return _build(src, {**shape.sizes(), **candidate.export_config}, candidate.export_config, verbose=False)[0]

    def kept_layers(candidate) -> List[int]:  # depth pruning keeps the top of the layer ranking, on its stage
        return sorted(src.orders.layer_ranking[: {**shape.sizes(), **candidate.export_config}["num_layers"]])

    def keeps_every_stage(candidate) -> bool:
        return not _emptied_stages(stage_layers, kept_layers(candidate))

    found = run_search(nas, keeps_every_stage, build_candidate, score_func, statistics.search, save, ctx, kept_layers,
                       {**criteria, **depth.cache_key()} if depth.protected or depth.iterative else criteria)  # fmt: skip
    pruned, result = _build(src, {**shape.sizes(), **found.best.export_config}, found.best.export_config)
    result.search = found
    return pruned, result


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


def _build(src: _Source, target: Mapping[str, int], requested: Mapping[str, int], verbose: bool = True):
    """Plan, slice and rebuild: (pruned model, PruneResult) for complete target sizes; the axes in
    `requested` are sorted by importance (the others keep their original order). A NAS candidate
    (`verbose=False`) logs nothing and gets no PruneResult (None)."""
    ctx, shape, numbers = src.ctx, src.shape, src.numbers
    plan = plan_pruning(src.orders, shape, target, requested=requested)
    stage_layers = [[n for n in stage if n in plan.layers] for stage in src.stage_layers]
    if verbose and plan.dropped_layers:
        why = "depth.layers_to_drop" if src.depth and src.depth.layers_to_drop else "lowest block influence"
        log(f"dropping layers {plan.dropped_layers} (1-indexed, {why})")
    if verbose and ctx.pp_size > 1:
        log("layers kept per pipeline stage (no rebalancing): "
            + ", ".join(f"stage {i}: {s}" for i, s in enumerate(stage_layers)))  # fmt: skip
    emptied = _emptied_stages(src.stage_layers, plan.kept_layers)
    if emptied:
        raise PruneConfigError(
            f"export_config['num_layers']={target['num_layers']} would leave pipeline stage(s) {emptied} without layers "
            f"(kept per stage: {stage_layers}); re-run at a smaller pipeline size: the scores file is reusable there"
        )

    counts = [len(s) for s in stage_layers]
    original_counts = [len(s) for s in src.stage_layers]
    new_config = pruned_config(src.model.config, shape, target, counts, original_counts, plan.kept_layers, src.pattern)
    kept_local = [numbers[n] for n in stage_layers[ctx.pp_rank]]
    pruned, problem = None, None
    try:  # a failure here (e.g. in a user's model_builder) must not leave other ranks waiting
        builder = src.model_builder
        pruned = builder(new_config) if builder else rebuild(src.model, new_config, kept_local, plan.kept_layers)
    except Exception as e:  # noqa: BLE001 - re-raised on every rank just below
        problem = (RuntimeError, f"building the pruned model failed: {type(e).__name__}: {e}")
    ctx.raise_first(problem)
    layer_numbers = {local: n for n, local in numbers.items()}
    load_streaming(pruned, sliced_tensors(src.model.state_dict(), layer_numbers, plan, shape, ctx))
    _copy_train_flags(src.model, pruned, kept_local)
    if not verbose:
        return pruned, None
    params_after = count_params(pruned, ctx)
    log(f"pruned model: {_sizes(target)}, {params_after:,} parameters ({100 * params_after / src.params_before:.1f}%)")
    result = PruneResult(
        config=new_config, export_config=dict(target), original_sizes=shape.sizes(), importance=src.importance,
        orders=src.orders, plan=plan, stage_layers=stage_layers, params_before=src.params_before,
        params_after=params_after, calibrated=src.statistics.calibrated, calibration_calls=src.statistics.stats.calls,
        scores_path=src.statistics.scores_path, criteria=src.criteria, calibration=src.statistics.calibration,
        depth=src.depth.record() if src.depth else None,
    )  # fmt: skip
    return pruned, result


def _emptied_stages(stage_layers: List[List[int]], kept) -> List[int]:
    """Pipeline stages that held layers (global numbers) but would keep none of `kept`."""
    kept = set(kept)
    return [i for i, stage in enumerate(stage_layers) if stage and not kept.intersection(stage)]


def _megatron_problem(config, shape: ModelShape, target: Mapping[str, int], counts: List[int],
                      pattern: Optional[str] = None) -> Optional[str]:  # fmt: skip
    """Build a pruned config now, so Megatron's own checks fail before calibration; returns why Megatron
    refuses it (None if it builds). Which layers survive is not known yet (`_provisional_counts`)."""
    provisional = _provisional_counts(counts, shape.num_layers - target["num_layers"])
    kept = list(range(1, target["num_layers"] + 1))
    try:
        pruned_config(config, shape, target, provisional, counts, kept, pattern)
    except (AssertionError, ValueError) as e:
        return f"megatron-core rejects the pruned config {dict(target)}: {e}"
    return None


def _provisional_counts(counts: List[int], dropped: int) -> List[int]:
    """Layers per stage before the layer ranking is known: the last ones of the fullest stages go (stages keep one)."""
    provisional = list(counts)
    for _ in range(dropped):
        fullest = max(range(len(provisional)), key=lambda i: (provisional[i], i))
        provisional[fullest] -= 1
    return provisional


def _dry_run_rebuild(model, ctx: ParallelContext, shape: ModelShape, target: Mapping[str, int], stage_layers: List[List[int]],
                     pattern: Optional[str], model_builder) -> None:  # fmt: skip
    """Build this stage of the pruned model once on the meta device, before calibrating, so that a config that
    cannot be rebuilt fails now rather than after calibration (a user's `model_builder` is not dry-run)."""
    if model_builder is not None:
        return
    counts = [len(stage) for stage in stage_layers]
    provisional = _provisional_counts(counts, shape.num_layers - target["num_layers"])
    kept_layers = sorted(n for stage, c in zip(stage_layers, provisional) for n in stage[:c])
    problem = None
    try:
        config = pruned_config(model.config, shape, target, provisional, counts, kept_layers, pattern)
        rebuild(model, config, list(range(provisional[ctx.pp_rank])), kept_layers, on_meta=True)
    except Exception as e:  # noqa: BLE001 - shared with every rank just below
        problem = (PruneConfigError, f"the pruned model cannot be built from the pruned config ({type(e).__name__}: {e}); "
                                     "nothing was calibrated")  # fmt: skip
    ctx.raise_first(problem)


def _copy_train_flags(model, pruned, kept_local: List[int]) -> None:
    """Give each module of `pruned` the train/eval flag of its source module in `model`.

    `kept_local[j]`: the position in `model.decoder.layers` of the layer that is now at position j.
    """
    source = {name: m.training for name, m in model.named_modules()}
    for name, module in pruned.named_modules():
        parts = name.split(".")
        if name.startswith("decoder.layers.") and len(parts) > 2:
            parts[2] = str(kept_local[int(parts[2])])
        module.training = source.get(".".join(parts), module.training)


def count_params(model: torch.nn.Module, ctx: ParallelContext) -> int:
    """Parameters of the whole model: TP shards summed, replicated tensors once, stages summed, a tied
    output layer counted once (the sum of `report.parameter_groups`)."""
    from megatron_prune.minitron.report import parameter_groups

    return sum(parameter_groups(model, ctx).values())


def _sizes(sizes: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={sizes[k]}" for k in SUPPORTED_AXES if k in sizes)
