"""Grouped-GEMM routed experts (megatron-core's `TEGroupedMLP` and legacy `GroupedMLP`) as SequentialMLP experts:
a name and layout map both ways, and the prune of a state dict that holds them through the SequentialMLP entries
of the axis table (`table.ROUTED_EXPERTS`); grouped experts have no table entry of their own.

Models with grouped-GEMM experts cannot be calibrated by megatron-prune (`model_checks` refuses
`moe_grouped_gemm=True`): megatron-core 0.16.1 builds neither module without CUDA (`GroupedMLP.__init__` asserts the
`grouped_gemm` package, a CUDA extension; `TEGroupedMLP` is built from Transformer Engine's `GroupedLinear`). Build
the model with `moe_grouped_gemm=False`: the weights are the same (megatron-core writes the grouped modules'
distributed checkpoints under SequentialMLP's keys, documented there as interchangeable). This module serves plain
state dicts: `to_sequential` makes a grouped one loadable into such a model, `to_grouped` writes a (pruned) one back,
`sliced_grouped_tensors` prunes grouped weights with a plan directly.

Layouts of one MoE layer's E experts (local to the rank) of FFN size F (x2 when gated: [gate; up]), hidden size H,
in megatron-core 0.16.1:
  SequentialMLP  mlp.experts.local_experts.{e}.linear_fc1.weight [F(x2), H], .bias [F(x2)]
                 mlp.experts.local_experts.{e}.linear_fc2.weight [H, F],     .bias [H]
  TEGroupedMLP   mlp.experts.linear_fc1.weight{e} [F(x2), H], .bias{e};  mlp.experts.linear_fc2.weight{e} [H, F], .bias{e}
                 (Transformer Engine's GroupedLinear holds one [out, in] matrix per GEMM, and
                 `TEGroupedLinear._sharded_state_dict_grouped` in `megatron/core/extensions/transformer_engine.py`
                 checkpoints weight{e} as expert e's tensor unchanged: TP axis 0 for fc1, 1 for fc2; the output's
                 [gate; up] halves are split by `TEGroupedMLP.forward`'s `torch.chunk(x, 2, dim=-1)`)
  GroupedMLP     mlp.experts.weight1: a [H, E*F(x2)] parameter whose memory is [E, H, F(x2)]: the forward views it
                 so and multiplies tokens by w1[e] = expert e's fc1 weight transposed (gate columns first, then up);
                 mlp.experts.weight2 [E*F, H], memory [E, F, H]: w2[e] = expert e's fc2 weight transposed; no biases
                 (`megatron/core/transformer/moe/experts.py`: `GroupedMLP.forward`, and `sharded_state_dict`, whose
                 conversion to SequentialMLP tensors the tests compare with this module's)
Extra states of the expert linears (None for megatron-core's local linears, FP8 metadata for Transformer Engine's)
hold no weights: both conversions drop them.
"""

from __future__ import annotations

import re
from typing import Dict, Mapping, Optional

import torch

from megatron_prune.errors import PruneConfigError
from megatron_prune.minitron.config import ModelShape
from megatron_prune.minitron.slicing.plan import PrunePlan
from megatron_prune.minitron.slicing.state_dict import sliced_tensors

TE_GROUPED, LEGACY_GROUPED = "TEGroupedMLP", "GroupedMLP"
LAYOUTS = (TE_GROUPED, LEGACY_GROUPED)

_PREFIX = r"(?P<prefix>(?:.*\.)?mlp\.experts\.)"
_SEQUENTIAL = re.compile(
    _PREFIX + r"local_experts\.(?P<expert>\d+)\.(?P<linear>linear_fc[12])\.(?P<param>weight|bias|_extra_state)"
)
_TE = re.compile(_PREFIX + r"(?P<linear>linear_fc[12])\.(?P<param>weight|bias)(?P<expert>\d+)")
_TE_EXTRA = re.compile(_PREFIX + r"linear_fc[12]\._extra_state\d*")
_LEGACY = re.compile(_PREFIX + r"weight(?P<which>[12])")


