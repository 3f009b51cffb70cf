"""GradNAS for Hugging Face language models: prune each layer's attention heads and MLP channels, ranked by
gradients of a task loss, to a FLOPs or parameter budget.

    from megatron_prune import gradnas
    pruned, result = gradnas.prune(model, constraints={"params": "70%"}, dummy_input=input_ids,
                                   data_loader=batches)                 # batches: dicts with labels
    pruned.save_pretrained("out") if result.hf_loadable else gradnas.save(pruned, "pruned.pt", result)

Model Optimizer's call shape works too (`import megatron_prune.gradnas as mtp`):

    pruned, result = mtp.prune(model=model, mode="gradnas", constraints={"flops": "60%"}, dummy_input=input_ids,
                               config={"data_loader": batches, "collect_func": lambda b: (b,),
                                       "loss_func": lambda out, b: out.loss, "max_iter_data_loader": 64})

The input model is never modified (it is run with temporary hooks, in eval mode, without parameter gradients);
the result is a new model of the same class. Every input check that does not need the loss runs before the
first gradient pass; the loss itself is checked on the first batch, before its gradients are taken.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Callable, Dict, Optional

import torch.nn as nn

from megatron_prune.common import solver
from megatron_prune.common.checkpoint import SearchCheckpoint, fingerprint
from megatron_prune.common.choices import Rules
from megatron_prune.common.options import check_selectors, merge_options, reachable_limits
from megatron_prune.errors import PruneConfigError
from megatron_prune.fastnas.api import default_collect
from megatron_prune.fastnas.search import Candidate
from megatron_prune.fastnas.subnet import subnet_key
from megatron_prune.gradnas import export
from megatron_prune.gradnas.families import detect
from megatron_prune.gradnas.scores import collect_gradients, default_loss, normalise
from megatron_prune.gradnas.search import GradNASResult, best_candidate, group_scores, penalty_curves, select
from megatron_prune.gradnas.space import SearchSpace, build_space
from megatron_prune.common.log import log as _log

METRICS = ("flops", "params")
DEFAULTS = {
    "max_batches": 128,                      # batches of gradients (Model Optimizer: max_iter_data_loader)
    "collect_func": None,                    # batch -> model inputs (default: a dict as keyword arguments)
    "loss_func": None,                       # (outputs, batch) -> scalar (default: outputs.loss)
    "selectors": ("greedy", "threshold", "uniform"),  # candidates scored by score_func (without it: greedy)
    "rules": None,                           # {group pattern: {"ratios": [...], "divisor": n} or None}
    "prune_kv_groups": False,                # Llama-style: prune whole KV groups instead of query heads per group
    "uniform": False,                        # one FFN width (and head count) for every layer: from_pretrained loads it
    "verbose": True,
}
ALIASES = {"max_iter_data_loader": "max_batches"}  # Model Optimizer's names


def prune(model: nn.Module, mode="gradnas", constraints: Optional[Dict] = None, dummy_input=None,
          config: Optional[Dict] = None, *, data_loader=None, score_func: Optional[Callable[[nn.Module], float]] = None,
          checkpoint=None, **options):
    """Prune heads and FFN channels of `model` under `constraints` ({"flops": ..., "params": ...}: absolute numbers
    or percent strings of the original) and return `(pruned_model, GradNASResult)`.

    `data_loader` batches (through `collect_func`, into `loss_func`) give the gradient scores; `dummy_input` fixes
    the batch and sequence length FLOPs are counted at; optional `score_func(model) -> float` (higher is better)
    picks among the selectors' candidates; `checkpoint` keeps the gradient sums so an interrupted run resumes.
    `config`/keyword options: see `DEFAULTS`."""
    start = time.time()
    opts = _options(mode, config, options, data_loader=data_loader, score_func=score_func, checkpoint=checkpoint)
    log = _log if opts["verbose"] else (lambda s: None)
    family = detect(model)
    if opts["data_loader"] is None:
        raise PruneConfigError("data_loader is required: batches whose loss gives the gradient scores")
    if dummy_input is None:
        raise PruneConfigError("dummy_input is required: model inputs (e.g. input_ids [B, S]) at the batch and sequence "
                               "length FLOPs are counted for")
    _check_keys(constraints)
    if opts["prune_kv_groups"] and not family.kv_out:
        raise PruneConfigError(f"config['prune_kv_groups']: {family.name} has one K/V head per query head; its heads are "
                               "pruned as heads (the option is for grouped-query attention: Llama, Mistral, Qwen)")
    space = build_space(model, dummy_input, opts["rules"], opts["prune_kv_groups"], opts["uniform"])
    limits = check_limits(space, constraints)
    batches, total = _batches(opts["data_loader"])
    # the checkpoint holds gradient sums and candidate scores keyed by their widths: neither depends on the rules,
    # `uniform`, `prune_kv_groups` or the selectors, so runs that differ only in those share one file
    ckpt = SearchCheckpoint.open(opts["checkpoint"], "gradnas", fingerprint(model), {"max_batches": opts["max_batches"]})
    log(f"gradnas: {family.name}, {len(space.layers)} layers, {len(space.variables)} search variables; budgets "
        + ", ".join(f"{m} <= {v:,.0f} ({100 * v / space.count()[m]:.1f}%)" for m, v in limits.items()))
    state, reused = collect_gradients(model, space.sites, batches, opts["collect_func"] or default_collect,
                                      opts["loss_func"] or default_loss, opts["max_batches"], ckpt, total, log)
    site_scores = normalise(state)
    scores = group_scores(space, site_scores)
    penalties = penalty_curves(space, scores)
    selectors = list(opts["selectors"]) if opts["score_func"] is not None else ["greedy"]
    candidates = select(space, penalties, limits, selectors)
    calls = [0]

    def evaluate(c: Candidate) -> float:
        key = subnet_key(c.widths, space.full)
        cached = ckpt.get(key)
        if cached is None:
            cached = _score(opts["score_func"], export.build(model, space, scores, c.widths)[0], c.selector)
            calls[0] += 1
            ckpt.put(key, cached)
        log(f"gradnas: candidate {c.selector}: score {cached:.4f}, "
            + ", ".join(f"{m} {100 * c.counts[m] / space.count()[m]:.1f}%" for m in limits))
        return cached

    best = best_candidate(candidates, evaluate if opts["score_func"] is not None else None)
    pruned, update, loadable = export.build(model, space, scores, best.widths)
    result = GradNASResult(
        widths=dict(best.widths), original_widths=space.full, limits=limits, counts=best.counts,
        original_counts=space.count(), penalties=penalties, scores={s: t.tolist() for s, t in site_scores.items()},
        candidates=candidates, fixed=dict(space.fixed), batches=state["batches"], samples=state["samples"],
        reused_batches=reused, score_calls=calls[0], config_update=update, hf_loadable=loadable,
        seconds=time.time() - start, selector=best.selector,
        settings={k: opts[k] for k in ("max_batches", "prune_kv_groups", "uniform", "selectors")})
    log("gradnas: done\n" + result.table())
    return pruned, result


def profile(model: nn.Module, dummy_input, constraints: Optional[Dict] = None, config: Optional[Dict] = None,
            verbose: bool = True) -> SearchSpace:
    """The search space before any gradient pass: groups, choices, their share of the model, what is fixed and
    why, min/max cost; with `constraints`, also checks that the budgets are reachable."""
    opts = _options("gradnas", config, {})
    space = build_space(model, dummy_input, opts["rules"], opts["prune_kv_groups"], opts["uniform"])
    if constraints is not None:
        check_limits(space, constraints)
    if verbose:
        print(space.table())
    return space


save, restore = export.save, export.restore


# ----------------------------------------------------------------------------------------------- checks
def _options(mode, config, options, **explicit) -> Dict[str, object]:
    if mode != "gradnas" and not (isinstance(mode, (list, tuple)) and list(mode) == ["gradnas"]):
        raise PruneConfigError(f"mode={mode!r}: megatron_prune.gradnas implements 'gradnas' (for vision CNNs use "
                               "megatron_prune.fastnas)")
    if config is not None and not isinstance(config, dict):
        raise PruneConfigError(f"config must be a dict, got {type(config).__name__}")
    merged = merge_options({**DEFAULTS, "data_loader": None, "score_func": None, "checkpoint": None},
                           [config or {}, options, {k: v for k, v in explicit.items() if v is not None}], ALIASES)
    n = merged["max_batches"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PruneConfigError(f"config['max_batches']={n!r} must be a positive integer")
    check_selectors(merged["selectors"])
    for k in ("collect_func", "loss_func", "score_func"):
        if merged[k] is not None and not callable(merged[k]):
            raise PruneConfigError(f"config[{k!r}] must be a callable, got {type(merged[k]).__name__}")
    for k in ("prune_kv_groups", "uniform", "verbose"):
        if not isinstance(merged[k], bool):
            raise PruneConfigError(f"config[{k!r}]={merged[k]!r} must be True or False")
    merged["rules"] = Rules.of(merged["rules"])
    return merged


def _check_keys(constraints) -> None:
    if constraints is None:
        raise PruneConfigError("constraints is required: {'flops': ...} and/or {'params': ...}, absolute or a percentage like '70%'")
    if isinstance(constraints, dict) and constraints:
        unknown = [k for k in constraints if k not in METRICS]
        if unknown:
            raise PruneConfigError(f"constraints: unknown key(s) {', '.join(map(repr, unknown))}; gradnas budgets are {', '.join(METRICS)}")


def check_limits(space: SearchSpace, constraints) -> Dict[str, float]:
    """Budgets in absolute units, reachable by the space (hidden size and embeddings stay)."""
    _check_keys(constraints)
    limits = reachable_limits(constraints, METRICS, space.count(), space.count(space.smallest),
                              "hidden size and embeddings are not pruned; see gradnas.profile()")
    if not space.variables:
        raise PruneConfigError("no head or FFN group of this model can be pruned: " + "; ".join(
            f"{g}: {r}" for g, r in list(space.fixed.items())[:4]))
    if not solver.fits(space.count, space.smallest, limits):
        raise PruneConfigError("the budgets cannot hold together even at the smallest subnet")
    return limits


def _batches(data_loader):
    """An iterator over the loader (its length if it has one); an empty or non-iterable loader is an error."""
    try:
        iterator = iter(data_loader)
    except TypeError:
        raise PruneConfigError(f"data_loader must be iterable (a DataLoader or a list of batches), got {type(data_loader).__name__}") from None
    first = next(iterator, _END)
    if first is _END:
        raise PruneConfigError("data_loader is empty: it must yield at least one batch")
    try:
        total = len(data_loader)
    except TypeError:
        total = None
    return itertools.chain([first], iterator), total


_END = object()


def _score(score_func, model: nn.Module, label: str) -> float:
    try:
        value = float(score_func(model))
    except (TypeError, ValueError) as e:
        raise PruneConfigError(f"score_func on candidate {label} must return a number (higher is better): {e}") from None
    if not math.isfinite(value):
        raise PruneConfigError(f"score_func returned {value} on candidate {label}: it must be a finite number")
    return value
