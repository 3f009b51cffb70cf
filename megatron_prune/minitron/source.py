"""The model being pruned, and one prune of it: `PruneSource.build(target)` plans, slices and rebuilds.

What one calibration (or the scores file) gives every prune of a model is gathered once in a `PruneSource`:
the model, its layout and shape, the importance and orders. `build` turns complete target sizes into a pruned
model (plan -> pruned config -> stock model -> sliced weights streamed in) and NAS builds each candidate
through the same source (`build_candidate`, `kept_layers`, `keeps_every_stage`, `save_search`).
Also here: the checks that build a pruned config before calibration (`megatron_problem`, `dry_run_rebuild`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional

import torch

from megatron_prune.common.log import log
from megatron_prune.errors import PruneConfigError
from megatron_prune.minitron.axes import format_sizes
from megatron_prune.minitron.config import ModelShape
from megatron_prune.minitron.depth import ResolvedDepth
from megatron_prune.minitron.importance.calibration import Statistics
from megatron_prune.minitron.ranking import Importance, Orders
from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.slicing.model import pruned_config, rebuild
from megatron_prune.minitron.search.nas import SearchResult
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
class PruneSource:
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

    def build(self, target: Mapping[str, int], requested: Mapping[str, int], verbose: bool = True):
        """Plan, slice and rebuild: (pruned model, PruneResult) for complete target sizes; the axes in `requested`
        are sorted by importance (the others keep their original order). A NAS candidate (`verbose=False`) logs
        nothing and gets no PruneResult (None)."""
        ctx, shape, numbers = self.ctx, self.shape, self.numbers
        plan = plan_pruning(self.orders, shape, target, requested=requested)
        stage_layers = [[n for n in stage if n in plan.layers] for stage in self.stage_layers]
        if verbose and plan.dropped_layers:
            why = "depth.layers_to_drop" if self.depth and self.depth.layers_to_drop else "lowest block influence"
            log(f"dropping layers {plan.dropped_layers} (1-indexed, {why})")
        if verbose and ctx.pp_size > 1:
            log("layers kept per pipeline stage (no rebalancing): "
                + ", ".join(f"stage {i}: {s}" for i, s in enumerate(stage_layers)))  # fmt: skip
        emptied = emptied_stages(self.stage_layers, plan.kept_layers)
        if emptied:
            raise PruneConfigError(
                f"export_config['num_layers']={target['num_layers']} would leave pipeline stage(s) {emptied} without layers "
                f"(kept per stage: {stage_layers}); re-run at a smaller pipeline size: the scores file is reusable there"
            )

        counts = [len(s) for s in stage_layers]
        original_counts = [len(s) for s in self.stage_layers]
        new_config = pruned_config(self.model.config, shape, target, counts, original_counts, plan.kept_layers, self.pattern)
        kept_local = [numbers[n] for n in stage_layers[ctx.pp_rank]]
        pruned, problem = None, None
        try:  # a failure here (e.g. in a user's model_builder) must not leave other ranks waiting
            builder = self.model_builder
            pruned = builder(new_config) if builder else rebuild(self.model, new_config, kept_local, plan.kept_layers)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank just below
            problem = (RuntimeError, f"building the pruned model failed: {type(e).__name__}: {e}")
        ctx.raise_first(problem)
        layer_numbers = {local: n for n, local in numbers.items()}
        load_streaming(pruned, sliced_tensors(self.model.state_dict(), layer_numbers, plan, shape, ctx))
        _copy_train_flags(self.model, pruned, kept_local)
        if not verbose:
            return pruned, None
        params_after = count_params(pruned, ctx)
        log(f"pruned model: {format_sizes(target)}, {params_after:,} parameters ({100 * params_after / self.params_before:.1f}%)")
        result = PruneResult(
            config=new_config, export_config=dict(target), original_sizes=shape.sizes(), importance=self.importance,
            orders=self.orders, plan=plan, stage_layers=stage_layers, params_before=self.params_before,
            params_after=params_after, calibrated=self.statistics.calibrated, calibration_calls=self.statistics.stats.calls,
            scores_path=self.statistics.scores_path, criteria=self.criteria, calibration=self.statistics.calibration,
            depth=self.depth.record() if self.depth else None,
        )  # fmt: skip
        return pruned, result

    def sizes(self, export_config: Mapping[str, int]) -> Dict[str, int]:
        """Complete target sizes: the model's, overridden by `export_config`."""
        return {**self.shape.sizes(), **export_config}

    def build_candidate(self, candidate) -> torch.nn.Module:
        """A NAS candidate's pruned model."""
        return self.build(self.sizes(candidate.export_config), candidate.export_config, verbose=False)[0]

    def kept_layers(self, candidate) -> List[int]:
        """The layers a candidate keeps: the top of the layer ranking (each on its stage)."""
        return sorted(self.orders.layer_ranking[: self.sizes(candidate.export_config)["num_layers"]])

    def keeps_every_stage(self, candidate) -> bool:
        return not emptied_stages(self.stage_layers, self.kept_layers(candidate))

    def save_search(self, search_cache: dict) -> None:
        """Store NAS candidate scores in the scores file (`search_cache`: its search section)."""
        self.statistics.save(self.ctx, search_cache)


def emptied_stages(stage_layers: List[List[int]], kept) -> List[int]:
    """Pipeline stages that held layers (global numbers) but would keep none of `kept`."""
    kept = set(kept)
    return [i for i, stage in enumerate(stage_layers) if stage and not kept.intersection(stage)]


def megatron_problem(config, shape: ModelShape, target: Mapping[str, int], counts: List[int],
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


def dry_run_rebuild(model, ctx: ParallelContext, shape: ModelShape, target: Mapping[str, int], stage_layers: List[List[int]],
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

