"""A plot of a NAS run: each scored candidate's count in the primary budget against its score, the
budget as a dashed line, the winner starred. Needs matplotlib (`pip install megatron-prune[report]`);
draws with the Agg canvas, so no display and no global pyplot state."""

from __future__ import annotations

from typing import Optional

_AXIS = {"params": "parameters", "active_params": "active parameters", "memory_mb": "inference memory (MB)"}


def plot_candidates(result, path: str, metric: Optional[str] = None) -> str:
    """Write the plot of `result` (a PruneResult from a NAS prune, or its `.search`) to `path` (the
    extension picks the format: .png, .pdf, .svg). `metric`: the x axis, default the primary budget."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot_candidates needs matplotlib: pip install 'megatron-prune[report]'") from e
    search = getattr(result, "search", result)
    if search is None or not hasattr(search, "candidates"):
        raise ValueError("plot_candidates needs the result of a NAS prune (constraints=...)")
    metric = metric or next(iter(search.budgets))
    scored = [(i, c) for i, c in enumerate(search.candidates) if c.score is not None]
    if not scored:
        raise ValueError("no candidate was scored (top_k=1 without score_func): nothing to plot")
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs, ys = [c.counts.get(metric) for _, c in scored], [c.score for _, c in scored]
    ax.scatter(xs, ys, color="tab:blue", label=f"top {len(search.candidates)} candidates")
    for (i, _), x, y in zip(scored, xs, ys):
        ax.annotate(str(i + 1), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if metric in search.budgets:
        ax.axvline(search.budgets[metric], color="tab:red", linestyle="--", label=f"budget {metric}")
    best = search.best
    if best.score is not None:
        text = ", ".join(f"{k}={v}" for k, v in best.export_config.items())
        ax.scatter([best.counts.get(metric)], [best.score], marker="*", s=250, color="tab:orange", zorder=3, label="winner")
        ax.set_title(f"winner: {text}", fontsize=9)
    ax.set_xlabel(_AXIS[metric])
    ax.set_ylabel("score (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path
