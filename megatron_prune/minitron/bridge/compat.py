"""Megatron-Bridge 0.3.1 adjustments that are not about the CPU (applied on every machine).

`logged_progress()`: while it is active, the bridge's weight conversion (import, HF export) reports progress as
plain log lines (`log.Progress`: count, rate, ETA, on global rank 0) instead of a `rich` progress bar, which
turns into control sequences and one-line-per-refresh noise in log files and under torchrun.

`apply_bridge_compat()` (idempotent) fixes one bug:

Exporting an MoE model whose experts are a `SequentialMLP` (names `...mlp.experts.local_experts.{e}.linear_fc1
.weight`, the layout megatron-prune prunes) to Hugging Face crashes in
`MegatronParamMapping.gather_from_ep_ranks`: it parses the expert number from the grouped-GEMM name
(`...mlp.experts.linear_fc1.weight{e}`) and gets `int('')`. It only needs that number to gather the expert
over expert-parallel ranks; at expert-parallel size 1 there is nothing to gather, so the weight goes out
under the HF name the mapping already resolved (the expert number of a SequentialMLP name is global there).
Grouped-GEMM names and EP > 1 take the bridge's own path. Lives here, not in `runtime/cpu.py`, because a GPU
run exporting SequentialMLP experts hits the same bug.
"""

from __future__ import annotations

import contextlib
import functools

from megatron_prune.common.log import Progress


@contextlib.contextmanager
def logged_progress(label: str):
    """Replace the bridge's progress bar by `Progress` lines labelled `label` while the block runs."""
    from megatron.bridge.models.conversion.model_bridge import MegatronModelBridge

    original = MegatronModelBridge._with_progress_tracking

    def tracked(self, tasks, description, show_progress=True):
        meter = Progress(label, len(tasks), unit="tensors", scale=0)
        for task in tasks:
            yield task
            meter.step()
        meter.done()

    MegatronModelBridge._with_progress_tracking = tracked
    try:
        yield
    finally:
        MegatronModelBridge._with_progress_tracking = original


def apply_bridge_compat() -> None:
    """Patch `MegatronParamMapping.gather_from_ep_ranks` for SequentialMLP experts at EP=1 (see the module)."""
    from megatron.bridge.models.conversion.param_mapping import MegatronParamMapping

    gather = MegatronParamMapping.gather_from_ep_ranks
    if getattr(gather, "_sequential_experts", False):
        return

    @functools.wraps(gather)
    def gather_from_ep_ranks(self, megatron_weights, megatron_module, hf_param_name):
        if ".local_experts." in str(self.megatron_param) and self.ep_size == 1:
            return {str(hf_param_name): megatron_weights}
        return gather(self, megatron_weights, megatron_module, hf_param_name)

    gather_from_ep_ranks._sequential_experts = True
    MegatronParamMapping.gather_from_ep_ranks = gather_from_ep_ranks