def grouped_layout(state: Mapping[str, object]) -> Optional[str]:
    """`TE_GROUPED` or `LEGACY_GROUPED` for a state dict holding grouped-GEMM expert tensors, None if it holds none."""
    found = {TE_GROUPED if _TE.fullmatch(n) else LEGACY_GROUPED for n in state if _TE.fullmatch(n) or _LEGACY.fullmatch(n)}
    if len(found) > 1:
        raise PruneConfigError("the state dict mixes TEGroupedMLP (linear_fc1.weight{e}) and GroupedMLP (weight1) experts")
    return found.pop() if found else None


def to_sequential(state: Mapping[str, object], num_experts: Optional[int] = None) -> Dict[str, object]:
    """A state dict with grouped-GEMM experts -> the same weights under SequentialMLP names (other entries unchanged,
    in order). `num_experts`: the experts each GroupedMLP `weight1`/`weight2` holds (this rank's local experts);
    needed for that layout only."""
    out: Dict[str, object] = {}
    legacy: Dict[str, Dict[str, list]] = {}  # prefix -> GroupedMLP's weights split per expert
    for name, value in state.items():
        if _TE_EXTRA.fullmatch(name):
            continue
        m = _TE.fullmatch(name) or _LEGACY.fullmatch(name)
        if m is None:
            out[name] = value
            continue
        if "which" not in m.groupdict():  # TEGroupedMLP: one matrix per expert, renamed
            _check_dims(name, value, 2 if m["param"] == "weight" else 1)
            out[f"{m['prefix']}local_experts.{m['expert']}.{m['linear']}.{m['param']}"] = value
            continue
        if m["prefix"] not in legacy:
            legacy[m["prefix"]] = _legacy_pair(state, m["prefix"], num_experts)
        weights = legacy[m["prefix"]]
        linear = "linear_fc1" if m["which"] == "1" else "linear_fc2"
        for e, w in enumerate(weights[linear]):
            out[f"{m['prefix']}local_experts.{e}.{linear}.weight"] = w
    return out


def to_grouped(state: Mapping[str, object], layout: str) -> Dict[str, object]:
    """Inverse of `to_sequential`: SequentialMLP expert tensors -> `layout` (`TE_GROUPED` or `LEGACY_GROUPED`), written
    where each layer's first expert tensor was; other entries unchanged, in order. Experts must be numbered 0..E-1."""
    if layout not in LAYOUTS:
        raise PruneConfigError(f"layout={layout!r}: choose one of {LAYOUTS}")
    groups: Dict[str, Dict[tuple, Dict[int, torch.Tensor]]] = {}  # prefix -> (linear, param) -> {expert: tensor}
    out: Dict[str, object] = {}
    for name, value in state.items():
        m = _SEQUENTIAL.fullmatch(name)
        if m is None:
            out[name] = value
            continue
        if m["prefix"] not in groups:
            groups[m["prefix"]] = {}
            out[m["prefix"]] = None  # placeholder: the layer's grouped tensors go here
        if m["param"] == "_extra_state":
            continue
        if layout == LEGACY_GROUPED and m["param"] == "bias":
            raise PruneConfigError(f"'{name}': GroupedMLP experts have no biases; write the TEGroupedMLP layout instead")
        groups[m["prefix"]].setdefault((m["linear"], m["param"]), {})[int(m["expert"])] = value
    written: Dict[str, object] = {}
    for name, value in out.items():
        if name not in groups:
            written[name] = value
            continue
        for (linear, param), experts in sorted(groups[name].items()):
            where = f"{name}local_experts.*.{linear}.{param}"
            if sorted(experts) != list(range(len(experts))):
                raise PruneConfigError(f"'{where}': experts {sorted(experts)} are not numbered 0..{len(experts) - 1}")
            ordered = [experts[e] for e in range(len(experts))]
            if layout == TE_GROUPED:
                written.update({f"{name}{linear}.{param}{e}": t for e, t in enumerate(ordered)})
            else:
                written[f"{name}weight{linear[-1]}"] = _stack_legacy(where, ordered, linear)
    return written


