"""Statistics for a prune: from a calibration (hooks, reductions across ranks) or from the scores file.

    obtain_statistics(model, forward_loop, ctx, criteria, scores_path, ...) -> Statistics   (prune() ranks with it)
    calibrate(model, forward_loop, scores_path, extend)                                      (public: statistics only)

A calibration collects the statistics its criteria read (`criteria.statistics_needed`) and records what it ran
on (the forward loop's `calibration`: a hash of the token rows and the settings that made them); a scores file
recorded on other data is refused, naming the setting that changed, unless `reuse_scores`. Forward loops that
can run a range of their micro-batches (`make_forward_loop`'s) are checkpointed: after every tenth of the data
the statistics so far go to `<scores_path>.partial`, and a calibration of the same model, data and statistics
resumes after the last saved micro-batch (a Ctrl-C loses at most a tenth).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch

from megatron_prune.errors import PruneConfigError
from megatron_prune.minitron.importance.criteria import missing_statistics, needing_backward, statistics_needed
from megatron_prune.minitron.importance.hooks import collect_statistics, is_gradient_statistic, statistics_by_layer
from megatron_prune.minitron.importance.reduce import reduce_statistics
from megatron_prune.minitron.importance.scores_file import (
    ScoresFile, ScoresFileError, calibration_mismatch, check_architecture, config_architecture, load_scores,
    model_fingerprint, read_scores_file, save_scores,
)  # fmt: skip
from megatron_prune.minitron.importance.statistics import StatStore
from megatron_prune.common.log import Progress, log
from megatron_prune.minitron.runtime.interrupt import raise_if_interrupted
from megatron_prune.minitron.runtime.parallel import ParallelContext

CHECKPOINTS = 10  # a resumable calibration saves its statistics after every tenth of the micro-batches


@dataclass
class Statistics:
    """What a prune ranks with: the reduced statistics, where they came from, and the scores file's NAS cache."""

    stats: StatStore
    calibrated: bool  # False: read from the scores file
    calibration: Optional[dict]  # what they were computed on (`calibration_record`), when known
    scores_path: Optional[str] = None
    fingerprint: Optional[dict] = None
    search: dict = field(default_factory=dict)

    def save(self, ctx: ParallelContext, search: Optional[dict] = None) -> None:
        """Write the statistics and `search`, the NAS cache, to the scores file (nothing without one). Without
        `search` they are fresh statistics (a new calibration: any cached NAS scores belonged to the old ones)."""
        if not self.scores_path:
            return
        save_scores(self.scores_path, ScoresFile(self.stats, self.fingerprint, _meta(ctx), search or {}, self.calibration), ctx)
        if search is None:
            log(f"saved statistics of {self.stats.calls} micro-batches to {self.scores_path}")


def obtain_statistics(model: torch.nn.Module, forward_loop: Optional[Callable], ctx: ParallelContext,
                      criteria: Mapping[str, str], scores_path: Optional[str], reuse_scores: bool = False,
                      all_statistics: bool = False) -> Statistics:  # fmt: skip
    """The statistics of every layer for `criteria`: read from `scores_path` if it exists (checked against this
    model, the criteria and the forward loop's data), else calibrated (and saved there). Raises, on every rank,
    PruneConfigError / ScoresFileError before any forward pass."""
    have_scores = ctx.broadcast_object(scores_path is not None and os.path.exists(scores_path))
    if not have_scores and forward_loop is None:
        where = f"no scores file exists at scores_path={scores_path!r}" if scores_path else "no scores_path was given"
        raise PruneConfigError(f"forward_loop is required: {where}, so calibration must run")
    backward = needing_backward(criteria)
    if backward and not have_scores and not getattr(forward_loop, "runs_backward", False):
        raise PruneConfigError(
            f"importance criteria {', '.join(backward)} need gradients, but forward_loop does not run backward: "
            "pass make_forward_loop(batches, backward=True) (or a loop that back-propagates a loss through the "
            "schedule and sets forward_loop.runs_backward = True), or choose forward-only criteria"
        )
    # a collective (a TP gather per split tensor), so computed once and only when a file is involved
    fingerprint = model_fingerprint(model, ctx) if scores_path else None
    wanted = getattr(forward_loop, "calibration", None)
    if have_scores:
        loaded = _load_everywhere(scores_path, fingerprint, ctx)
        check_statistics(loaded.stats, criteria, scores_path)
        check_calibration(scores_path, loaded.calibration, wanted, reuse_scores)
        log(f"loaded statistics of {loaded.stats.calls} calibration micro-batches from {scores_path}; skipping calibration")
        return Statistics(loaded.stats, False, loaded.calibration, scores_path, fingerprint, loaded.search)
    sites = statistics_needed(criteria, backward=bool(getattr(forward_loop, "runs_backward", False)), everything=all_statistics)
    stats = run_calibration(model, forward_loop, ctx, sites, scores_path, fingerprint)
    result = Statistics(stats, True, wanted, scores_path, fingerprint)
    result.save(ctx)
    return result


