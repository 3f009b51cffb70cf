"""What users configure, and the errors they see.

Owns: the prunable axes (named after `TransformerConfig` fields, so an export config is simply a patch to
the model's config), the model's original sizes, and validation of targets. Every check here runs before
any calibration and raises `PruneConfigError` naming the field.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Dict, Mapping

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
