"""One file for a pruned model: its architecture (every module's sizes) and its weights.

    save_pruned(pruned, "pruned.pt", algorithm="fastnas", record=result.to_dict())
    model = restore_pruned(build_original_model(), "pruned.pt")    # resized in place, weights loaded (strict)

The architecture is recorded generically, so any model works, not only the layers an algorithm knows: each
module's tensor shapes and its integer size attributes (`in_channels`, `num_features`, `num_heads`, ...). A
Hugging Face model's `config` is recorded too and restored onto the fresh model. Restoring onto a freshly built
original model reproduces the pruned model's outputs exactly (tested for every model family).
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch
import torch.nn as nn

from megatron_prune.common.checkpoint import atomic_save
from megatron_prune.errors import PruneConfigError

FORMAT = "megatron-prune.pruned-model"


def _class_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _size_attrs(module: nn.Module) -> Dict[str, object]:
    """Integer size attributes (and tuples/lists of them) a module's forward may read."""
    out = {}
    for k, v in vars(module).items():
        if k.startswith("_") or isinstance(v, bool):
            continue
        if isinstance(v, int) or (isinstance(v, (tuple, list)) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
            out[k] = v
    return out


def architecture(model: nn.Module) -> Dict[str, Dict[str, object]]:
    """{module name: {"tensors": {name: shape}, "attrs": {name: value}}} for every module."""
    arch = {}
    for name, m in model.named_modules():
        tensors = {k: tuple(t.shape) for k, t in list(m._parameters.items()) + list(m._buffers.items()) if t is not None}
        arch[name] = {"tensors": tensors, "attrs": _size_attrs(m)}
    return arch


def save_pruned(model: nn.Module, path, algorithm: str, record: Optional[dict] = None) -> None:
    """Write `model`'s architecture and weights to `path` (atomically)."""
    config = getattr(model, "config", None)
    atomic_save({
        "format": FORMAT, "algorithm": algorithm, "model_class": _class_name(model),
        "architecture": architecture(model), "state_dict": model.state_dict(),
        "hf_config": config.to_dict() if hasattr(config, "to_dict") else None,
        "record": record or {},
    }, os.path.expanduser(str(path)))


def load_record(path) -> dict:
    """The file's contents (architecture, weights, search record) without a model."""
    state = torch.load(os.path.expanduser(str(path)), map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise PruneConfigError(f"{str(path)!r} is not a pruned-model file written by megatron-prune")
    return state


def restore_pruned(model: nn.Module, path) -> nn.Module:
    """Resize `model` (a freshly built original) to the architecture in `path` and load its weights; returns
    `model`, changed in place."""
    state = load_record(path)
    if state["model_class"] != _class_name(model):
        raise PruneConfigError(f"{str(path)!r} holds a pruned {state['model_class']}, not a {_class_name(model)}")
    modules = dict(model.named_modules())
    missing = [n for n in state["architecture"] if n not in modules]
    if missing:
        raise PruneConfigError(f"{str(path)!r} does not match this model: it has no module(s) {missing[:5]}")
    for name, spec in state["architecture"].items():
        m = modules[name]
        for k, shape in spec["tensors"].items():
            old = getattr(m, k, None)
            if old is None or tuple(old.shape) == tuple(shape):
                continue
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                setattr(m, k, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                m._buffers[k] = new
        for k, v in spec["attrs"].items():
            if getattr(m, k, None) != v:
                setattr(m, k, type(getattr(m, k, v))(v) if isinstance(v, (tuple, list)) else v)
    if state.get("hf_config") and hasattr(getattr(model, "config", None), "update"):
        model.config.update({k: v for k, v in state["hf_config"].items() if k not in ("architectures", "transformers_version")})
    model.load_state_dict(state["state_dict"], strict=True)
    return model
