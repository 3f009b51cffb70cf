"""The GradNAS search space of a Hugging Face model: per layer, a head group and an FFN group, their width
choices, the tensor slices each owns, and the analytic parameter / FLOPs count.

    space = build_space(model, dummy_input, rules, prune_kv_groups=False, uniform=False)
    space.searchable        -> {"layers.0.heads": [1, 2, 3, 4], "layers.0.ffn": [32, 64, ..., 512], ...}
    space.count(widths)     -> {"params": ..., "flops": ...}   # equal to `count(sliced model, dummy_input)`
    print(space.table())

Groups (unit, tensors):
- `layers.{i}.heads`: one query head (`head_dim` features) of Q/K/V's output and the output projection's input;
  with grouped-query attention only Q and the output projection, and every KV group keeps the same number of
  query heads (widths are multiples of the KV head count);
- `layers.{i}.kv_groups` (instead, with `prune_kv_groups=True`): one KV head with all its query heads;
- `layers.{i}.ffn`: one MLP channel (the rows of the up/gate projections, the column of the down projection).

With `uniform=True` every layer's FFN (and, where the HF config can only state one head count, heads) is one
search variable, so the result keeps the layers homogeneous (`variables` maps each to its groups).

Counting convention: params = every parameter (tied ones once); FLOPs = 2 x multiply-accumulates of every
`Linear`/`Conv1D` at the positions it ran on for `dummy_input`, plus the attention products QK^T and AV
(2 x 2 x B x S^2 x heads x head_dim per layer). Embedding lookups, norms, softmax and activations are free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from megatron_prune.common.choices import ChoiceSpace, Rules
from megatron_prune.common.cost import CostModel, Term
from megatron_prune.common.extent import Extent, Segment
from megatron_prune.errors import PruneConfigError
from megatron_prune.fastnas.trace import run_model
from megatron_prune.gradnas.families import Family, LayerSizes, detect, in_features, is_conv1d, layer_sizes, out_dim
from megatron_prune.common.log import format_table

TensorKey = Tuple[str, str]
DEFAULT_RULES = {"*.heads": {"ratios": None, "divisor": 1}, "*.kv_groups": {"ratios": None, "divisor": 1}}


@dataclass(frozen=True)
class Group:
    layer: int
    kind: str      # "heads", "kv_groups" or "ffn"
    units: int
    blocks: int    # units are kept in `blocks` equal blocks (query heads per KV group); 1 otherwise
    members: int   # mask-site units per group unit (query heads per KV group for "kv_groups"); 1 otherwise


@dataclass(repr=False)
class SearchSpace(ChoiceSpace):
    family: Family
    layers: List[LayerSizes]
    groups: Dict[str, Group]
    choices: Dict[str, List[int]]                     # per group, ascending; one choice when fixed
    fixed: Dict[str, str]                             # group -> why it is not searched
    variables: Dict[str, Tuple[str, ...]]             # search variable -> the groups it sets (uniform ties them)
    tensors: Dict[TensorKey, Dict[int, Extent]]
    cost: CostModel
    sites: Dict[str, Tuple[str, int]]                 # mask site ("layers.3.heads") -> (module it gates, units)

    @property
    def searchable(self) -> Dict[str, List[int]]:
        """Search variable -> its width choices (shared by every group it ties)."""
        return {v: self.choices[gs[0]] for v, gs in self.variables.items()}

    def expand(self, values: Mapping[str, int]) -> Dict[str, int]:
        """Group widths from search-variable widths (groups not set keep their full width)."""
        return {**self.full, **{g: w for v, w in values.items() for g in self.variables[v]}}

    def count(self, widths: Optional[Mapping[str, int]] = None) -> Dict[str, float]:
        return self.cost.count(widths or {})

    def table(self) -> str:
        """Groups, choices, their share of the model and the space's min/max cost, as plain text."""
        shares, total = self.cost.per_group(list(self.groups)), self.count()
        rows = []
        for g, grp in self.groups.items():
            c = self.choices[g]
            shown = c if len(c) <= 8 else c[:3] + ["..."] + c[-3:]
            status = f"FIXED: {self.fixed[g]}" if g in self.fixed else f"{len(c)} widths"
            rows.append((g, grp.units, "[" + ", ".join(map(str, shown)) + "]",
                         f"{100 * shares[g]['params'] / total['params']:.1f}%", f"{100 * shares[g]['flops'] / total['flops']:.1f}%", status))
        lo = self.count(self.smallest)
        size = 1.0
        for c in self.searchable.values():
            size *= len(c)
        return "\n\n".join([
            format_table(["group", "units", "choices", "params", "FLOPs", "status"], rows),
            format_table(["", "smallest subnet", "original", "smallest / original"],
                         [(m, f"{lo[m]:,.0f}", f"{total[m]:,.0f}", f"{100 * lo[m] / total[m]:.1f}%") for m in ("flops", "params")]),
            f"{self.family.name}: {len(self.layers)} layers, {len(self.variables)} search variables, {size:.3g} subnets; "
            "hidden size, embeddings, norms and output heads are not pruned"])