def sliced_grouped_tensors(
    state: Mapping[str, object], layer_numbers: Mapping[int, int], plan: PrunePlan, shape: ModelShape
) -> Dict[str, object]:
    """Prune one process's full state dict (TP = EP = 1) whose MoE layers hold grouped-GEMM experts: mapped to
    SequentialMLP names, sliced by `state_dict.sliced_tensors` through the SequentialMLP table entries (kept experts
    renumbered in importance order, each expert's `moe_ffn_hidden_size` channels, `hidden_size`) and mapped back to
    the same layout. The result fits the grouped model a stock megatron-core builds from the pruned config."""
    layout = grouped_layout(state)
    pruned = dict(sliced_tensors(to_sequential(state, shape.num_moe_experts), layer_numbers, plan, shape))
    return pruned if layout is None else to_grouped(pruned, layout)


def _check_dims(name: str, t, dims: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != dims:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise PruneConfigError(f"grouped-GEMM expert tensor '{name}' has shape {got}: expected a {dims}-D tensor")


def _legacy_pair(state: Mapping[str, object], prefix: str, num_experts: Optional[int]) -> Dict[str, list]:
    """GroupedMLP's weight1 [H, E*F(x2)] (memory [E, H, F(x2)]) and weight2 [E*F, H] -> each expert's fc1 weight
    [F(x2), H] and fc2 weight [H, F], checked against each other."""
    w1, w2 = f"{prefix}weight1", f"{prefix}weight2"
    if w1 not in state or w2 not in state:
        raise PruneConfigError(f"GroupedMLP experts at '{prefix}' need both '{w1}' and '{w2}'")
    if not num_experts:
        raise PruneConfigError(f"'{w1}' (GroupedMLP experts): pass num_experts=, the number of experts it holds")
    _check_dims(w1, state[w1], 2)
    _check_dims(w2, state[w2], 2)
    (H, cols), (rows, H2), E = state[w1].shape, state[w2].shape, num_experts
    if rows % E:
        raise PruneConfigError(f"'{w2}' has shape {(rows, H2)}: its {rows} rows do not divide into {E} experts [E*F, H]")
    F = rows // E
    if H2 != H or cols not in (E * F, 2 * E * F):
        raise PruneConfigError(
            f"'{w1}' has shape {(H, cols)}: expected [H, E*F] or [H, E*2F] (gated) = {(H2, E * F)} or {(H2, 2 * E * F)} "
            f"for {E} experts of FFN size {F} ('{w2}' is {(rows, H2)})"
        )
    return {
        "linear_fc1": [w.contiguous() for w in state[w1].reshape(E, H, cols // E).transpose(1, 2)],  # [E, F(x2), H]
        "linear_fc2": [w.contiguous() for w in state[w2].reshape(E, F, H).transpose(1, 2)],  # [E, H, F]
    }


def _stack_legacy(where: str, weights: list, linear: str) -> torch.Tensor:
    """Each expert's fc1 [F(x2), H] -> weight1 [H, E*F(x2)] (memory [E, H, F(x2)]); fc2 [H, F] -> weight2 [E*F, H]."""
    for e, w in enumerate(weights):
        _check_dims(where.replace("*", str(e)), w, 2)
        if w.shape != weights[0].shape:
            raise PruneConfigError(f"'{where.replace('*', str(e))}' has shape {tuple(w.shape)}, expert 0 "
                                   f"{tuple(weights[0].shape)}: GroupedMLP experts must all have one shape")  # fmt: skip
    stacked = torch.stack(weights).transpose(1, 2).contiguous()  # fc1: [E, H, F(x2)]; fc2: [E, F, H]
    E, a, b = stacked.shape
    return stacked.reshape(a, E * b) if linear == "linear_fc1" else stacked.reshape(E * a, b)
