"""The axis registry: every fact about a prunable axis, in one record per axis.

An axis is named after the `TransformerConfig` field it sets, so a target is a patch to the model's config.
Everything that needs a fact about an axis reads it here: target validation and the TP/EP/PP rules
(`config.validate_export_config`), the CLI flags (`--target-<axis>`, short names in `--importance`), the
per-layer containers of importance, orders and kept indices (keyed by axis), NAS (divisor, how far it may
prune), the default importance criterion, the Hugging Face config names (export, run card, launch
scripts) and the report's table order. Which tensors follow an axis is the axis *table*'s
(`slicing/table.py`); how kept indices become rows is a geometry kind's (`slicing/geometry.py`).

    AXES["ffn_hidden_size"].alias            -> "ffn"
    AXES["num_query_groups"].tp              -> MULTIPLE_OR_DIVISOR
    axis_named("kv_groups").name             -> "num_query_groups"
    hf_sizes(optional=False)                 -> {"hidden_size": "hidden_size", "intermediate_size": "ffn_hidden_size", ...}

Adding an axis: one `Axis` record below (plus table entries and a geometry kind when it brings new tensors);
see docs/developers.md, "Adding an axis".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

# scope: how many sizes the axis has in a pruned model (always one value per config field; what differs is
# which indices are ranked together)
MODEL, LAYER, EXPERT, DEPTH = "model", "layer", "expert", "depth"
# the parallel dimensions (Megatron's argument names) and their rules for a kept size of n over p ranks
TP, EP, PP = "tensor_model_parallel_size", "expert_model_parallel_size", "pipeline_model_parallel_size"
MULTIPLE = "multiple"  # n % p == 0
MULTIPLE_OR_DIVISOR = "multiple_or_divisor"  # n % p == 0 or p % n == 0 (Megatron replicates KV groups over TP ranks)
EXPERT_MULTIPLE = "expert_multiple"  # n % p == 0: every EP rank holds the same number of experts
AT_LEAST = "at_least"  # n >= p: a pipeline stage per rank (uneven stages allowed); a recipe's even split: n % p == 0


@dataclass(frozen=True)
class Axis:
    """One prunable axis.

    name: the TransformerConfig field; alias (+ `aliases`): short names (CLI, `--importance ffn=...`);
    scope: MODEL (one order for the whole model), LAYER (an order per layer), EXPERT (an order per routed
    expert of each layer), DEPTH (layers dropped); tp/ep/pp: the rule a kept size follows over that parallel
    dimension (None: not split by it); nas_divisor: the `SearchConfig` field holding the NAS step (None: every size; the
    Mamba heads step by the model's `mamba_num_groups`, `nas_step_of_shape`); hf_names: the Hugging Face
    config fields it is written to (hf_optional: only where the HF config has the field); mlm_name: the
    Megatron-LM argument (`args.num_experts`) where it is not the field name; criterion: the default importance
    criterion (`importance/criteria.py`)."""

    name: str
    alias: str
    scope: str
    criterion: str
    aliases: Tuple[str, ...] = ()
    tp: Optional[str] = None
    ep: Optional[str] = None
    pp: Optional[str] = None
    nas_divisor: Optional[str] = None
    nas_step_of_shape: Optional[str] = None
    hf_names: Tuple[str, ...] = ()
    hf_optional: bool = False
    mlm_name: Optional[str] = None  # Megatron-LM's argument name where it differs from the field name
    help: str = ""

    def rule(self, parallel: str) -> Optional[str]:
        """The rule of this axis over a parallel dimension (TP, EP or PP), or None."""
        return {TP: self.tp, EP: self.ep, PP: self.pp}[parallel]

    @property
    def flag(self) -> str:
        """The command-line flag that sets a target: ``--target-ffn-hidden-size``."""
        return "--target-" + self.name.replace("_", "-")


# In the order tables print them. Default criteria chosen by measurement on SmolLM2-135M
# (benchmarks/quality/RESULTS.md, "Importance criteria"): MoE and Mamba axes keep the reference's.
_REGISTRY = (
    Axis("hidden_size", "hidden", MODEL, "minitron", nas_divisor="hidden_size_divisor",
         hf_names=("hidden_size",), help="embedding / residual width H"),
    Axis("ffn_hidden_size", "ffn", LAYER, "minitron", tp=MULTIPLE, nas_divisor="ffn_hidden_size_divisor",
         hf_names=("intermediate_size",), help="dense MLP width F"),
    Axis("num_attention_heads", "heads", LAYER, "output_contribution", tp=MULTIPLE,
         hf_names=("num_attention_heads",), help="query heads N (ranked within each query group)"),
    Axis("num_query_groups", "groups", LAYER, "output_contribution", aliases=("kv_groups",), tp=MULTIPLE_OR_DIVISOR,
         hf_names=("num_key_value_heads",), help="KV groups G"),
    Axis("num_moe_experts", "experts", LAYER, "minitron", ep=EXPERT_MULTIPLE, nas_divisor="num_moe_experts_divisor",
         mlm_name="num_experts",
         hf_names=("num_experts", "num_local_experts", "n_routed_experts"), hf_optional=True,
         help="routed experts E"),
    Axis("moe_ffn_hidden_size", "moe_ffn", EXPERT, "minitron", tp=MULTIPLE, nas_divisor="moe_ffn_hidden_size_divisor",
         hf_names=("moe_intermediate_size",), hf_optional=True, help="routed-expert width Fm"),
    Axis("moe_shared_expert_intermediate_size", "shared_ffn", LAYER, "minitron", tp=MULTIPLE,
         nas_divisor="moe_shared_expert_intermediate_size_divisor", hf_names=("shared_expert_intermediate_size",),
         hf_optional=True, help="shared-expert width Fs"),
    Axis("mamba_num_heads", "mamba_heads", LAYER, "minitron", tp=MULTIPLE, nas_step_of_shape="mamba_num_groups",
         help="Mamba heads nh (the same number kept in every group)"),
    Axis("mamba_head_dim", "mamba_head_dim", LAYER, "minitron", nas_divisor="mamba_head_dim_divisor",
         help="channels per Mamba head hd"),
    Axis("num_layers", "layers", DEPTH, "block_influence", aliases=("depth",), pp=AT_LEAST,
         nas_divisor="num_layers_divisor", hf_names=("num_hidden_layers",), help="decoder layers L"),
)  # fmt: skip

AXES: Dict[str, Axis] = {a.name: a for a in _REGISTRY}
SUPPORTED_AXES: Tuple[str, ...] = tuple(AXES)
# axes ranked inside a decoder layer: the keys of the per-layer importance / orders / kept-index dicts
LAYER_AXES: Tuple[str, ...] = tuple(a.name for a in _REGISTRY if a.scope in (LAYER, EXPERT))
PER_EXPERT_AXES: Tuple[str, ...] = tuple(a.name for a in _REGISTRY if a.scope == EXPERT)
# short name -> axis (aliases of every axis, then the axis names themselves)
ALIASES: Dict[str, str] = {n: a.name for a in _REGISTRY for n in (a.alias, *a.aliases) if n != a.name}


def axis_named(name: str) -> Axis:
    """The axis of a field name or short name; KeyError if none."""
    return AXES[ALIASES.get(name, name)]


def hf_sizes(optional: Optional[bool] = None) -> Dict[str, str]:
    """{Hugging Face config field: axis} (`optional`: only the fields written where the HF config has them, or
    only the others; None: all)."""
    return {hf: a.name for a in _REGISTRY for hf in a.hf_names if optional is None or a.hf_optional == optional}


def mlm_arg_names() -> Dict[str, str]:
    """{axis: Megatron-LM argument name} where the two differ (`num_moe_experts` is `--num-experts`)."""
    return {a.name: a.mlm_name for a in _REGISTRY if a.mlm_name}


def hf_name_of(axis: str) -> Optional[str]:
    """The first (canonical) Hugging Face config field of an axis, or None."""
    names = AXES[axis].hf_names
    return names[0] if names else None


def parallel_rules() -> Dict[str, Tuple[str, ...]]:
    """{parallel dimension (TP, EP, PP): the axes whose kept size it splits}."""
    rules = {parallel: tuple(a.name for a in _REGISTRY if a.rule(parallel)) for parallel in (TP, PP, EP)}
    # checked in Megatron's order (attention sizes first), so an error names the size Megatron would refuse first
    rules[TP] = tuple(sorted(rules[TP], key=lambda axis: axis not in ("num_attention_heads", "num_query_groups")))
    return rules


def fits_parallel(axis: str, size: int, parallel: str, parallel_size: int, even: bool = True) -> bool:
    """Whether a kept `size` of `axis` splits over `parallel_size` ranks of `parallel` (TP, EP or PP).

    even=False: by the axis' rule, what Megatron can build (KV groups may be replicated over TP ranks, pipeline
    stages may differ in depth). even=True: what a suggested recipe assumes, every split even (size % ranks)."""
    rule = AXES[axis].rule(parallel)
    if rule is None:
        return True
    if not even and rule == MULTIPLE_OR_DIVISOR:
        return size % parallel_size == 0 or parallel_size % size == 0
    if not even and rule == AT_LEAST:
        return size >= parallel_size
    return size % parallel_size == 0


def format_sizes(sizes: Mapping[str, int], sep: str = ", ") -> str:
    """``hidden_size=48, num_layers=3``: axis sizes in registry order (other keys after them, as given)."""
    order = sorted(sizes, key=lambda k: list(AXES).index(k) if k in AXES else len(AXES))
    return sep.join(f"{k}={sizes[k]}" for k in order)


def default_kv_channels(config) -> int:
    """The head dim d of a config: `kv_channels`, else hidden_size // num_attention_heads (Megatron's default)."""
    return getattr(config, "kv_channels", None) or config.hidden_size // config.num_attention_heads
