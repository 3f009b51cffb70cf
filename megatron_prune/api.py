"""`prune()`: validate, score (or reuse cached scores), rank, plan, slice, rebuild. The whole flow.

    model (GPTModel stage, any TP/PP/DP) --hooks + forward_loop--> raw statistics (this rank)
      --concat over TP, sum over DP, gather over PP--> statistics of all layers --(cache: scores file)-->
      importance --> orders --(export_config)--> plan --> pruned config + sliced state dict
      --> a stock GPTModel built from the pruned config, with the sliced weights loaded (strict)

The input model is never modified; the pruned model is a new object.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional

import torch

from megatron_prune.config import SUPPORTED_AXES, ModelShape, PruneConfigError, UnsupportedModelError, validate_export_config
from megatron_prune.importance.hooks import collect_statistics, local_layer_numbers
from megatron_prune.importance.reduce import reduce_statistics
from megatron_prune.importance.scores_file import ScoresFileError, load_scores, model_fingerprint, save_scores
from megatron_prune.importance.statistics import StatStore
from megatron_prune.log import log
from megatron_prune.ranking import Importance, Orders, rank_orders, score_importance
from megatron_prune.runtime.parallel import ParallelContext
from megatron_prune.slicing.model import block_spec_is_homogeneous, pruned_config, rebuild_gpt
from megatron_prune.slicing.plan import PrunePlan, plan_pruning
from megatron_prune.slicing.state_dict import load_streaming, sliced_tensors
from megatron_prune.slicing.table import axes_of, is_tied_output_copy
from megatron_prune.slicing.tensor_parallel import partitions


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


def prune(
    model: torch.nn.Module,
    export_config: Mapping[str, int],
    forward_loop: Optional[Callable[[torch.nn.Module], None]] = None,
    scores_path: Optional[str] = None,
    model_builder: Optional[Callable[[object], torch.nn.Module]] = None,
):
    """Prune an MCore `GPTModel` (this rank's pipeline stage) to the sizes in `export_config`.

    Args:
        model: an unwrapped GPTModel stage at any TP/PP/DP layout (sequence parallel off); not modified.
        export_config: target sizes, any subset of hidden_size, ffn_hidden_size, num_attention_heads,
            num_query_groups and num_layers (TransformerConfig field names).
        forward_loop: `forward_loop(model)` runs calibration forwards (see `make_forward_loop`); with
            data parallelism each replica forwards its own share. Needed unless `scores_path` exists.
        scores_path: a file caching the statistics. If it exists (and matches this model) calibration is
            skipped; otherwise it is written after calibration. Reusable at any TP/PP/DP layout.
        model_builder: `model_builder(pruned_config) -> GPTModel stage`; by default the model is rebuilt
            with the same constructor arguments as `model`.

    Returns:
        (pruned_model, PruneResult). The pruned model is a stock GPTModel built from `result.config`
        holding the original weights sliced; kept channels/heads are in importance order.
    """
    ctx = ParallelContext.from_megatron()
    _check_model(model, ctx, has_builder=model_builder is not None)
    shape = ModelShape.from_config(model.config)
    target = validate_export_config(export_config, shape, pp_size=ctx.pp_size, tp_size=ctx.tp_size)
    numbers = local_layer_numbers(model)  # {global: local}
    original_counts = [len(s) for s in ctx.gather_over_pp(sorted(numbers))]
    _check_megatron_accepts(model.config, shape, target, original_counts)
    have_scores = ctx.broadcast_object(scores_path is not None and os.path.exists(scores_path))
    if not have_scores and forward_loop is None:
        where = f"no scores file exists at scores_path={scores_path!r}" if scores_path else "no scores_path was given"
        raise PruneConfigError(f"forward_loop is required: {where}, so calibration must run")

    params_before = count_params(model, ctx)
    log(f"original model: {_sizes(shape.sizes())}, {params_before:,} parameters; "
        f"TP={ctx.tp_size} PP={ctx.pp_size} DP={ctx.dp_size}")  # fmt: skip
    if have_scores:
        stats = _load_everywhere(scores_path, model_fingerprint(model, ctx), ctx)
        log(f"loaded statistics of {stats.calls} calibration micro-batches from {scores_path}; skipping calibration")
    else:
        stats = _calibrate(model, forward_loop, ctx)
        if scores_path:
            _save(scores_path, stats, model_fingerprint(model, ctx), ctx)

    importance = score_importance(stats, shape)
    orders = rank_orders(importance, shape)
    plan = plan_pruning(orders, shape, target, requested=export_config)
    stage_layers = ctx.gather_over_pp([n for n in sorted(numbers) if n in plan.layers])
    if plan.dropped_layers:
        log(f"dropping layers {plan.dropped_layers} (1-indexed, lowest block influence)")
    if ctx.pp_size > 1:
        log("layers kept per pipeline stage (no rebalancing): "
            + ", ".join(f"stage {i}: {s}" for i, s in enumerate(stage_layers)))  # fmt: skip
    emptied = [i for i, s in enumerate(stage_layers) if not s and original_counts[i]]
    if emptied:
        raise PruneConfigError(
            f"export_config['num_layers']={target['num_layers']} would leave pipeline stage(s) {emptied} without layers "
            f"(kept per stage: {stage_layers}); re-run at a smaller pipeline size: the scores file is reusable there"
        )

    counts = [len(s) for s in stage_layers]
    new_config = pruned_config(model.config, shape, target, counts, original_counts, plan.kept_layers)
    pruned, problem = None, None
    try:  # a failure here (e.g. in a user's model_builder) must not leave other ranks waiting
        pruned = model_builder(new_config) if model_builder else rebuild_gpt(model, new_config, counts[ctx.pp_rank])
    except Exception as e:  # noqa: BLE001 - re-raised on every rank just below
        problem = (RuntimeError, f"building the pruned model failed: {type(e).__name__}: {e}")
    ctx.raise_first(problem)
    layer_numbers = {local: n for n, local in numbers.items()}
    load_streaming(pruned, sliced_tensors(model.state_dict(), layer_numbers, plan, shape, ctx))
    _copy_train_flags(model, pruned, [numbers[n] for n in stage_layers[ctx.pp_rank]])
    params_after = count_params(pruned, ctx)
    log(f"pruned model: {_sizes(target)}, {params_after:,} parameters ({100 * params_after / params_before:.1f}%)")
    result = PruneResult(
        config=new_config, export_config=target, original_sizes=shape.sizes(), importance=importance,
        orders=orders, plan=plan, stage_layers=stage_layers, params_before=params_before,
        params_after=params_after, calibrated=not have_scores, calibration_calls=stats.calls,
        scores_path=scores_path,
    )  # fmt: skip
    return pruned, result


def calibrate(
    model: torch.nn.Module,
    forward_loop: Callable[[torch.nn.Module], None],
    scores_path: Optional[str] = None,
    extend: bool = False,
) -> StatStore:
    """Collect the statistics of every layer (reduced over DP, gathered over PP) without pruning.

    With `scores_path` the result is saved there; with `extend=True` and an existing file, the new sums
    are *added* to the file's (more calibration data, e.g. after an interrupted job), which equals one
    calibration over all the data. `prune()` then reuses the file at any layout and any target.
    """
    ctx = ParallelContext.from_megatron()
    _check_model(model, ctx)
    # a collective (a TP gather per split tensor), so computed once and only when a file is involved
    fingerprint = model_fingerprint(model, ctx) if scores_path else None
    previous = None
    if ctx.broadcast_object(scores_path is not None and os.path.exists(scores_path)):
        if not extend:
            raise PruneConfigError(f"scores_path={scores_path!r} exists: pass extend=True to add to it, or another path")
        previous = _load_everywhere(scores_path, fingerprint, ctx)
    stats = _calibrate(model, forward_loop, ctx)
    if previous is not None:
        stats = previous.merge(stats)
    if scores_path:
        _save(scores_path, stats, fingerprint, ctx)
    return stats


def _calibrate(model, forward_loop, ctx: ParallelContext) -> StatStore:
    log("calibrating: collecting activation statistics")
    stats = reduce_statistics(collect_statistics(model, forward_loop), ctx)
    if stats.calls == 0:  # checked before anything is saved: an empty file would shadow the next calibration
        raise PruneConfigError("forward_loop ran no forward pass through the model: no calibration data reached it")
    return stats


def _save(scores_path: str, stats: StatStore, fingerprint: Dict[str, object], ctx: ParallelContext) -> None:
    meta = {"tp_size": ctx.tp_size, "pp_size": ctx.pp_size, "dp_size": ctx.dp_size}
    save_scores(scores_path, stats, fingerprint, ctx, meta=meta)
    log(f"saved statistics of {stats.calls} micro-batches to {scores_path}")


def _load_everywhere(scores_path: str, fingerprint: Dict[str, object], ctx: ParallelContext) -> StatStore:
    """Global rank 0 reads the file and checks it against `fingerprint`; every rank gets its statistics,
    or the same error."""
    stats, problem = None, None
    if ctx.is_main:
        try:
            stats = load_scores(scores_path, fingerprint).state_dict()
        except Exception as e:  # noqa: BLE001 - re-raised on every rank just below
            problem = (ScoresFileError, str(e) if isinstance(e, ScoresFileError) else f"{type(e).__name__}: {e}")
    ctx.raise_first(problem)
    return StatStore.from_state_dict(ctx.broadcast_object(stats))


def _check_megatron_accepts(config, shape: ModelShape, target: Mapping[str, int], counts: List[int]) -> None:
    """Build a pruned config now, so Megatron's own checks fail before calibration. Which layers survive
    is not known yet: it assumes the last ones of the fullest stages go (stages keep at least one)."""
    provisional = list(counts)
    for _ in range(shape.num_layers - target["num_layers"]):
        fullest = max(range(len(provisional)), key=lambda i: (provisional[i], i))
        provisional[fullest] -= 1
    kept = list(range(1, target["num_layers"] + 1))
    try:
        pruned_config(config, shape, target, provisional, counts, kept)
    except (AssertionError, ValueError) as e:
        raise PruneConfigError(f"megatron-core rejects the pruned config {dict(target)}: {e}") from e


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
    output layer counted once."""
    local, split = 0, partitions(model)
    for name, p in model.named_parameters():
        if is_tied_output_copy(model, name):
            continue
        if name in split or ctx.tp_rank == 0:
            local += p.numel()
    stage = int(sum(t.item() for t in ctx.gather_over_tp(torch.tensor([local], dtype=torch.float64))))
    return sum(ctx.gather_over_pp(stage))


def _check_model(model: torch.nn.Module, ctx: ParallelContext, has_builder: bool = False) -> None:
    """Refuse what megatron-prune cannot prune. Pipeline stages hold different modules, so the ranks
    agree on the verdict first: every rank raises the same error and none is left waiting in a collective."""
    ctx.raise_first(_model_problem(model, ctx, has_builder))


def _model_problem(model: torch.nn.Module, ctx: ParallelContext, has_builder: bool):
    """(error class, message) for the first unsupported feature of this stage, or None."""
    from megatron.core.models.gpt import GPTModel

    if not isinstance(model, GPTModel):
        return PruneConfigError, (
            f"model must be an unwrapped megatron.core GPTModel, got {type(model).__name__} "
            "(unwrap DDP/Float16Module first, e.g. megatron.core.utils.unwrap_model)"
        )
    cfg = model.config
    if ctx.tp_size > 1 and cfg.sequence_parallel:
        return PruneConfigError, (
            "config.sequence_parallel=True: calibrate with sequence parallelism off (it splits the sequence that "
            "per-sample statistics average over); TP itself is supported"
        )
    if (cfg.context_parallel_size or 1) > 1:
        return PruneConfigError, f"config.context_parallel_size={cfg.context_parallel_size}: prune with CP=1"
    if cfg.virtual_pipeline_model_parallel_size or getattr(model, "vp_stage", None) is not None:
        return PruneConfigError, "virtual pipeline parallelism (virtual_pipeline_model_parallel_size) is not supported"
    if getattr(cfg, "use_te_op_fuser", False):
        return PruneConfigError, "config.use_te_op_fuser=True (TEFusedMLP) is not supported: its linears are not called as modules"
    for flag in ("attention_output_gate", "multi_latent_attention", "heterogeneous_block_specs"):
        if getattr(cfg, flag, False):
            return PruneConfigError, f"config.{flag}=True is not supported yet by megatron-prune"
    if getattr(model, "mtp_process", False):
        return PruneConfigError, "multi-token-prediction layers are not supported: build the model without MTP"
    if not has_builder and not block_spec_is_homogeneous(model.transformer_layer_spec):
        return PruneConfigError, "the model's block spec has a different spec per layer: pass model_builder= to prune()"
    for name in model.state_dict():
        index, _, axes = axes_of(name)
        if not name.endswith("._extra_state") and axes is None:
            path = name.rpartition(".")[0]
            where = "" if index is None else f", layer {model.decoder.layers[index].layer_number}"
            return UnsupportedModelError, (
                f"unsupported module type {type(model.get_submodule(path)).__name__} at '{path}'{where} (tensor '{name}'): "
                "megatron-prune handles dense GPT layers (SelfAttention + MLP); MoE, Mamba and MLA are not supported yet"
            )
    return None


def _sizes(sizes: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={sizes[k]}" for k in SUPPORTED_AXES if k in sizes)
