"""Slice a model's tensors to the kept channels and make the standard layers' attributes agree with them.

    slice_model(model_copy, tensors, kept)   # in place: every (module, tensor) in `tensors` is index_select-ed
                                             # on its mapped dims; Conv/Linear/norm attributes follow

`tensors` maps `(qualified module name, attribute)` to `{dim: Extent}` (see `common.extent`); `kept` maps each
group to the unit indices it keeps, in the order they should appear. Parameters stay `nn.Parameter`s with
their `requires_grad`; buffers stay buffers. The result holds ordinary `torch.nn` layers, no wrappers.
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Tuple

import torch
import torch.nn as nn

from megatron_prune.common.extent import Extent, slice_tensor

TensorKey = Tuple[str, str]
CHANNELS_ONLY = "<channels>"  # a module with no tensors on a group (e.g. a non-affine norm): only its size follows


def slice_model(model: nn.Module, tensors: Mapping[TensorKey, Mapping[int, Extent]], kept: Mapping[str, torch.Tensor],
                depthwise: Iterable[str] = ()) -> nn.Module:
    """Slice `model` in place (pass a copy); returns it. `depthwise`: convs whose `groups` equals their channels."""
    touched: Dict[str, int] = {}
    for (module_name, attr), dims in tensors.items():
        module = model.get_submodule(module_name)
        if attr == CHANNELS_ONLY:
            touched[module_name] = dims[0].length({g: len(i) for g, i in kept.items()})
            continue
        old = getattr(module, attr)
        new = slice_tensor(old.data, dims, kept)
        if isinstance(old, nn.Parameter):
            setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            module._buffers[attr] = new
        touched.setdefault(module_name, -1)
    depthwise = set(depthwise)
    for name, channels in touched.items():
        sync_attributes(model.get_submodule(name), name in depthwise, channels)
    return model


def sync_attributes(m: nn.Module, depthwise: bool = False, channels: int = -1) -> None:
    """Set a standard layer's size attributes from its (sliced) tensors."""
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        m.out_channels = m.weight.shape[0]
        if depthwise:
            m.groups = m.in_channels = m.out_channels
        else:
            m.in_channels = m.weight.shape[1] * m.groups
    elif isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        m.in_channels = m.weight.shape[0]
        m.out_channels = m.weight.shape[1] * m.groups
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif type(m).__name__ == "Conv1D" and hasattr(m, "nf"):  # Hugging Face's transposed linear (GPT-2): [in, out]
        m.nf = m.weight.shape[1]
    elif isinstance(m, nn.GroupNorm):
        n = _first_dim(m, ("weight",), channels)
        m.num_groups = m.num_groups * n // m.num_channels
        m.num_channels = n
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        m.num_features = _first_dim(m, ("weight", "running_mean"), channels)
    elif isinstance(m, nn.LayerNorm):
        m.normalized_shape = (_first_dim(m, ("weight", "bias"), channels),)
    elif isinstance(m, nn.PReLU):
        m.num_parameters = m.weight.shape[0]


def _first_dim(m: nn.Module, attrs, channels: int) -> int:
    for a in attrs:
        t = getattr(m, a, None)
        if t is not None:
            return t.shape[0]
    return channels
