"""A fix for Megatron-Bridge 0.3.1 that is not about the CPU (applied on every machine; idempotent).

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

import functools


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
