"""Channel groups of a traced model: which tensor dims must keep the same channels, and which cannot change.

Every value in the fx graph carries, for each dim that holds prunable channels, an `Extent` (segments of
channel groups). A Conv/Linear output starts a new group; norms, activations, pooling and depthwise convs pass
it on; elementwise ops (residual adds, SE gates) merge the groups of their operands; `cat` lays segments end
to end; flatten/view multiply a segment's `repeat` by the flattened spatial size; permute/transpose move it.
Each model tensor that a group runs through (producer rows, consumer columns, norm parameters and buffers)
records the Extent of that dim, so slicing, importance and counting all read the same map.

A group is *fixed* (never pruned) when it reaches something whose channels cannot change: the model output,
an op fastnas does not know, a grouped convolution, a leaf module, indexing, a reduction over channels, or a
tensor with fixed channels in an elementwise op. Every fixed group carries the reason, naming the node.

    analysis = analyze(traced)
    analysis.groups["layer1.0.conv1"]  -> Group(units=64, block=1, fixed=None, modules=[...])
    analysis.tensors[("layer1.0.conv2", "weight")] -> {1: Extent(...)}   # dim 1 follows group layer1.0.conv1
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from megatron_prune.common.cost import CostModel, Term
from megatron_prune.common.extent import Extent, Segment
from megatron_prune.fastnas.trace import Traced, shape_of

Dims = Dict[int, Extent]  # dim -> extent, for the dims of a value that hold prunable channels
TensorKey = Tuple[str, str]  # (qualified module name, tensor attribute), e.g. ("layer1.0.bn1", "running_mean")

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                       nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
                       nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
SPATIAL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                   nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                   nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
                   nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)
KNOWN_LEAVES = (CONVS + CONV_TRANSPOSES + BATCH_NORMS + ELEMENTWISE_MODULES + SPATIAL_MODULES
                + (nn.Linear, nn.GroupNorm, nn.LayerNorm, nn.PReLU, nn.Flatten, nn.Softmax))

_UNARY_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.sigmoid, torch.sigmoid,
                    F.tanh, torch.tanh, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish, F.softplus,
                    F.hardtanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.clamp, torch.clip,
                    torch.abs, torch.neg, torch.exp, operator.neg}
_UNARY_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clamp_min",
                  "contiguous", "clone", "detach", "float", "half", "bfloat16", "double", "to", "type_as", "abs",
                  "neg", "exp", "hardtanh_"}
_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
                     operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
                     torch.maximum, torch.minimum}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_SPATIAL_FUNCTIONS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.avg_pool1d,
                      F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
                      F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.pad}
_REDUCE_FUNCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin"}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_NON_TENSOR_METHODS = {"size", "dim", "numel", "shape", "dtype", "device", "ndimension"}


@dataclass
class Group:
    units: int
    block: int = 1                      # widths must be multiples of this (GroupNorm: channels per group)
    fixed: Optional[str] = None         # why it cannot be pruned, naming the node; None if prunable
    modules: List[str] = field(default_factory=list)  # modules holding one of its tensors, in graph order


@dataclass
class Analysis:
    groups: Dict[str, Group]
    tensors: Dict[TensorKey, Dims]                  # model tensors with prunable dims
    consumers: List[Tuple[TensorKey, int]]          # (weight, input dim) of every conv/linear reading a group
    cost: CostModel
    depthwise: Set[str]                             # convs whose `groups` follows their channels


class _UnionFind:
    def __init__(self):
        self.parent: Dict[str, str] = {}

    def add(self, x: str) -> str:
        self.parent.setdefault(x, x)
        return x

    def find(self, x: str) -> str:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the group seen first keeps its name
            if int(ra[1:]) < int(rb[1:]):
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb


class _Analyzer:
    def __init__(self, traced: Traced):
        self.traced = traced
        self.gm = traced.graph_module
        self.uf = _UnionFind()
        self.units: Dict[str, int] = {}
        self.producer: Dict[str, str] = {}            # group id -> module that created it
        self.block: Dict[str, int] = {}
        self.fixed: Dict[str, str] = {}
        self.values: Dict[fx.Node, Dims] = {}
        self.tensors: Dict[TensorKey, Dims] = {}
        self.consumers: List[Tuple[TensorKey, int]] = []
        self.flops: Dict[TensorKey, float] = {}
        self.module_outputs: Dict[str, Dims] = {}     # a module called twice produces the same group
        self.depthwise: Set[str] = set()
        self.inputs_seen: Dict[str, Optional[Extent]] = {}
        self.params = {name: p for name, p in self.gm.named_parameters()}

    # ------------------------------------------------------------------ groups
    def new_group(self, units: int, module: str) -> Extent:
        gid = self.uf.add(f"g{len(self.units)}")
        self.units[gid] = units
        self.producer[gid] = module
        return Extent((Segment(gid, units),))

    def fix(self, dims, reason: str) -> None:
        for extent in (dims.values() if isinstance(dims, dict) else dims):
            for g in extent.groups:
                self.fixed.setdefault(g, reason)

    def unify(self, a: Extent, b: Extent, reason: str) -> Extent:
        """Merge two extents that must hold the same channels; a mismatch fixes both."""
        same = len(a.segments) == len(b.segments) and all(
            (x.group is None) == (y.group is None) and x.units == y.units and x.repeat == y.repeat
            for x, y in zip(a.segments, b.segments))
        if not same:
            self.fix([a, b], reason)
            return a
        for x, y in zip(a.segments, b.segments):
            if x.group is not None:
                self.uf.union(x.group, y.group)
        return a

    def record(self, module: str, tensor: str, dims: Dims, reason: str) -> None:
        """Note that `dims` of a model tensor follow channel groups (merged with what earlier calls noted)."""
        old = self.tensors.setdefault((module, tensor), {})
        for d, e in dims.items():
            old[d] = self.unify(old[d], e, reason) if d in old else e

    def reads(self, module: str, extent: Optional[Extent], reason: str) -> None:
        """A module called more than once reads the same channels each time: merge its inputs, and fix them
        when one call reads prunable channels and another fixed ones."""
        if module not in self.inputs_seen:
            self.inputs_seen[module] = extent
            return
        prev = self.inputs_seen[module]
        if prev is None or extent is None:
            self.fix([e for e in (prev, extent) if e is not None], reason)
        else:
            self.unify(prev, extent, reason)

    # ------------------------------------------------------------------ walk
    def run(self) -> Analysis:
        for node in self.gm.graph.nodes:
            handler = getattr(self, f"_op_{node.op}")
            out = handler(node)
            if out:
                self.values[node] = out
        return self._finish()

    def _inputs(self, node: fx.Node) -> List[fx.Node]:
        return [n for n in node.all_input_nodes if n in self.values]

    def _boundary(self, node: fx.Node, what: str) -> None:
        for n in self._inputs(node):
            self.fix(self.values[n], f"its channels reach {what} (node {node.name!r})")

    def _op_placeholder(self, node):
        return None

    def _op_get_attr(self, node):
        return None

    def _op_output(self, node):
        self._boundary(node, "the model's output")

    def _op_call_module(self, node):
        name, m = node.target, self.traced.modules[node.target]
        x = self.values.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        x = x or {}
        out_shape = shape_of(node)
        if isinstance(m, CONVS + CONV_TRANSPOSES) or isinstance(m, nn.Linear):
            return self._matmul_module(node, name, m, x, out_shape)
        if isinstance(m, BATCH_NORMS + (nn.GroupNorm,)):
            return self._channel_norm(node, name, m, x)
        if isinstance(m, nn.LayerNorm):
            return self._layer_norm(node, name, m, x)
        if isinstance(m, nn.PReLU):
            if m.num_parameters > 1 and 1 in x:
                self.record(name, "weight", {0: x[1]}, f"PReLU {name!r}")
            return x
        if isinstance(m, ELEMENTWISE_MODULES):
            return x
        if isinstance(m, SPATIAL_MODULES):
            return self._keep_dims(node, x, (0, 1), "a pooling/padding over channels")
        if isinstance(m, nn.Flatten):
            return self._flatten(node, x, m.start_dim, m.end_dim)
        if isinstance(m, nn.Softmax):
            return self._softmax_like(node, x, m.dim)
        self._boundary(node, f"module {name!r} ({type(m).__name__}), whose channels fastnas does not prune")
        return None

    def _matmul_module(self, node, name, m, x, out_shape):
        is_linear = isinstance(m, nn.Linear)
        in_dim = len(shape_of(node.args[0])) - 1 if is_linear else 1
        out_dim = len(out_shape) - 1 if is_linear else 1
        where = f"{type(m).__name__} {name!r}"
        w_in, w_out = (0, 1) if isinstance(m, CONV_TRANSPOSES) else (1, 0)
        positions = math.prod(out_shape) // out_shape[out_dim]
        self.flops[(name, "weight")] = self.flops.get((name, "weight"), 0.0) + 2.0 * positions
        groups = getattr(m, "groups", 1)
        rest = {d: e for d, e in x.items() if d != in_dim}
        self.reads(name, x.get(in_dim), f"{where} is called on inputs with different channels")
        if groups > 1 and not isinstance(m, CONV_TRANSPOSES) and groups == m.in_channels == m.out_channels:
            self.depthwise.add(name)  # depthwise: channel c of the output reads channel c of the input only
            if in_dim in x:
                self.record(name, "weight", {0: x[in_dim]}, where)
                if m.bias is not None:
                    self.record(name, "bias", {0: x[in_dim]}, where)
            return x
        if groups > 1:
            self.fix({in_dim: x[in_dim]} if in_dim in x else {}, f"they enter grouped {where} (groups={groups}), whose channels are tied per group")
            out = self.module_outputs.get(name) or self.new_group(out_shape[out_dim], name)
            self.module_outputs[name] = out
            self.fix([out], f"grouped {where} (groups={groups}) produces them")
            return {**rest, out_dim: out}
        if in_dim in x:
            self.record(name, "weight", {w_in: x[in_dim]}, where)
            self.consumers.append(((name, "weight"), w_in))
        out = self.module_outputs.get(name)
        if out is None:
            out = self.module_outputs[name] = self.new_group(out_shape[out_dim], name)
            self.record(name, "weight", {w_out: out}, where)
            if m.bias is not None:
                self.record(name, "bias", {0: out}, where)
        return {**rest, out_dim: out}

    def _channel_norm(self, node, name, m, x):
        if 1 not in x:
            return x
        extent, where = x[1], f"{type(m).__name__} {name!r}"
        if isinstance(m, nn.GroupNorm):
            size = m.num_channels // m.num_groups
            if len(extent.segments) != 1 or extent.segments[0].repeat != 1:
                self.fix([extent], f"{where} normalises groups of channels across concatenated inputs")
                return x
            g = extent.segments[0].group
            if g is not None:
                self.block[g] = math.lcm(self.block.get(g, 1), size)
        for t in ("weight", "bias", "running_mean", "running_var"):
            if getattr(m, t, None) is not None:
                self.record(name, t, {0: extent}, where)
        if not any(getattr(m, t, None) is not None for t in ("weight", "running_mean")):
            self.tensors.setdefault((name, "<channels>"), {0: extent})  # no tensors: only its size follows
        return x

    def _layer_norm(self, node, name, m, x):
        ndim = len(shape_of(node))
        normalized = range(ndim - len(m.normalized_shape), ndim)
        if len(m.normalized_shape) == 1 and ndim - 1 in x:
            for t in ("weight", "bias"):
                if getattr(m, t, None) is not None:
                    self.record(name, t, {0: x[ndim - 1]}, f"LayerNorm {name!r}")
            if m.weight is None:
                self.tensors.setdefault((name, "<channels>"), {0: x[ndim - 1]})
            return x
        mixed = {d: e for d, e in x.items() if d in normalized}
        self.fix(mixed, f"LayerNorm {name!r} normalises them together with other dims (node {node.name!r})")
        return x

    def _op_call_function(self, node):
        fn = node.target
        return self._dispatch(node, fn, fn in _UNARY_FUNCTIONS, fn in _BINARY_FUNCTIONS,
                              _REDUCE_FUNCTIONS.get(fn), getattr(fn, "__name__", str(fn)))

    def _op_call_method(self, node):
        m = node.target
        if m in _NON_TENSOR_METHODS:
            return None
        return self._dispatch(node, m, m in _UNARY_METHODS, m in _BINARY_METHODS,
                              m if m in _REDUCE_METHODS else None, f".{m}()")

    def _dispatch(self, node, target, unary: bool, binary: bool, reduce: Optional[str], label: str):
        first = node.args[0] if node.args else None
        x = self.values.get(first, {}) if isinstance(first, fx.Node) else {}
        if target in (torch.cat, torch.concat, torch.concatenate, "cat"):
            return self._cat(node)
        if not self._inputs(node):
            return None
        if unary:
            return x
        if binary:
            return self._elementwise(node)
        if target in _SPATIAL_FUNCTIONS:
            return self._keep_dims(node, x, (0, 1), f"{label} over channels")
        if reduce is not None:
            return self._reduce(node, x)
        if target in (torch.flatten, "flatten"):
            start = _arg(node, 1, "start_dim", 0)
            end = _arg(node, 2, "end_dim", -1)
            return self._flatten(node, x, start, end)
        if target in ("view", "reshape", torch.reshape):
            return self._reshape(node, x)
        if target in ("permute", torch.permute, "transpose", torch.transpose, "swapaxes", "movedim", torch.movedim):
            return self._permute(node, x, target)
        if target in (F.softmax, torch.softmax, "softmax", F.log_softmax, "log_softmax"):
            return self._softmax_like(node, x, _arg(node, 1, "dim", None))
        if target is operator.getitem:
            return self._getitem(node, x)
        if target is getattr:
            return None
        self._boundary(node, f"{label}, which fastnas does not know")
        return None

    # ------------------------------------------------------------------ op rules
    def _elementwise(self, node) -> Optional[Dims]:
        """Broadcasting elementwise op: operands aligned from the right share channels on each output dim. A
        parameter operand (a layer-scale vector, a bias) follows them; any other full-size operand fixes them."""
        out_shape = shape_of(node)
        if out_shape is None:
            self._boundary(node, "a non-tensor result")
            return None
        ndim, out, params = len(out_shape), {}, []
        operands = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
        for d in range(ndim):
            extents, fixed_full = [], False
            for a in operands:
                shape = shape_of(a)
                ad = None if shape is None else d - (ndim - len(shape))
                if ad is None or ad < 0 or shape[ad] == 1:
                    continue  # a scalar, or broadcast along d
                dims = self.values.get(a, {})
                if ad in dims:
                    extents.append(dims[ad])
                elif a.op == "get_attr" and a.target in self.params:
                    params.append((a.target, ad, d))
                else:
                    fixed_full = True
            if not extents:
                continue
            merged = extents[0]
            for e in extents[1:]:
                merged = self.unify(merged, e, f"they are combined elementwise at node {node.name!r}")
            if fixed_full:
                self.fix(extents, f"they meet a tensor with fixed channels at node {node.name!r}")
            out[d] = merged
        for target, pdim, d in params:
            if d in out:
                module, _, attr = target.rpartition(".")
                self.record(module, attr, {pdim: out[d]}, f"parameter {target!r}")
        return out

    def _cat(self, node) -> Optional[Dims]:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = _arg(node, 1, "dim", 0)
        out_shape = shape_of(node)
        dim = dim % len(out_shape)
        segments, any_group = [], False
        for t in tensors:
            dims = self.values.get(t, {}) if isinstance(t, fx.Node) else {}
            if dim in dims:
                segments.extend(dims[dim].segments)
                any_group = True
            else:
                segments.append(Segment(None, shape_of(t)[dim]))
        out = {}
        for t in tensors:  # other dims: concatenated tensors share them
            for d, e in (self.values.get(t, {}) if isinstance(t, fx.Node) else {}).items():
                if d != dim:
                    out[d] = e if d not in out else self.unify(out[d], e, f"cat at node {node.name!r}")
        if any_group:
            out[dim] = Extent(tuple(segments))
        return out or None

    def _keep_dims(self, node, x: Dims, keep, what: str) -> Dims:
        lost = {d: e for d, e in x.items() if d not in keep}
        self.fix(lost, f"{what} (node {node.name!r})")
        return {d: e for d, e in x.items() if d in keep}

    def _reduce(self, node, x: Dims) -> Dims:
        shape = shape_of(node.args[0])
        dims = _arg(node, 1, "dim", None)
        keepdim = bool(_arg(node, 2, "keepdim", False))
        reduced = set(range(len(shape))) if dims is None else {d % len(shape) for d in ((dims,) if isinstance(dims, int) else dims)}
        self.fix({d: e for d, e in x.items() if d in reduced}, f"they are reduced over at node {node.name!r}")
        out = {}
        for d, e in x.items():
            if d not in reduced:
                out[d if keepdim else d - sum(1 for r in reduced if r < d)] = e
        return out

    def _flatten(self, node, x: Dims, start: int, end: int) -> Dims:
        shape = shape_of(node.args[0])
        start, end = start % len(shape), end % len(shape)
        out = {}
        for d, e in x.items():
            if d < start:
                out[d] = e
            elif d > end:
                out[d - (end - start)] = e
            elif d == start:  # channel-major: each unit becomes prod(later dims) consecutive elements
                r = math.prod(shape[start + 1:end + 1])
                out[start] = Extent(tuple(Segment(s.group, s.units, s.repeat * r) for s in e.segments))
            else:
                self.fix([e], f"they are flattened behind other dims at node {node.name!r}")
        return out

    def _reshape(self, node, x: Dims) -> Dims:
        a, b = shape_of(node.args[0]), shape_of(node)
        if a == b:
            return x
        for start in range(len(a)):  # is it a flatten of a[start:end+1]?
            for end in range(start + 1, len(a)):
                if list(a[:start]) + [math.prod(a[start:end + 1])] + list(a[end + 1:]) == list(b):
                    return self._flatten(node, x, start, end)
        self.fix(x, f"they are reshaped at node {node.name!r}")
        return {}

    def _permute(self, node, x: Dims, target) -> Dims:
        ndim = len(shape_of(node.args[0]))
        if target in ("permute", torch.permute):
            order = node.args[1:] if target == "permute" else node.args[1]
            if len(order) == 1 and isinstance(order[0], (tuple, list)):
                order = order[0]
            perm = [o % ndim for o in order]
        else:
            a, b = node.args[1] % ndim, node.args[2] % ndim
            perm = list(range(ndim))
            if target in ("transpose", torch.transpose, "swapaxes"):
                perm[a], perm[b] = perm[b], perm[a]
            else:  # movedim(source, destination)
                perm.remove(a)
                perm.insert(b, a)
        return {perm.index(d): e for d, e in x.items()}

    def _softmax_like(self, node, x: Dims, dim) -> Dims:
        if dim is None:
            self.fix(x, f"softmax without dim at node {node.name!r}")
            return {}
        dim = dim % len(shape_of(node))
        if dim in x:
            self.fix({dim: x[dim]}, f"softmax normalises over them at node {node.name!r}")
        return x

    def _getitem(self, node, x: Dims) -> Optional[Dims]:
        if not x:
            return None
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        out, d_in, d_out = {}, 0, 0
        for item in index:
            if item is Ellipsis or not isinstance(item, (slice, int, type(None))):
                self.fix(x, f"they are indexed at node {node.name!r}")
                return {}
            if item is None:
                d_out += 1
                continue
            if isinstance(item, int) or item != slice(None):
                if d_in in x:
                    self.fix({d_in: x[d_in]}, f"they are indexed at node {node.name!r}")
                d_in += 1
                d_out += 0 if isinstance(item, int) else 1
                continue
            if d_in in x:
                out[d_out] = x[d_in]
            d_in, d_out = d_in + 1, d_out + 1
        for d, e in x.items():
            if d >= d_in:
                out[d - d_in + d_out] = e
        return out

    # ------------------------------------------------------------------ result
    def _finish(self) -> Analysis:
        find = self.uf.find

        def resolve(e: Extent) -> Extent:
            return Extent(tuple(Segment(find(s.group) if s.group else None, s.units, s.repeat) for s in e.segments))

        tensors = {k: {d: resolve(e) for d, e in dims.items()} for k, dims in self.tensors.items()}
        roots = sorted({find(g) for g in self.units}, key=lambda g: int(g[1:]))
        names = {r: self.producer[r] for r in roots}
        groups: Dict[str, Group] = {}
        for r in roots:
            groups[names[r]] = Group(units=self.units[r])
        for g, reason in self.fixed.items():
            groups[names[find(g)]].fixed = groups[names[find(g)]].fixed or reason
        for g, b in self.block.items():
            grp = groups[names[find(g)]]
            grp.block = math.lcm(grp.block, b)
        rename = {r: names[r] for r in roots}
        tensors = {k: {d: _rename(e, rename) for d, e in dims.items()} for k, dims in tensors.items()}
        for (module, _), dims in tensors.items():
            for e in dims.values():
                for g in e.groups:
                    if module not in groups[g].modules:
                        groups[g].modules.append(module)
        for g in groups.values():
            if g.block > 1 and g.units % g.block:
                g.fixed = g.fixed or f"GroupNorm channels per group ({g.block}) do not divide {g.units}"
        terms = []
        for name, p in self.params.items():
            module, _, attr = name.rpartition(".")
            terms.append(Term(name, tuple(p.shape), tensors.get((module, attr), {}), params=True,
                              flops=self.flops.get((module, attr), 0.0)))
        full = {n: g.units for n, g in groups.items()}
        return Analysis(groups, {k: v for k, v in tensors.items()}, [(k, d) for k, d in self.consumers],
                        CostModel(terms, full), set(self.depthwise))


def _rename(e: Extent, rename: Dict[str, str]) -> Extent:
    return Extent(tuple(Segment(rename[s.group] if s.group else None, s.units, s.repeat) for s in e.segments))


def _arg(node: fx.Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def analyze(traced: Traced) -> Analysis:
    return _Analyzer(traced).run()


def known_leaf_types() -> tuple:
    return KNOWN_LEAVES


__all__ = ["Analysis", "Group", "analyze", "KNOWN_LEAVES", "Callable"]
