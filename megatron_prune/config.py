"""What users configure, and the errors they see.

Owns: the prunable axes (named after `TransformerConfig` fields, so an export config is simply a patch to
the model's config), the model's original sizes, validation of manual targets and of NAS budgets, and the
NAS search settings (`SearchConfig`). Every check here runs before any calibration and raises
`PruneConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

# Axes megatron-prune can prune for dense GPT models, in the order tables print them.
SUPPORTED_AXES = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "num_layers")


class PruneConfigError(ValueError):
    """Bad user input. The message names the field and says how to fix it."""


class UnsupportedModelError(ValueError):
    """The model holds a module the axis table does not describe (the message names its type)."""


@dataclass(frozen=True)
class ModelShape:
    """The prunable sizes of a dense GPT model (N query heads in G groups of q = N/G, head dim d)."""

    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    num_layers: int
    gated_linear_unit: bool

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        heads = config.num_attention_heads
        return cls(
            hidden_size=config.hidden_size,
            ffn_hidden_size=config.ffn_hidden_size,
            num_attention_heads=heads,
            num_query_groups=config.num_query_groups or heads,
            kv_channels=config.kv_channels or config.hidden_size // heads,
            num_layers=config.num_layers,
            gated_linear_unit=bool(config.gated_linear_unit),
        )

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def sizes(self) -> Dict[str, int]:
        return {axis: getattr(self, axis) for axis in SUPPORTED_AXES}


def validate_export_config(export_config, shape: ModelShape, pp_size: int = 1, tp_size: int = 1) -> Dict[str, int]:
    """Check a manual target and return the complete target sizes (untouched axes keep their size).

    Rules: only known axes; integers in [1, original]; kept heads a multiple of kept query groups with
    no more heads per group than the model has; at least one layer per pipeline stage; heads, query
    groups and FFN size divisible by the tensor-parallel size.
    """
    if not isinstance(export_config, Mapping):
        raise PruneConfigError(f"export_config must be a dict of target sizes, got {type(export_config).__name__}")
    if not export_config:
        raise PruneConfigError(f"export_config is empty: give a target for at least one of {', '.join(SUPPORTED_AXES)}")
    unknown = [k for k in export_config if k not in SUPPORTED_AXES]
    if unknown:
        raise PruneConfigError(
            f"export_config: unknown axis {', '.join(map(repr, unknown))}; supported axes are {', '.join(SUPPORTED_AXES)}"
        )
    original = shape.sizes()
    target = dict(original)
    for axis, value in export_config.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise PruneConfigError(f"export_config[{axis!r}] must be an integer, got {value!r} ({type(value).__name__})")
        value = int(value)
        if value < 1:
            raise PruneConfigError(f"export_config[{axis!r}]={value} must be at least 1")
        if value > original[axis]:
            raise PruneConfigError(
                f"export_config[{axis!r}]={value} is larger than the model's {axis}={original[axis]}: pruning only shrinks"
            )
        target[axis] = value

    heads, groups = target["num_attention_heads"], target["num_query_groups"]
    if heads % groups:
        raise PruneConfigError(
            f"export_config['num_attention_heads']={heads} is not a multiple of num_query_groups={groups} "
            f"(the query groups kept): choose a multiple of {groups}"
        )
    if heads // groups > shape.heads_per_group:
        raise PruneConfigError(
            f"export_config['num_attention_heads']={heads} with num_query_groups={groups} needs {heads // groups} "
            f"heads per group, but each group of this model has {shape.heads_per_group}: keep at most "
            f"{groups * shape.heads_per_group} heads, or keep more query groups"
        )
    for axis in ("num_attention_heads", "ffn_hidden_size"):
        if axis in export_config and target[axis] % tp_size:
            raise PruneConfigError(
                f"export_config[{axis!r}]={target[axis]} is not divisible by the tensor-parallel size {tp_size}: "
                f"choose a multiple of {tp_size} (or prune at a smaller TP: scores are reusable there)"
            )
    if "num_query_groups" in export_config and groups % tp_size and tp_size % groups:
        raise PruneConfigError(
            f"export_config['num_query_groups']={groups} must be a multiple or a divisor of the tensor-parallel "
            f"size {tp_size} (Megatron's rule for splitting KV groups over TP ranks)"
        )
    if target["num_layers"] < pp_size:
        raise PruneConfigError(
            f"export_config['num_layers']={target['num_layers']} is smaller than the pipeline-parallel size "
            f"{pp_size}: every stage needs at least one layer"
        )
    return target


# NAS budgets, in priority order: the first one given is the primary budget candidates are ranked by.
BUDGETS = ("active_params", "params", "memory_mb")


@dataclass(frozen=True)
class SearchConfig:
    """NAS settings. Defaults follow the reference (ModelOpt `mcore_minitron`).

    An axis `A` with a field `A_divisor` d has the choices {d, 2d, ..., floor(size/d)*d} plus its size
    (other axes: every size); heads are chosen per query group. Of an axis' n sorted choices the largest
    survive, `choices[int((1 - f) * n):]` (about a fraction f of them, the largest always), f =
    `max_depth_pruning` for `num_layers` and `max_width_pruning` otherwise. Axes left with one choice are
    not searched.
    """

    hidden_size_divisor: int = 256
    ffn_hidden_size_divisor: int = 512
    num_layers_divisor: int = 2
    mamba_head_dim_divisor: int = 8  # read once Mamba axes exist
    num_moe_experts_divisor: int = 8  # read once MoE axes exist
    search_query_groups: bool = False  # also search num_query_groups (KV groups; lets MHA models lose heads)
    max_width_pruning: float = 0.4
    max_depth_pruning: float = 0.2
    axes_to_skip: Tuple[str, ...] = ()  # kept at their original size, neither searched nor sorted
    candidate_filter: Optional[Callable[[Dict[str, int]], bool]] = None  # full sizes -> keep?
    top_k: int = 10  # candidates built and scored
    seq_length: int = 4096  # memory_mb: KV cache of `batch_size` sequences of `seq_length` tokens
    batch_size: int = 1
    dtype_bytes: int = 2  # memory_mb: bytes per weight (2: bf16)
    kv_cache_dtype_bytes: Optional[int] = None  # None: dtype_bytes

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_divisor") or f.name in ("top_k", "seq_length", "batch_size", "dtype_bytes"):
                _positive_int(f"search.{f.name}", value)
            elif f.name.startswith("max_") and (isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1):
                raise PruneConfigError(f"search.{f.name}={value!r} must be a fraction in [0, 1)")
        if self.kv_cache_dtype_bytes is not None:
            _positive_int("search.kv_cache_dtype_bytes", self.kv_cache_dtype_bytes)
        if isinstance(self.axes_to_skip, str) or not all(isinstance(a, str) for a in self.axes_to_skip):
            raise PruneConfigError(f"search.axes_to_skip={self.axes_to_skip!r} must be a list of axis names")
        object.__setattr__(self, "axes_to_skip", tuple(self.axes_to_skip))
        if self.candidate_filter is not None and not callable(self.candidate_filter):
            raise PruneConfigError("search.candidate_filter must be a callable(sizes: dict) -> bool")

    @classmethod
    def of(cls, search: Union[None, "SearchConfig", Mapping[str, object]]) -> "SearchConfig":
        """A SearchConfig from None (defaults), a SearchConfig, or a dict of its fields."""
        if search is None or isinstance(search, cls):
            return search or cls()
        if not isinstance(search, Mapping):
            raise PruneConfigError(f"search must be a SearchConfig or a dict, got {type(search).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(search) - known)
        if unknown:
            raise PruneConfigError(f"search: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**search)


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise PruneConfigError(f"{name}={value!r} must be a positive integer")


def validate_budgets(constraints) -> Dict[str, float]:
    """Check NAS budgets: a non-empty dict of `BUDGETS` keys to positive finite numbers (upper bounds).

    Returns them in priority order (the first is the primary budget).
    """
    if not isinstance(constraints, Mapping):
        raise PruneConfigError(f"constraints must be a dict of budgets, got {type(constraints).__name__}")
    if "export_config" in constraints:
        raise PruneConfigError("constraints: export_config cannot be combined with budgets: pass export_config= alone")
    if not constraints:
        raise PruneConfigError(f"constraints is empty: give at least one budget of {', '.join(BUDGETS)}")
    unknown = [k for k in constraints if k not in BUDGETS]
    if unknown:
        raise PruneConfigError(f"constraints: unknown budget {', '.join(map(repr, unknown))}; budgets are {', '.join(BUDGETS)}")
    for key, value in constraints.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
            raise PruneConfigError(f"constraints[{key!r}]={value!r} must be a positive number")
    return {k: float(constraints[k]) for k in BUDGETS if k in constraints}