# ------------------------------------------------------------------------------------------------ counting
@torch.no_grad()
def measure(model: nn.Module, dummy_input, family: Family, layers: List[LayerSizes]):
    """One forward on `dummy_input` (eval mode restored afterwards): the positions each Linear/Conv1D ran on
    ({module: rows}) and, per layer, B x S_q x S_k of its attention ({layer index: positions})."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}
    attention_sites = {layer.name(family.heads_in): layer.index for layer in layers}
    rows: Dict[str, int] = {}
    attention: Dict[int, int] = {}
    handles = []

    def hook(name):
        def fn(module, args):
            x = args[0]
            rows[name] = rows.get(name, 0) + x.numel() // in_features(module)
            if name in attention_sites:  # [B, S, heads * head_dim]: self-attention over S positions
                seq = x.shape[-2] if x.dim() >= 3 else 1
                attention[attention_sites[name]] = attention.get(attention_sites[name], 0) + x.numel() // in_features(module) * seq
        return fn

    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
        run_model(model, dummy_input)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return rows, attention


def count(model: nn.Module, dummy_input) -> Dict[str, float]:
    """Params and FLOPs of a (pruned or original) supported HF model under gradnas's convention, measured on the
    model itself: its parameters, and its layers' actual shapes on a forward of `dummy_input`."""
    family = detect(model)
    layers = layer_sizes(model, family)
    rows, attention = measure(model, dummy_input, family, layers)
    flops = sum(2.0 * rows[n] * m.weight.numel() for n, m in model.named_modules() if n in rows)
    flops += sum(4.0 * attention[l.index] * in_features(model.get_submodule(l.name(family.heads_in))) for l in layers)
    return {"params": float(sum(p.numel() for p in model.parameters())), "flops": flops}


# ------------------------------------------------------------------------------------------------ building
def _slices(module: nn.Module, extent: Extent, output: bool) -> Dict[str, Dict[int, Extent]]:
    """A projection's tensors pruned on its output features (`output`) or its input features."""
    dim = out_dim(module) if output else 1 - out_dim(module)
    out = {"weight": {dim: extent}}
    if output and getattr(module, "bias", None) is not None:
        out["bias"] = {0: extent}
    return out


def _layer_groups(model: nn.Module, family: Family, layer: LayerSizes, kv_mode: bool):
    """This layer's groups and the (module, extent, output?) slices each owns."""
    s, i = layer.sizes, layer.index
    rep = s.heads // s.kv_heads
    kv_mode = kv_mode or (bool(family.kv_out) and rep == 1)  # one query head per K/V head: a head is a KV group
    ffn = f"layers.{i}.ffn"
    groups = {ffn: Group(i, "ffn", s.ffn, 1, 1)}
    owned = [(r, Extent((Segment(ffn, s.ffn),)), True) for r in family.ffn_out] + [(family.ffn_in, Extent((Segment(ffn, s.ffn),)), False)]
    if kv_mode and family.kv_out:
        g = f"layers.{i}.kv_groups"
        groups[g] = Group(i, "kv_groups", s.kv_heads, 1, rep)
        q = Extent((Segment(g, s.kv_heads, rep * s.head_dim),))
        owned += [(r, Extent((Segment(g, s.kv_heads, s.head_dim),)), True) for r in family.kv_out]
    else:
        g = f"layers.{i}.heads"
        groups[g] = Group(i, "heads", s.heads, s.kv_heads if family.kv_out else 1, 1)
        q = Extent((Segment(g, s.heads, s.head_dim),))
    owned += [(r, Extent(q.segments * copies), True) for r, copies in family.heads_out] + [(family.heads_in, q, False)]
    tensors = {}
    for rel, extent, output in owned:
        name = layer.name(rel)
        for attr, dims in _slices(model.get_submodule(name), extent, output).items():
            tensors[(name, attr)] = dims
    return groups, tensors, q


