"""Trace an `nn.Module` with torch.fx and record every tensor's shape on the dummy input.

    traced = trace(model, dummy_input, leaf_modules=("backbone.attn",))
    traced.graph_module.graph.nodes   # fx nodes; node.meta["tensor_meta"].shape where the value is a tensor
    traced.modules["layer1.0.conv1"]  # the leaf modules the graph calls, by qualified name

Leaves: the standard layers fastnas knows (convs, linears, norms, activations, pooling, ...), any other
module defined in `torch.nn`, and the modules named in `leaf_modules` (names, fnmatch patterns or classes).
Everything else is traced through. A module fx cannot trace (data-dependent control flow, ...) is an error
that names it and says how to mark it a leaf; its channels are then kept as they are.

`dummy_input` follows Model Optimizer's convention: a tensor is `model(x)`, a tuple is `model(*args)`, and a
tuple ending in a dict passes that dict as keyword arguments.
"""

from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from megatron_prune.errors import PruneConfigError, UnsupportedModelError

LeafSpec = Union[str, type]


@dataclass
class Traced:
    graph_module: fx.GraphModule
    modules: Dict[str, nn.Module]  # qualified name -> the model's own module object (not a copy)


def split_input(dummy_input) -> Tuple[tuple, dict]:
    """(args, kwargs) of a `dummy_input` in Model Optimizer's convention."""
    if isinstance(dummy_input, tuple):
        if dummy_input and isinstance(dummy_input[-1], dict):
            return tuple(dummy_input[:-1]), dict(dummy_input[-1])
        return dummy_input, {}
    if isinstance(dummy_input, dict):
        return (), dict(dummy_input)
    return (dummy_input,), {}


def run_model(model: nn.Module, dummy_input):
    args, kwargs = split_input(dummy_input)
    return model(*args, **kwargs)


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: Sequence[LeafSpec], known_leaf_types: Tuple[type, ...]):
        super().__init__()
        self.leaf_names = tuple(s for s in leaf_modules if isinstance(s, str))
        self.leaf_types = tuple(s for s in leaf_modules if isinstance(s, type)) + known_leaf_types
        self.stack = []
        self.failed_in = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types) or any(fnmatch.fnmatchcase(qualname, p) for p in self.leaf_names):
            return True
        return m.__module__.startswith("torch.nn") and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self.stack.append(name)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = name
            raise
        finally:
            self.stack.pop()


def trace(model: nn.Module, dummy_input, leaf_modules: Sequence[LeafSpec] = (),
          known_leaf_types: Tuple[type, ...] = ()) -> Traced:
    """Trace `model` and propagate shapes of `dummy_input` through the graph (the model is not modified)."""
    bad = [s for s in leaf_modules if not isinstance(s, (str, type))]
    if bad:
        raise PruneConfigError(f"config['leaf_modules'] holds {bad!r}: give module names (patterns allowed) or classes")
    args, kwargs = split_input(dummy_input)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the user's model refused the user's input
        raise PruneConfigError(f"the model rejected dummy_input ({_describe(dummy_input)}): {type(e).__name__}: {e}") from e
    tracer = _Tracer(leaf_modules, known_leaf_types)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - fx reports untraceable code with many exception types
        where = tracer.failed_in
        what = f"module {where!r} ({type(model.get_submodule(where)).__name__})" if where else f"the model's own forward ({type(model).__name__})"
        hint = (f"mark it a leaf: config={{'leaf_modules': [{where!r}]}} (its input and output channels are then kept)"
                if where else "move the untraceable code into a submodule and mark that a leaf (config['leaf_modules'])")
        raise UnsupportedModelError(f"torch.fx cannot trace {what}: {type(e).__name__}: {_first_line(e)}. To prune the rest, {hint}") from e
    gm = fx.GraphModule(tracer.root, graph)
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if kwargs:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
        positional = [bound.arguments.get(p) for p in placeholders]
    else:
        positional = list(args) + [None] * (len(placeholders) - len(args))
    with torch.no_grad():
        ShapeProp(gm).propagate(*positional)
    modules = {n.target: model.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    return Traced(gm, modules)


def shape_of(node: fx.Node):
    """The tensor shape a node produced on the dummy input, or None for non-tensors."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor {tuple(x.shape)} {x.dtype}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in x) + ")"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in x.items()) + "}"
    return type(x).__name__


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""
