"""FastNAS for PyTorch models: prune channel widths to a FLOPs or parameter budget, keeping the best score.

    from megatron_prune import fastnas
    pruned, result = fastnas.prune(model, constraints={"flops": "50%"}, dummy_input=torch.randn(1, 3, 224, 224),
                                   data_loader=train_loader, score_func=validate, checkpoint="search.pt")
    fastnas.save(pruned, "pruned.pt", result)            # architecture + weights in one file
    model = fastnas.restore(build_model(), "pruned.pt")   # identical outputs

Model Optimizer's call shape works too (`import megatron_prune.fastnas as mtp` in place of
`import modelopt.torch.prune as mtp`):

    pruned, result = mtp.prune(model=model, mode="fastnas", constraints={"flops": "60%"}, dummy_input=x,
                               config={"data_loader": loader, "score_func": score, "checkpoint": "ckpt.pth"})

The input model is never modified: the result is a new, smaller model of the same class holding ordinary
`Conv2d`/`BatchNorm2d`/`Linear` layers. Every input check runs before the first score call.
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Dict, Optional

import torch.nn as nn

from megatron_prune.common import archfile, solver
from megatron_prune.common.checkpoint import SearchCheckpoint, fingerprint
from megatron_prune.common.choices import Rules
from megatron_prune.common.options import check_selectors, merge_options, reachable_limits
from megatron_prune.errors import PruneConfigError
from megatron_prune.fastnas.importance import CRITERIA, input_second_moments, rank_channels
from megatron_prune.fastnas.search import FastNASResult, run_search
from megatron_prune.fastnas.space import SearchSpace, build_space
from megatron_prune.fastnas.subnet import Evaluator
from megatron_prune.fastnas.trace import run_model
from megatron_prune.common.log import log as _log

METRICS = ("flops", "params")
DEFAULTS = {
    "criterion": "output_contribution",     # channel ranking: output_contribution or l2_norm (Model Optimizer's)
    "sensitivity_points": 3,                # narrower widths scored per group
    "bn_batches": 20,                       # batches for each BatchNorm recalibration (and channel statistics)
    "selectors": ("greedy", "threshold", "uniform"),  # candidate width sets, each scored; the best wins
    "rules": None,                          # {pattern: {"ratios": [...], "divisor": n} or None}
    "leaf_modules": (),                     # module names/patterns/classes fx should not trace into
    "collect_func": None,                   # batch -> model inputs (default: batch[0], a tensor, or a dict of kwargs)
    "verbose": True,
}
ALIASES = {"max_iter_data_loader": "bn_batches"}  # Model Optimizer's names


def prune(model: nn.Module, mode="fastnas", constraints: Optional[Dict] = None, dummy_input=None,
          config: Optional[Dict] = None, *, data_loader=None, score_func: Optional[Callable[[nn.Module], float]] = None,
          checkpoint=None, **options):
    """Search channel widths of `model` under `constraints` ({"flops": ..., "params": ...}: absolute numbers or
    percent strings of the original) and return `(pruned_model, FastNASResult)`.

    `score_func(model) -> float` (higher is better) scores subnets; `data_loader` batches recalibrate
    BatchNorm; `checkpoint` keeps every score so an interrupted search resumes. `config`/keyword options:
    see `DEFAULTS` (Model Optimizer's `max_iter_data_loader` is `bn_batches`)."""
    start = time.time()
    opts = _options(mode, config, options, data_loader=data_loader, score_func=score_func, checkpoint=checkpoint)
    log = _log if opts["verbose"] else (lambda s: None)
    if not callable(opts["score_func"]):
        raise PruneConfigError("score_func is required: a callable(model) -> float, higher is better (e.g. validation accuracy)")
    if opts["data_loader"] is None:
        raise PruneConfigError("data_loader is required: batches to recalibrate BatchNorm statistics and rank channels")
    if dummy_input is None:
        raise PruneConfigError("dummy_input is required: an input the model accepts (a tensor, a tuple of args, or args + a dict of kwargs)")
    if constraints is not None:
        _check_keys(constraints)
    base = copy.deepcopy(model).eval()
    space = build_space(base, dummy_input, opts["rules"], opts["leaf_modules"])
    limits = check_limits(space, constraints)
    run = run_inputs
    batches = take_batches(opts["data_loader"], opts["bn_batches"], opts["collect_func"])
    settings = {k: opts[k] for k in ("criterion", "bn_batches")}
    settings["selectors"] = list(opts["selectors"])
    ckpt = SearchCheckpoint.open(opts["checkpoint"], "fastnas", fingerprint(base), settings)
    log(f"fastnas: {len(space.searchable)} searchable groups; budgets "
        + ", ".join(f"{m} <= {v:,.0f} ({100 * v / space.count()[m]:.1f}%)" for m, v in limits.items()))
    evaluator = Evaluator(base, space, {}, batches, run, opts["score_func"], ckpt, log)
    moments = None
    if opts["criterion"] == "output_contribution":
        consumers = sorted({m for (m, _), _ in space.analysis.consumers})
        moments = input_second_moments(evaluator.build({}), consumers, batches, run)
    evaluator.orders = rank_channels(base, space, opts["criterion"], moments)
    result = run_search(space, evaluator, limits, opts["sensitivity_points"], list(opts["selectors"]), log)
    pruned = evaluator.build(result.widths)
    result.settings = {**settings, "sensitivity_points": opts["sensitivity_points"]}
    result.seconds = time.time() - start
    log("fastnas: done\n" + result.table())
    return pruned, result


def profile(model: nn.Module, dummy_input, constraints: Optional[Dict] = None, config: Optional[Dict] = None,
            verbose: bool = True) -> SearchSpace:
    """The search space before any search: groups, their choices, what is fixed and why, min/max cost; with
    `constraints`, also checks that the budgets are reachable (an error names the smallest reachable value)."""
    opts = _options("fastnas", config, {}, require_search=False)
    space = build_space(copy.deepcopy(model).eval(), dummy_input, opts["rules"], opts["leaf_modules"])
    if constraints is not None:
        _check_keys(constraints)
        check_limits(space, constraints)
    if verbose:
        print(space.table())
    return space


def save(model: nn.Module, path, result: Optional[FastNASResult] = None) -> None:
    """Write the pruned model's architecture and weights to one file (atomically)."""
    archfile.save_pruned(model, path, "fastnas", result.to_dict() if result is not None else None)


def restore(model: nn.Module, path) -> nn.Module:
    """Resize a freshly built original `model` to the saved architecture and load the weights (in place)."""
    return archfile.restore_pruned(model, path)


# ----------------------------------------------------------------------------------------------- checks
def _options(mode, config, options, require_search: bool = True, **explicit) -> Dict[str, object]:
    if mode != "fastnas":
        rules = None
        if isinstance(mode, (list, tuple)) and len(mode) == 1 and isinstance(mode[0], (list, tuple)) and mode[0][0] == "fastnas":
            rules = mode[0][1]
        elif not (isinstance(mode, (list, tuple)) and list(mode) == ["fastnas"]):
            raise PruneConfigError(f"mode={mode!r}: megatron_prune.fastnas implements 'fastnas' (for Hugging Face "
                                   "language models use megatron_prune.gradnas)")
        options = {**options, "rules": rules} if rules is not None else options
    if config is not None and not isinstance(config, dict):
        raise PruneConfigError(f"config must be a dict, got {type(config).__name__}")
    merged = merge_options({**DEFAULTS, "data_loader": None, "score_func": None, "checkpoint": None},
                           [config or {}, options, {k: v for k, v in explicit.items() if v is not None}], ALIASES)
    if merged["criterion"] not in CRITERIA:
        raise PruneConfigError(f"config['criterion']={merged['criterion']!r}: choose one of {', '.join(CRITERIA)}")
    for k in ("sensitivity_points", "bn_batches"):
        if isinstance(merged[k], bool) or not isinstance(merged[k], int) or merged[k] < 1:
            raise PruneConfigError(f"config[{k!r}]={merged[k]!r} must be a positive integer")
    check_selectors(merged["selectors"])
    if merged["collect_func"] is not None and not callable(merged["collect_func"]):
        raise PruneConfigError("config['collect_func'] must be a callable(batch) -> model inputs")
    merged["rules"] = Rules.of(merged["rules"])
    merged["leaf_modules"] = tuple(merged["leaf_modules"] or ())
    return merged


def _check_keys(constraints) -> None:
    if isinstance(constraints, dict) and constraints:
        unknown = [k for k in constraints if k not in METRICS]
        if unknown:
            raise PruneConfigError(f"constraints: unknown key(s) {', '.join(map(repr, unknown))}; fastnas budgets are {', '.join(METRICS)}")


def check_limits(space: SearchSpace, constraints) -> Dict[str, float]:
    """Budgets in absolute units; each below the original and at or above the smallest subnet."""
    if constraints is None:
        raise PruneConfigError("constraints is required: {'flops': ...} and/or {'params': ...}, absolute or a percentage like '60%'")
    limits = reachable_limits(constraints, METRICS, space.count(), space.count(space.smallest),
                              hint="see fastnas.profile() for what is fixed and why")
    if not space.searchable:
        reasons = "; ".join(f"{g}: {r}" for g, r in list(space.fixed.items())[:6])
        raise PruneConfigError(f"no channel group of this model can be pruned ({reasons})")
    if not solver.fits(space.count, space.smallest, limits):
        raise PruneConfigError("the budgets cannot hold together even at the smallest subnet")
    return limits


def run_inputs(model: nn.Module, inputs):
    """One forward on inputs already passed through `collect_func` (see `take_batches`)."""
    return run_model(model, inputs)


def default_collect(batch):
    """Model inputs from a batch: `batch[0]` of a tuple/list (images, labels); a tensor or a dict (keyword
    arguments) as is."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def take_batches(data_loader, n: int, collect_func: Optional[Callable]) -> list:
    """The model inputs of the first `n` batches of `data_loader` (an empty loader is an error)."""
    collect = collect_func or default_collect
    out = []
    try:
        iterator = iter(data_loader)
    except TypeError:
        raise PruneConfigError(f"data_loader must be iterable (a DataLoader or a list of batches), got {type(data_loader).__name__}") from None
    for batch in iterator:
        out.append(collect(batch))
        if len(out) == n:
            break
    if not out:
        raise PruneConfigError("data_loader is empty: it must yield at least one batch")
    return out
