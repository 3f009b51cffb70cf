"""The NAS search space and the candidates that fit the budgets (algorithm §8.2-§8.3).

Owns: the choices of each axis (divisors, truncation by `max_*_pruning`, skipped axes), the Cartesian
product of them, dropping combinations Megatron or the parallel layout cannot build, counting each
analytically and keeping those within every budget, ordered closest-to-the-primary-budget first. It does
not own calibration, building or scoring candidates (nas.py).

Heads are searched *per query group* (each group keeps the same number of its heads), so a candidate's
`num_attention_heads` is groups x heads-per-group: with the groups fixed (the default) the choices are the
multiples of G, {G, 2G, ..., N}, as in the reference.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

from megatron_prune.minitron.axes import AXES, DEPTH
from megatron_prune.errors import PruneConfigError
from megatron_prune.minitron.config import SUPPORTED_AXES, ModelShape, SearchConfig, validate_export_config
from megatron_prune.common.log import log
from megatron_prune.minitron.search.counting import Counts, Inventory, MemorySpec

HEADS, GROUPS = "num_attention_heads", "num_query_groups"


def divisor_choices(size: int, divisor: int) -> List[int]:
    """{d, 2d, ..., floor(size/d)*d} plus `size` itself, ascending (just [size] when size < d)."""
    return sorted(set(range(divisor, size + 1, divisor)) | {size})


def truncate(choices: List[int], fraction: float) -> List[int]:
    """The largest choices a pruning `fraction` allows: sorted(choices)[int((1 - fraction) * n):], the
    reference's exact expression; the largest choice always stays."""
    ordered = sorted(choices)
    return ordered[min(int((1 - fraction) * len(ordered)), len(ordered) - 1) :]


@dataclass(frozen=True)
class SearchSpace:
    """Choices of each searched axis, in `SUPPORTED_AXES` order. `choices[HEADS]` counts heads *per query
    group*; every other axis counts its own size. Axes not listed keep their original size."""

    original: Mapping[str, int]
    choices: Mapping[str, List[int]]
    heads_per_group: int  # of the original model

    @property
    def axes(self) -> Tuple[str, ...]:
        """The axes a candidate sets (and the plan sorts): the searched ones, plus the heads when only the
        groups are searched (a group count changes the head count)."""
        searched = set(self.choices) | ({HEADS} if GROUPS in self.choices else set())
        return tuple(a for a in SUPPORTED_AXES if a in searched)

    @property
    def size(self) -> int:
        return math.prod(len(c) for c in self.choices.values())

    def display(self) -> Dict[str, List[int]]:
        """{axis: choices} as sizes of the axis (heads as total heads when the groups are not searched)."""
        out = dict(self.choices)
        if HEADS in out and GROUPS not in out:
            out[HEADS] = [self.original.get(GROUPS, 1) * h for h in out[HEADS]]  # MLA: its heads are one group
        return out

    def combinations(self) -> Iterator[Dict[str, int]]:
        """Each combination as complete target sizes, in product order (the last axis varies fastest)."""
        for values in itertools.product(*self.choices.values()):
            target = dict(self.original)
            target.update(zip(self.choices, values))
            if GROUPS in target:  # a model with attention layers
                per_group = target[HEADS] if HEADS in self.choices else self.heads_per_group
                target[HEADS] = target[GROUPS] * per_group
            yield target