def build_space(model: nn.Module, dummy_input, rules: Rules = Rules(), prune_kv_groups: bool = False,
                uniform: bool = False) -> SearchSpace:
    """The search space of `model` (not modified; one forward on `dummy_input`)."""
    family = detect(model)
    layers = layer_sizes(model, family)
    rows, attention = measure(model, dummy_input, family, layers)
    groups, tensors, terms, sites = {}, {}, [], {}
    for layer in layers:
        g, t, q = _layer_groups(model, family, layer, prune_kv_groups)
        groups.update(g)
        tensors.update(t)
        sites[f"layers.{layer.index}.heads"] = (layer.name(family.heads_in), layer.sizes.heads)
        sites[f"layers.{layer.index}.ffn"] = (layer.name(family.ffn_in), layer.sizes.ffn)
        terms.append(Term(f"{layer.prefix}[attention QK^T, AV]", (q.full_length,), {0: q}, flops=4.0 * attention.get(layer.index, 0)))
    for name, p in model.named_parameters():
        module, attr = name.rsplit(".", 1) if "." in name else ("", name)
        terms.append(Term(name, tuple(p.shape), tensors.get((module, attr), {}), params=True))
    for name, m in model.named_modules():
        if name in rows:
            terms.append(Term(f"{name}.weight[matmul]", tuple(m.weight.shape), tensors.get((name, "weight"), {}), flops=2.0 * rows[name]))
    choices, fixed = _choices(groups, Rules(Rules.of(DEFAULT_RULES).entries + rules.entries), family, uniform)
    variables = _variables(groups, choices, fixed, family, uniform)
    cost = CostModel(terms, {g: grp.units for g, grp in groups.items()})
    return SearchSpace(family, layers, groups, choices, fixed, variables, tensors, cost, sites)


def _choices(groups: Mapping[str, Group], rules: Rules, family: Family, uniform: bool):
    choices, fixed = {}, {}
    for g, grp in groups.items():
        rule = rules.for_module(g)
        if rule is None:
            choices[g], fixed[g] = [grp.units], "the rules freeze it"
            continue
        choices[g] = rule.choices(grp.units, grp.blocks)
        if uniform and grp.kind == "heads" and not family.config_heads and not family.kv_out:
            choices[g], fixed[g] = [grp.units], (f"uniform=True: a {family.name} config cannot state a pruned head "
                                                 "count (uniform=False prunes heads; save with gradnas.save)")
        elif len(choices[g]) < 2:
            fixed[g] = f"no smaller width fits its rules ({grp.units} units, multiples of {grp.blocks})"
    return choices, fixed


def _variables(groups: Mapping[str, Group], choices: Mapping[str, List[int]], fixed: Mapping[str, str], family: Family,
               uniform: bool) -> Dict[str, Tuple[str, ...]]:
    """Each searchable group is its own variable; `uniform` ties the FFN groups (and the head / KV-group groups
    where the config states one head count for every layer) across layers, if they have the same choices."""
    variables: Dict[str, Tuple[str, ...]] = {}
    for g, grp in groups.items():
        if g in fixed:
            continue
        tie = uniform and (grp.kind != "heads" or family.config_heads == "num_attention_heads")
        key = grp.kind if tie else g
        variables[key] = variables.get(key, ()) + (g,)
    for key, members in variables.items():
        if len({tuple(choices[g]) for g in members}) > 1:
            raise PruneConfigError(f"uniform=True: the {key} groups of this model have different widths or rules "
                                   f"({', '.join(f'{g}: {choices[g][-1]}' for g in members[:4])}, ...); use uniform=False")
    return variables
