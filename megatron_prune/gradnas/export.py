"""The pruned model: a sliced copy that stays a Hugging Face model of the same class, with its config updated.

    pruned, update, loadable = build(model, space, group_scores, widths)
    save(pruned, "pruned.pt", result); restore(fresh_original, "pruned.pt")   # one file, any per-layer sizes

Kept units keep their original order (ascending), so a BERT/RoBERTa/DistilBERT/GPT-2 config can state the
pruned heads with HF's own `pruned_heads` (HF prunes those heads when it builds the model, any count per layer).
Other sizes go into the config where it can state them: the FFN width (`intermediate_size`, `n_inner`,
`hidden_dim`) when every layer has the same; for Llama-style models `num_attention_heads`, `num_key_value_heads`
and an explicit `head_dim` when every layer has the same. Anything else (per-layer FFN widths, per-layer heads of
Llama-style models, any pruned heads of GPT-J) leaves `hf_loadable` False: `save_pretrained` works but
`from_pretrained` would build the original shapes; save with `save` (the architecture file) instead.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Mapping, Tuple

import torch
import torch.nn as nn

from megatron_prune.common import archfile
from megatron_prune.common.slicing import slice_model
from megatron_prune.gradnas.families import Family, Sizes, detect, layer_list
from megatron_prune.gradnas.search import keep
from megatron_prune.gradnas.space import SearchSpace


def kept_units(space: SearchSpace, scores: Mapping[str, torch.Tensor], widths: Mapping[str, int]) -> Dict[str, torch.Tensor]:
    return {g: keep(scores[g], widths[g], grp.blocks) for g, grp in space.groups.items()}


def new_sizes(space: SearchSpace, widths: Mapping[str, int]) -> List[Sizes]:
    out = []
    for layer in space.layers:
        s, i = layer.sizes, layer.index
        if f"layers.{i}.kv_groups" in widths:
            kv = widths[f"layers.{i}.kv_groups"]
            out.append(Sizes(kv * (s.heads // s.kv_heads), kv, s.head_dim, widths[f"layers.{i}.ffn"]))
        else:
            out.append(Sizes(widths[f"layers.{i}.heads"], s.kv_heads, s.head_dim, widths[f"layers.{i}.ffn"]))
    return out


def build(model: nn.Module, space: SearchSpace, scores: Mapping[str, torch.Tensor],
          widths: Mapping[str, int]) -> Tuple[nn.Module, Dict[str, object], bool]:
    """A pruned copy of `model` at `widths` (the input is not modified): (model, config fields set, hf_loadable)."""
    family = space.family
    kept = kept_units(space, scores, widths)
    pruned = slice_model(copy.deepcopy(model), space.tensors, kept)
    sizes = new_sizes(space, widths)
    dropped_heads = {}
    for layer, new in zip(space.layers, sizes):
        for rel, attr, value in family.attrs:
            setattr(pruned.get_submodule(layer.name(rel)), attr, value(new))
        g = f"layers.{layer.index}.heads"
        if family.pruned_heads_module and g in kept and len(kept[g]) < layer.sizes.heads:
            dropped_heads[layer.index] = sorted(set(range(layer.sizes.heads)) - set(kept[g].tolist()))
    update, loadable = config_update(pruned, family, [l.sizes for l in space.layers], sizes, dropped_heads)
    for k, v in update.items():
        setattr(pruned.config, k, v)
    return pruned, update, loadable


def config_update(model: nn.Module, family: Family, before: List[Sizes], after: List[Sizes],
                  dropped_heads: Mapping[int, List[int]]) -> Tuple[Dict[str, object], bool]:
    """The HF config fields that state the new sizes, and whether they state all of them."""
    config, update, loadable = model.config, {}, True
    if any(b.ffn != a.ffn for b, a in zip(before, after)):
        ffn = {s.ffn for s in after}
        if len(ffn) == 1:
            update[family.config_ffn] = ffn.pop()
        else:
            loadable = False
    heads_changed = [(b.heads, b.kv_heads) != (a.heads, a.kv_heads) for b, a in zip(before, after)]
    if family.config_heads == "pruned_heads" and dropped_heads:
        merged = {int(k): list(v) for k, v in (config.pruned_heads or {}).items()}
        for i, heads in dropped_heads.items():  # current head indices -> HF's original ones
            original = [h for h in range(config.num_attention_heads) if h not in set(merged.get(i, []))]
            merged[i] = sorted(set(merged.get(i, [])) | {original[h] for h in heads})
            _, layers = layer_list(model, family)
            layers[i].get_submodule(family.pruned_heads_module).pruned_heads = set(merged[i])
        update["pruned_heads"] = merged
    elif family.config_heads == "num_attention_heads" and any(heads_changed):
        if len({(a.heads, a.kv_heads) for a in after}) == 1:
            update.update(num_attention_heads=after[0].heads, num_key_value_heads=after[0].kv_heads, head_dim=after[0].head_dim)
        else:
            loadable = False
    elif any(heads_changed) and family.config_heads != "pruned_heads":
        loadable = False
    return update, loadable


def save(model: nn.Module, path, result=None) -> None:
    """Write the pruned model's architecture, weights and HF config to one file (atomically)."""
    archfile.save_pruned(model, path, "gradnas", result.to_dict() if result is not None else None)


def restore(model: nn.Module, path) -> nn.Module:
    """Resize a freshly built original `model` to the saved architecture and load the weights (in place)."""
    archfile.restore_pruned(model, path)
    family = detect(model)
    if family.pruned_heads_module:
        _, layers = layer_list(model, family)
        for i, heads in (model.config.pruned_heads or {}).items():
            layers[int(i)].get_submodule(family.pruned_heads_module).pruned_heads = set(heads)
    return model
