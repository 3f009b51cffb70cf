"""What users configure, and the errors they see.

Owns: the model's original sizes (axes are named after `TransformerConfig` fields, see `axes.py`), validation of manual targets and of NAS budgets, and the
NAS search settings (`SearchConfig`). Every check here runs before any calibration and raises
`PruneConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

from megatron_prune.common.budgets import UNITS, is_percent, resolve_budgets
from megatron_prune.minitron.axes import (  # noqa: F401  (SUPPORTED_AXES re-exported)
    AXES, AT_LEAST, EP, EXPERT, EXPERT_MULTIPLE, MULTIPLE, MULTIPLE_OR_DIVISOR, PP, SUPPORTED_AXES, TP, default_kv_channels,
    fits_parallel, parallel_rules,
)
from megatron_prune.errors import PruneConfigError, UnsupportedModelError  # noqa: F401  (re-exported)
from megatron_prune.minitron.slicing.geometry import MLADims

# MLA dims megatron-prune keeps as they are (MLATransformerConfig fields): a target for one is refused by name
MLA_KEPT_DIMS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")

HYBRID_SYMBOLS = "M*-E"  # a hybrid model's layers: Mamba, attention, MLP, MoE


def moe_layer_pattern(config) -> List[bool]:
    """Which of layers 1..L of a GPT model are MoE layers, as Megatron reads `moe_layer_freq` (an int k:
    every k-th layer starting with the first; a list: one 0/1 per layer); all False without experts."""
    if not config.num_moe_experts:
        return [False] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(config.num_layers)]
    return [bool(x) for x in freq]


def hybrid_layer_symbols(pattern: str) -> str:
    """The decoder layers of a hybrid layer pattern, one symbol each: pipeline-stage separators ``|`` are
    removed and a multi-token-prediction suffix (from ``/`` on) is dropped. ``"M*|M-/MM"`` -> ``"M*M-"``."""
    layers = pattern.split("/", 1)[0].replace("|", "")
    bad = sorted(set(layers) - set(HYBRID_SYMBOLS))
    if bad:
        raise PruneConfigError(f"hybrid layer pattern {pattern!r}: unknown symbol(s) {bad}; layers are one of {HYBRID_SYMBOLS!r}")
    return layers


def layer_symbols(config, hybrid_pattern: Optional[str] = None) -> List[str]:
    """What each decoder layer 1..L holds, in hybrid-pattern symbols: a GPT layer is attention and an MLP
    ("*-") or attention and an MoE layer ("*E"); a hybrid model's layer is one of "M", "*", "-", "E"
    (`hybrid_pattern`, by default the config's `hybrid_override_pattern`)."""
    pattern = hybrid_pattern or getattr(config, "hybrid_override_pattern", None)
    if pattern:
        return list(hybrid_layer_symbols(pattern))
    return ["*E" if is_moe else "*-" for is_moe in moe_layer_pattern(config)]


@dataclass(frozen=True)
class ModelShape:
    """The prunable sizes of a model: N query heads in G groups of q = N/G, head dim d; E routed experts of
    FFN size Fm, a shared expert of size Fs; Mamba mixers of nh heads of hd channels in ng groups (state
    ds). Sizes of modules the model lacks are None, and an axis is one of the model's only if some tensor
    follows it (`ffn_hidden_size` needs a dense MLP layer, heads an attention layer). With multi-latent attention
    (`mla`: its fixed dims) there are no query groups: every head has its own K and V, so the N heads are ranked
    as one group (num_query_groups=1 here, and `num_query_groups` is not an axis of the model)."""

    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    num_layers: int
    gated_linear_unit: bool
    dense_mlp: bool = True  # some layer holds a dense MLP
    attention: bool = True  # some layer holds self-attention
    num_moe_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_router_topk: int = 0
    mamba_num_heads: Optional[int] = None
    mamba_head_dim: Optional[int] = None
    mamba_num_groups: int = 0
    mamba_state_dim: int = 0
    mla: Optional[MLADims] = None

    @classmethod
    def from_config(cls, config, hybrid_pattern: Optional[str] = None) -> "ModelShape":
        """The shape of a GPT model, or of a hybrid (Mamba) model with layer pattern `hybrid_pattern` (by
        default the config's `hybrid_override_pattern`, which Megatron-Bridge providers carry)."""
        heads = config.num_attention_heads
        symbols = "".join(layer_symbols(config, hybrid_pattern))
        attention, dense, moe, mamba = "*" in symbols, "-" in symbols, "E" in symbols, "M" in symbols
        experts = config.num_moe_experts if moe else None
        head_dim = config.mamba_head_dim if mamba else None
        mla = MLADims.of(config)
        return cls(
            hidden_size=config.hidden_size,
            ffn_hidden_size=config.ffn_hidden_size,
            num_attention_heads=heads,
            num_query_groups=1 if mla else config.num_query_groups or heads,
            kv_channels=default_kv_channels(config),
            num_layers=config.num_layers,
            gated_linear_unit=bool(config.gated_linear_unit),
            dense_mlp=dense,
            attention=attention,
            num_moe_experts=experts,
            moe_ffn_hidden_size=(config.moe_ffn_hidden_size or config.ffn_hidden_size) if experts else None,
            moe_shared_expert_intermediate_size=config.moe_shared_expert_intermediate_size if experts else None,
            moe_router_topk=config.moe_router_topk if experts else 0,
            mamba_num_heads=config.mamba_num_heads if mamba else None,  # None: model_checks.model_shape reads the mixers
            mamba_head_dim=head_dim,
            mamba_num_groups=config.mamba_num_groups if mamba else 0,
            mamba_state_dim=config.mamba_state_dim if mamba else 0,
            mla=mla,
        )

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def has(self, axis: str) -> bool:
        """Whether `axis` is an axis of this model (some tensor follows it)."""
        if axis == "ffn_hidden_size":
            return self.dense_mlp
        if axis == "num_query_groups":
            return self.attention and self.mla is None
        if axis == "num_attention_heads":
            return self.attention
        return getattr(self, axis, None) is not None

    def sizes(self) -> Dict[str, int]:
        """{axis: size} for the axes of this model, in `SUPPORTED_AXES` order."""
        return {axis: getattr(self, axis) for axis in SUPPORTED_AXES if self.has(axis)}


def validate_export_config(export_config, shape: ModelShape, pp_size: int = 1, tp_size: int = 1,
                           ep_size: int = 1, etp_size: Optional[int] = None) -> Dict[str, int]:  # fmt: skip
    """Check a manual target and return the complete target sizes (untouched axes keep their size).

    Rules: only axes of this model; integers in [1, original]; kept heads a multiple of kept query groups
    with no more heads per group than the model has; Mamba heads a multiple of the Mamba groups; at least
    one layer per pipeline stage; heads, query groups, FFN sizes and Mamba heads divisible by the
    tensor-parallel size (a routed expert's width: by the expert tensor-parallel size `etp_size`, by default
    `tp_size`); routed experts at least `moe_router_topk` and divisible by the expert-parallel size.
    """
    if not isinstance(export_config, Mapping):
        raise PruneConfigError(f"export_config must be a dict of target sizes, got {type(export_config).__name__}")
    original = shape.sizes()
    if not export_config:
        raise PruneConfigError(f"export_config is empty: give a target for at least one of {', '.join(original)}")
    # multi-latent attention has no query groups, and its lora ranks and head dims are kept
    if shape.mla is not None and "num_query_groups" in export_config:
        raise PruneConfigError(
            "export_config['num_query_groups']: this model has multi-latent attention (MLA), which has no query groups "
            "(every head has its own K and V): prune its heads with num_attention_heads alone"
        )
    mla_kept = [k for k in export_config if k in MLA_KEPT_DIMS]
    if shape.mla is not None and mla_kept:
        raise PruneConfigError(
            f"export_config[{mla_kept[0]!r}]: megatron-prune keeps the MLA dims {', '.join(MLA_KEPT_DIMS)} as they are; "
            "prune hidden_size, num_attention_heads, the MLP/experts and num_layers instead"
        )
    unknown = [k for k in export_config if k not in SUPPORTED_AXES]
    if unknown:
        raise PruneConfigError(
            f"export_config: unknown axis {', '.join(map(repr, unknown))}; supported axes are {', '.join(SUPPORTED_AXES)}"
        )
    absent = [k for k in export_config if k not in original]
    if absent:
        raise PruneConfigError(
            f"export_config: {', '.join(map(repr, absent))} is not an axis of this model (no tensor follows it); "
            f"its axes are {', '.join(original)}"
        )
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

    heads, groups = target.get("num_attention_heads", 1), target.get("num_query_groups", 1)
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
    if "mamba_num_heads" in export_config and target["mamba_num_heads"] % shape.mamba_num_groups:
        raise PruneConfigError(
            f"export_config['mamba_num_heads']={target['mamba_num_heads']} is not a multiple of mamba_num_groups="
            f"{shape.mamba_num_groups}: every group keeps the same number of its heads (B and C are per group)"
        )
    if "num_moe_experts" in export_config and target["num_moe_experts"] < shape.moe_router_topk:
        raise PruneConfigError(
            f"export_config['num_moe_experts']={target['num_moe_experts']} is below moe_router_topk="
            f"{shape.moe_router_topk}: every token is routed to {shape.moe_router_topk} experts, so keep at least that many"
        )
    for axis in (a for a in SUPPORTED_AXES if a in export_config):  # the parallel rules of the axis registry
        expert_tp = AXES[axis].scope == EXPERT and etp_size is not None  # routed experts' linears: split over ETP
        for parallel, size in ((TP, etp_size if expert_tp else tp_size), (EP, ep_size), (PP, pp_size)):
            if axis in parallel_rules()[parallel] and not fits_parallel(axis, target[axis], parallel, size, even=False):
                message = _PARALLEL_ERRORS[AXES[axis].rule(parallel)](size)
                if expert_tp:
                    message = message.replace("tensor-parallel size", "expert tensor-parallel size")
                raise PruneConfigError(f"export_config[{axis!r}]={target[axis]} " + message)
    return target


_PARALLEL_ERRORS = {  # rule -> the end of the message for a kept size that breaks it at parallel size n
    MULTIPLE: lambda n: (f"is not divisible by the tensor-parallel size {n}: choose a multiple of {n} (or prune at a "
                         "smaller TP: scores are reusable there)"),
    MULTIPLE_OR_DIVISOR: lambda n: (f"must be a multiple or a divisor of the tensor-parallel size {n} (Megatron's rule "
                                    "for splitting KV groups over TP ranks)"),
    EXPERT_MULTIPLE: lambda n: (f"is not divisible by the expert-parallel size {n}: every expert-parallel rank holds the "
                                f"same number of experts; choose a multiple of {n}"),
    AT_LEAST: lambda n: f"is smaller than the pipeline-parallel size {n}: every stage needs at least one layer",
}  # fmt: skip

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
    num_moe_experts_divisor: int = 8
    moe_ffn_hidden_size_divisor: int = 256
    moe_shared_expert_intermediate_size_divisor: int = 256
    search_query_groups: bool = False  # also search num_query_groups (KV groups; lets MHA models lose heads)
    max_width_pruning: float = 0.4
    max_depth_pruning: float = 0.2
    axes_to_skip: Tuple[str, ...] = ()  # kept at their original size, neither searched nor sorted
    candidate_filter: Optional[Callable[[Dict[str, int]], bool]] = None  # full sizes -> keep?
    top_k: int = 10  # candidates built and scored
    seq_length: int = 4096  # memory_mb: KV cache of `batch_size` sequences of `seq_length` tokens
    batch_size: int = 1
    dtype_bytes: int = 2  # memory_mb: bytes per weight (2: bf16)
    kv_cache_dtype_bytes: Optional[int] = None  # memory_mb: bytes per K/V cache value (None: dtype_bytes)
    mamba_state_dtype_bytes: Optional[int] = None  # memory_mb: bytes per Mamba conv/SSM state value (None: dtype_bytes)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:  # an optional field left unset
                continue
            if f.name.endswith(("_divisor", "dtype_bytes")) or f.name in ("top_k", "seq_length", "batch_size"):
                if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                    raise PruneConfigError(f"search.{f.name}={value!r} must be a positive integer")
            elif f.name.startswith("max_") and (isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1):
                raise PruneConfigError(f"search.{f.name}={value!r} must be a fraction in [0, 1)")
        if isinstance(self.axes_to_skip, str) or not all(isinstance(a, str) for a in self.axes_to_skip):
            raise PruneConfigError(f"search.axes_to_skip={self.axes_to_skip!r} must be a list of axis names")
        object.__setattr__(self, "axes_to_skip", tuple(self.axes_to_skip))
        if self.candidate_filter is not None and not callable(self.candidate_filter):
            raise PruneConfigError("search.candidate_filter must be a callable(sizes: dict) -> bool")

    @classmethod
    def of(cls, search: Union[None, "SearchConfig", Mapping[str, object]]) -> "SearchConfig":
        """A SearchConfig from None (defaults), a SearchConfig, or a dict of its fields."""
        from megatron_prune.common.options import dataclass_of

        return dataclass_of(cls, search, "search")


def validate_budgets(constraints, originals: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
    """Check NAS budgets: a non-empty dict of `BUDGETS` keys to upper bounds, each a positive finite number, a
    count with a unit ("350M") or a percentage of the model's own count in `originals` ("60%"; `budgets.py`
    parses the strings). Returns them as numbers in priority order (the first is the primary budget).
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
        field = f"constraints[{key!r}]"
        if isinstance(value, str) and not is_percent(value) and value.strip()[-1:].upper() not in UNITS:
            raise PruneConfigError(f"{field}={value!r} must be a positive number, a count with a unit ('350M') or a percentage ('60%')")
        if not isinstance(value, str) and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                           or not math.isfinite(value) or value <= 0):  # fmt: skip
            raise PruneConfigError(f"{field}={value!r} must be a positive number")
    return resolve_budgets(constraints, BUDGETS, originals or {})