def build_space(shape: ModelShape, config: SearchConfig) -> SearchSpace:
    """The search space of a model (warns about `axes_to_skip` names the model does not have)."""
    original = shape.sizes()
    missing = [a for a in config.axes_to_skip if a not in original]
    if missing:
        message = f"axes_to_skip: {', '.join(map(repr, missing))} not an axis of this model (axes: {', '.join(original)}); ignored"
        warnings.warn(message, stacklevel=3)
        log(f"warning: {message}")
    sizes = dict(original)
    if HEADS in sizes:
        sizes[HEADS] = shape.heads_per_group  # heads are chosen per group
        if not config.search_query_groups:
            sizes.pop(GROUPS, None)  # absent with MLA (no query groups)
    choices = {}
    for axis in SUPPORTED_AXES:
        if axis not in sizes or axis in config.axes_to_skip:
            continue
        a = AXES[axis]
        fraction = config.max_depth_pruning if a.scope == DEPTH else config.max_width_pruning
        # the registry's step: a SearchConfig divisor, or a model fact (Mamba heads: multiples of the groups)
        divisor = getattr(shape, a.nas_step_of_shape) if a.nas_step_of_shape else getattr(config, a.nas_divisor or "", 1)
        kept = truncate(divisor_choices(sizes[axis], divisor), fraction)
        if len(kept) > 1:
            choices[axis] = kept
    return SearchSpace(original=original, choices=choices, heads_per_group=shape.heads_per_group)


@dataclass
class Candidate:
    """A target the search may choose: `export_config` holds the searched axes (Megatron field names)."""

    export_config: Dict[str, int]
    counts: Counts
    score: Optional[float] = None
    index: int = 0  # position in the search space's product order: ties are broken by it

    def rank_key(self, primary: str) -> Tuple[float, int]:
        """Sort key: closest to the primary budget first (the largest count within it), ties in search-space order."""
        return (-self.counts.get(primary), self.index)

    @property
    def key(self) -> Tuple[Tuple[str, int], ...]:
        return config_key(self.export_config)


def config_key(export_config: Mapping[str, int]) -> Tuple[Tuple[str, int], ...]:
    """A candidate's identity, the same whatever the order of `export_config`'s entries (the NAS cache's key)."""
    return tuple(sorted(export_config.items()))


@dataclass
class Fitting:
    """Candidates within every budget, best first, and what was left out on the way."""

    candidates: List[Candidate]
    invalid: int = 0  # combinations Megatron or the parallel layout cannot build
    filtered: int = 0  # rejected by candidate_filter
    smallest: Dict[str, Tuple[float, Dict[str, int]]] = field(default_factory=dict)  # budget -> (min, sizes)


def search_candidates(space: SearchSpace, inventory: Inventory, budgets: Mapping[str, float], config: SearchConfig,
                      shape: ModelShape, **parallel: int) -> Fitting:  # fmt: skip
    """Every valid combination whose counts are within every budget, sorted by the primary budget's count
    (the first of `budgets`) descending, ties in product order. `smallest` holds, per budget, the smallest
    count any valid combination reaches. When layers differ (dense and MoE layers mixed) a depth-pruned
    combination is counted with its smallest layers kept (a lower bound: which layers survive is known
    only after calibration, when nas.py counts it exactly)."""
    memory = memory_spec(config)
    primary = next(iter(budgets))
    out = Fitting(candidates=[])
    for index, target in enumerate(space.combinations()):
        export_config = {axis: target[axis] for axis in space.axes}
        try:
            validate_export_config(export_config, shape, **parallel)
        except PruneConfigError:
            out.invalid += 1
            continue
        if config.candidate_filter is not None and not config.candidate_filter(dict(target)):
            out.filtered += 1
            continue
        counts = inventory.smallest(target, memory)
        for budget in budgets:
            if budget not in out.smallest or counts.get(budget) < out.smallest[budget][0]:
                out.smallest[budget] = (counts.get(budget), export_config)
        if all(counts.get(b) <= limit for b, limit in budgets.items()):
            out.candidates.append(Candidate(export_config, counts, index=index))
    out.candidates.sort(key=lambda c: c.rank_key(primary))
    return out


def memory_spec(config: SearchConfig) -> MemorySpec:
    return MemorySpec(config.seq_length, config.batch_size, config.dtype_bytes, config.kv_cache_dtype_bytes,
                      config.mamba_state_dtype_bytes)