def calibrate(model: torch.nn.Module, forward_loop: Callable[[torch.nn.Module], None], scores_path: Optional[str] = None,
              extend: bool = False) -> StatStore:  # fmt: skip
    """Collect every forward-only statistic of every layer (Taylor ones too when the loop runs backward), reduced
    over DP and gathered over PP, without pruning: a scores file that serves any forward-only criterion later.

    With `scores_path` the result is saved there; with `extend=True` and an existing file, the new sums are
    *added* to the file's (more calibration data), which equals one calibration over all the data. `prune()` then
    reuses the file at any layout and any target.
    """
    from megatron_prune.minitron.model_checks import check_model

    ctx = ParallelContext.from_megatron()
    check_model(model, ctx)
    fingerprint = model_fingerprint(model, ctx) if scores_path else None
    backward = bool(getattr(forward_loop, "runs_backward", False))
    previous = None
    if ctx.broadcast_object(scores_path is not None and os.path.exists(scores_path)):
        if not extend:
            raise PruneConfigError(f"scores_path={scores_path!r} exists: pass extend=True to add to it, or another path")
        previous = _load_everywhere(scores_path, fingerprint, ctx)  # cached NAS scores are dropped with the old sums
        had_gradients = any(is_gradient_statistic(k) for k in previous.stats.keys())
        if backward != had_gradients:  # Taylor sums would cover only part of the data
            raise PruneConfigError(
                f"scores_path={scores_path!r} was calibrated {'with' if had_gradients else 'without'} a backward pass: "
                f"extend it with a forward loop that {'runs' if had_gradients else 'does not run'} backward"
            )
    sites = statistics_needed({}, backward=backward, everything=True)
    stats = run_calibration(model, forward_loop, ctx, sites, None if previous else scores_path, fingerprint)
    record = getattr(forward_loop, "calibration", None)
    if previous is not None:
        stats = previous.stats.merge(stats)
        record = {"extended": [r for r in (previous.calibration, record) if r is not None]}
    Statistics(stats, True, record, scores_path, fingerprint).save(ctx)
    return stats


def check_statistics(stats: StatStore, criteria: Mapping[str, str], scores_path: str) -> None:
    """A scores file must hold the statistic of every requested criterion (older files, files calibrated for
    other criteria, or without a backward pass, lack some)."""
    missing = missing_statistics(statistics_by_layer(stats.keys()), criteria)
    if missing:
        taylor = " with a forward loop that runs backward" if needing_backward(criteria) else ""
        raise ScoresFileError(f"scores_path={scores_path!r} lacks what the chosen importance criteria need: {'; '.join(missing)}. "
                              f"Calibration must run again{taylor}: delete the file or choose another scores_path, "
                              "or choose criteria whose statistics it holds (calibrate with --all-statistics / "
                              "all_statistics=True to keep every forward-only statistic for later switches)")  # fmt: skip


def check_calibration(scores_path: str, recorded: Optional[dict], wanted: Optional[dict], reuse_scores: bool) -> None:
    """Refuse statistics of other calibration data than `wanted` (naming what changed), unless `reuse_scores`."""
    mismatch = calibration_mismatch(recorded, wanted)
    if mismatch and not reuse_scores:
        raise ScoresFileError(f"scores_path={scores_path!r} holds statistics of other calibration data: {mismatch}. "
                              "Delete it (or choose another path) to calibrate on the data given now, or pass "
                              "--reuse-scores (reuse_scores=True) to use its statistics anyway")  # fmt: skip
    if mismatch:
        log(f"reusing statistics of other calibration data ({mismatch}): --reuse-scores")


def precheck_scores_file(scores_path: str, config, criteria: Mapping[str, str], wanted: Optional[dict],
                         reuse_scores: bool = False) -> None:  # fmt: skip
    """What can be checked of an existing scores file from the model's config alone, before its weights are read:
    the format, the architecture, the statistics `criteria` need, the calibration data (`wanted`). The weights
    digest is compared once the model is loaded. Raises ScoresFileError."""
    payload = read_scores_file(scores_path)
    check_architecture(scores_path, payload["fingerprint"].get("architecture", {}), config_architecture(config), subset=True)
    check_statistics(StatStore.from_state_dict(payload["statistics"]), criteria, scores_path)
    check_calibration(scores_path, payload.get("calibration"), wanted, reuse_scores)


