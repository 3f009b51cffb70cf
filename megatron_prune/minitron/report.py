"""What a prune did, for people: before/after tables, a JSON summary and a PNG of importance and keep masks.

All of it is computed from a `PruneResult` (importance, plan, sizes) plus optional parameter breakdowns, on
any rank; the CLI writes it from global rank 0. Layer numbers are global and 1-indexed.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Optional

import torch

from megatron_prune.common.log import format_table
from megatron_prune.minitron.config import SUPPORTED_AXES


_COMPONENTS = ("embedding", "attention", "mlp", "norms", "output_layer")


def component_of(name: str) -> str:
    """Which part of a GPT a parameter belongs to: embedding, attention, mlp, norms or output_layer."""
    if "norm" in name:  # separate norm modules, and norms fused into linear_qkv / linear_fc1 (TE specs)
        return "norms"
    for prefix, component in (("embedding.", "embedding"), ("output_layer.", "output_layer")):
        if name.startswith(prefix):
            return component
    return "attention" if ".self_attention." in name else "mlp"


def parameter_groups(model: torch.nn.Module, ctx) -> Dict[str, int]:
    """Parameters of the whole model per component (TP shards summed, stages summed, a tied output layer
    counted once); the values add up to `count_params(model, ctx)`. Collective.

    Each rank counts its shards, and its replicated tensors on the first rank of the group they are replicated
    over; summed over the world, every tensor is then counted once per data-parallel replica of what holds it
    (dense weights: `dp_size`, routed experts: `expert_dp_size`)."""
    from megatron_prune.minitron.slicing.table import is_tied_output_copy
    from megatron_prune.minitron.slicing.tensor_parallel import is_routed_expert_tensor, ranks_of, split_size

    dense = torch.zeros(len(_COMPONENTS), dtype=torch.float64)
    experts = torch.zeros_like(dense)
    for name, p in model.named_parameters():
        if not is_tied_output_copy(model, name) and (split_size(name, ctx) > 1 or ranks_of(name, ctx).tp_rank == 0):
            (experts if is_routed_expert_tensor(name) else dense)[_COMPONENTS.index(component_of(name))] += p.numel()
    world = ctx.gather_all(torch.stack([dense, experts]))
    total = sum(w[0] for w in world) / ctx.dp_size + sum(w[1] for w in world) / ctx.expert_dp_size
    return {c: int(round(v)) for c, v in zip(_COMPONENTS, total.tolist()) if v or c != "output_layer"}


def keep_masks(result) -> Dict[str, torch.Tensor]:
    """Boolean keep masks in original index order: hidden [H], ffn [L, F], heads [L, N], layers [L]."""
    plan, sizes = result.plan, result.original_sizes
    L, H, N = sizes["num_layers"], sizes["hidden_size"], sizes.get("num_attention_heads", 0)
    F, G = sizes.get("ffn_hidden_size", 0), sizes.get("num_query_groups", 1)  # absent: no dense MLP / attention
    q = N // G
    hidden = torch.ones(H, dtype=torch.bool) if plan.hidden is None else _mask(H, plan.hidden)
    ffn, heads = torch.zeros(L, F, dtype=torch.bool), torch.zeros(L, N, dtype=torch.bool)
    for n, keep in plan.layers.items():
        ffn[n - 1] = True if keep.ffn is None else _mask(F, keep.ffn)
        heads[n - 1] = True if keep.groups is None else _mask(N, (keep.groups.view(-1, 1) * q + keep.heads).flatten())
    layers = torch.tensor([n in plan.layers for n in range(1, L + 1)])
    return {"hidden": hidden, "ffn": ffn, "heads": heads, "layers": layers}


def summary(result, groups_before: Optional[Mapping[str, int]] = None, groups_after: Optional[Mapping[str, int]] = None,
            extra: Optional[Mapping] = None) -> dict:  # fmt: skip
    """A JSON-serialisable record of the prune."""
    imp, masks = result.importance, keep_masks(result)
    layers = []
    for n in range(1, result.original_sizes["num_layers"] + 1):
        ffn, heads = imp.ffn.get(n), imp.heads.get(n)  # None: the layer has no dense MLP / no attention
        layers.append({
            "layer": n,
            "kept": bool(masks["layers"][n - 1]),
            "block_influence": float(imp.layers[n]),
            "ffn_importance_kept_share": None if ffn is None else _share(ffn, masks["ffn"][n - 1]),
            "heads_kept": [] if heads is None else [int(h) for h in masks["heads"][n - 1].nonzero().flatten()],
            "head_importance": [] if heads is None else [float(v) for v in heads],
        })  # fmt: skip
    return {
        "original_sizes": dict(result.original_sizes),
        "pruned_sizes": dict(result.export_config),
        "params_before": result.params_before,
        "params_after": result.params_after,
        "params_ratio": result.params_after / result.params_before,
        "parameters_by_component": {"before": dict(groups_before or {}), "after": dict(groups_after or {})},
        "kept_layers": list(result.plan.kept_layers),
        "dropped_layers": list(result.plan.dropped_layers),
        "hidden_importance_kept_share": _share(imp.hidden, masks["hidden"]),
        "importance_criteria": dict(result.criteria) if result.criteria else None,
        "calibrated": result.calibrated,
        "statistics_from": "calibration" if result.calibrated else f"scores file {result.scores_path}",
        "calibration": result.calibration,  # what the statistics were computed on (None: not recorded)
        "calibration_micro_batches": result.calibration_calls,
        "scores_path": result.scores_path,
        "layers": layers,
        **dict(extra or {}),
    }


def format_tables(result, groups_before: Optional[Mapping[str, int]] = None,
                  groups_after: Optional[Mapping[str, int]] = None) -> str:  # fmt: skip
    """Sizes per axis, parameters per component, and a per-layer importance summary, as plain text."""
    sizes_rows = [(axis, result.original_sizes[axis], result.export_config[axis]) for axis in SUPPORTED_AXES
                  if axis in result.original_sizes]  # fmt: skip
    out = [format_table(["axis", "before", "after"], [(a, f"{b:,}", f"{c:,}" + ("" if b == c else f"  ({100 * c / b:.0f}%)"))
                                               for a, b, c in sizes_rows])]  # fmt: skip
    if groups_before and groups_after:
        rows = [(k, f"{groups_before[k]:,}", f"{groups_after.get(k, 0):,}", f"{100 * groups_after.get(k, 0) / max(groups_before[k], 1):.1f}%")
                for k in groups_before]  # fmt: skip
        rows.append(("total", f"{result.params_before:,}", f"{result.params_after:,}",
                     f"{100 * result.params_after / result.params_before:.1f}%"))  # fmt: skip
        out.append(format_table(["parameters", "before", "after", "kept"], rows))
    rows = [(layer["layer"], f"{layer['block_influence']:.4f}", "kept" if layer["kept"] else "DROPPED",
             "-" if layer["ffn_importance_kept_share"] is None else f"{100 * layer['ffn_importance_kept_share']:.0f}%",
             _heads(layer["heads_kept"], len(layer["head_importance"]))) for layer in summary(result)["layers"]]  # fmt: skip
    out.append(format_table(["layer", "block influence", "status", "FFN importance kept", "heads kept"], rows))
    if result.plan.dropped_layers:
        out.append(f"layers dropped (lowest block influence): {result.plan.dropped_layers}")
    return "\n\n".join(out)


def plot(result, path: str, title: str = "") -> None:
    """A 2x2 PNG: block influence per layer; hidden-channel importance with the kept set; FFN and head keep
    masks per layer (original index order, shaded by importance; dropped layers blank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imp, masks = result.importance, keep_masks(result)
    L = result.original_sizes["num_layers"]
    numbers = list(range(1, L + 1))
    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    colors = ["tab:blue" if masks["layers"][n - 1] else "tab:red" for n in numbers]
    ax[0, 0].bar(numbers, [imp.layers[n] for n in numbers], color=colors)
    ax[0, 0].set(title="block influence per layer (red: dropped)", xlabel="layer", ylabel="1 - cos(in, out)")

    order = torch.argsort(imp.hidden, descending=True, stable=True)
    ax[0, 1].plot(range(len(order)), imp.hidden[order].numpy(), color="tab:gray", lw=1)
    kept = masks["hidden"][order].numpy()
    ax[0, 1].scatter([i for i, k in enumerate(kept) if k], imp.hidden[order][kept].numpy(), s=2, color="tab:blue", label="kept")
    ax[0, 1].set(title=f"hidden channels by importance ({int(kept.sum())}/{len(kept)} kept)", xlabel="rank", ylabel="importance")
    ax[0, 1].legend(loc="upper right")

    for a, name, key in ((ax[1, 0], "FFN channels", "ffn"), (ax[1, 1], "attention heads", "heads")):
        values = getattr(imp, key)
        if not values:
            a.set_axis_off()
            continue
        width = next(iter(values.values())).numel()
        grid = torch.stack([values[n] / values[n].max().clamp_min(1e-30) if n in values else torch.full((width,), float("nan"))
                            for n in numbers])  # fmt: skip
        grid = torch.where(masks[key], grid, torch.full_like(grid, float("nan")))
        a.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="viridis",
                 extent=(-0.5, grid.shape[1] - 0.5, L + 0.5, 0.5))  # fmt: skip
        a.set(title=f"{name} kept (colour: importance / layer max; blank: pruned)", xlabel="index", ylabel="layer")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result, out_dir: str, groups_before=None, groups_after=None, extra=None, title: str = "",
                 plot_png: bool = True) -> List[str]:  # fmt: skip
    """Write `prune_summary.json` (and `prune_report.png` unless `plot_png` is False) into `out_dir`; returns
    the paths written."""
    paths = [os.path.join(out_dir, "prune_summary.json")]
    with open(paths[0], "w") as f:
        json.dump(summary(result, groups_before, groups_after, extra), f, indent=2)
        f.write("\n")
    if plot_png:
        paths.append(os.path.join(out_dir, "prune_report.png"))
        plot(result, paths[1], title)
    return paths


def _mask(size: int, kept: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[kept.long()] = True
    return mask


def _share(values: torch.Tensor, mask: torch.Tensor) -> float:
    total = float(values.sum())
    return float(values[mask].sum()) / total if total > 0 else float(mask.float().mean())


def _heads(kept: List[int], total: int) -> str:
    return f"{len(kept)}/{total}" + ("" if len(kept) == total else f" {kept}")