def run_calibration(model: torch.nn.Module, forward_loop: Callable, ctx: ParallelContext, sites: Sequence[str],
                    scores_path: Optional[str] = None, fingerprint: Optional[dict] = None) -> StatStore:  # fmt: skip
    """The statistics `sites` of every layer after `forward_loop`, reduced over TP/DP/PP. With a `scores_path` and
    a resumable loop (`run_range`), checkpointed to `<scores_path>.partial` and resumed from a matching one."""
    backward = bool(getattr(forward_loop, "runs_backward", False))
    if backward and getattr(model.config, "gradient_accumulation_fusion", False):
        raise PruneConfigError("gradient_accumulation_fusion=True needs Megatron's DDP main_grad buffers, which an unwrapped "
                               "model does not have: turn it off in the model's config to calibrate with gradients")  # fmt: skip
    log("calibrating: collecting activation statistics" + (" and gradients" if backward else ""))
    local = StatStore()
    if scores_path and hasattr(forward_loop, "run_range"):
        partial = _Partial(f"{scores_path}.partial", fingerprint, forward_loop, tuple(sites), ctx)
        collect_statistics(model, lambda m: partial.run(m, local), sites, store=local, ctx=ctx)
        stats = partial.done(reduce_statistics(local, ctx))
    else:
        stats = reduce_statistics(collect_statistics(model, forward_loop, sites, store=local, ctx=ctx), ctx)
    if stats.calls == 0:  # checked before anything is saved: an empty file would shadow the next calibration
        raise PruneConfigError("forward_loop ran no forward pass through the model: no calibration data reached it")
    taylor = [v for k, v in stats.sums.items() if is_gradient_statistic(k)]
    if taylor and not any(bool(v.any()) for v in taylor):
        raise PruneConfigError("forward_loop.runs_backward is set, but no gradient reached the model's layers: the loop "
                               "must back-propagate a loss through them (e.g. make_forward_loop(batches, backward=True))")  # fmt: skip
    return stats


class _Partial:
    """Checkpoints of one resumable calibration: the reduced statistics of micro-batches [0, done) in `path`."""

    def __init__(self, path: str, fingerprint: dict, loop, sites: tuple, ctx: ParallelContext):
        self.path, self.fingerprint, self.loop, self.sites, self.ctx = path, fingerprint, loop, sites, ctx
        total = loop.num_micro_batches
        step = max(1, math.ceil(total / CHECKPOINTS / ctx.dp_size)) * ctx.dp_size  # even shares per replica
        self.bounds = list(range(0, total, step)) + [total]
        self.resumed, self.start = StatStore(), 0
        self._resume(total)

    def _resume(self, total: int) -> None:
        if not self.ctx.broadcast_object(os.path.exists(self.path)):
            return
        try:
            found = _load_everywhere(self.path, self.fingerprint, self.ctx)
        except ScoresFileError as e:
            log(f"ignoring {self.path}: {e}")
            return
        state = found.meta.get("partial", {})
        same = (found.calibration == self.loop.calibration and tuple(state.get("sites", ())) == self.sites
                and state.get("total") == total and state.get("done") in self.bounds)  # fmt: skip
        if not same:
            log(f"ignoring {self.path}: statistics of another calibration (data, statistics or split differ)")
            return
        self.resumed, self.start = found.stats, int(state["done"])
        log(f"resuming calibration after micro-batch {self.start} of {total} (statistics saved in {self.path})")

    def run(self, model: torch.nn.Module, local: StatStore) -> None:
        """Forward the remaining micro-batches in steps, saving the statistics so far after each but the last."""
        ranges = [(a, b) for a, b in zip(self.bounds, self.bounds[1:]) if a >= self.start]
        mine = sum(len(range(a + self.ctx.dp_rank, b, self.ctx.dp_size)) for a, b in ranges)
        batch_size = int(self.loop.batches[0].shape[0]) if getattr(self.loop, "batches", None) else 1
        meter = Progress(self.loop.label, mine, scale=batch_size) if self.loop.label else None
        for start, stop in ranges:
            self.loop.run_range(model, start, stop, meter)
            if stop < self.bounds[-1]:
                stats = self.resumed.merge(reduce_statistics(local, self.ctx))
                meta = {**_meta(self.ctx), "partial": {"done": stop, "total": self.bounds[-1], "sites": list(self.sites)}}
                save_scores(self.path, ScoresFile(stats, self.fingerprint, meta, {}, self.loop.calibration), self.ctx)
            raise_if_interrupted()  # an interrupt some library swallowed stops here, after the save
        if meter:
            meter.done()

    def done(self, rest: StatStore) -> StatStore:
        """All statistics: the resumed part plus the rest; the checkpoint file is no longer needed."""
        self.ctx.on_main(lambda: os.path.exists(self.path) and os.unlink(self.path))
        return self.resumed.merge(rest) if self.start else rest


def _meta(ctx: ParallelContext) -> dict:
    return {"tp_size": ctx.tp_size, "pp_size": ctx.pp_size, "dp_size": ctx.dp_size}


def _load_everywhere(scores_path: str, fingerprint: Dict[str, object], ctx: ParallelContext) -> ScoresFile:
    """Global rank 0 reads the file and checks it against `fingerprint`; every rank gets its contents, or the
    same error."""
    loaded, problem = None, None
    if ctx.is_main:
        try:
            loaded = load_scores(scores_path, fingerprint).to_payload()
        except Exception as e:  # noqa: BLE001 - re-raised on every rank just below
            problem = (ScoresFileError, str(e) if isinstance(e, ScoresFileError) else f"{type(e).__name__}: {e}")
    ctx.raise_first(problem)
    return ScoresFile.from_payload(ctx.broadcast_object(loaded))
