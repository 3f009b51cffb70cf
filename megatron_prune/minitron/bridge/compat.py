"""Megatron-Bridge 0.3.1 adjustments that are not about the CPU (applied on every machine).

`logged_progress()`: while it is active, the bridge's weight conversion (import, HF export) reports progress as
plain log lines (`log.Progress`: count, rate, ETA, on global rank 0) instead of a `rich` progress bar, which
turns into control sequences and one-line-per-refresh noise in log files and under torchrun.

`apply_bridge_compat()` (idempotent) fixes these bugs:

The DeepSeek-V2/V3 bridges map routed experts only under grouped-GEMM names (`...mlp.experts.linear_fc1.weight*`),
so a DeepSeek model built with SequentialMLP experts (what megatron-prune prunes) imports none of its experts
("No mapping found", then an AttributeError). Their registries get the two SequentialMLP mappings the Qwen3-MoE
bridge has (`...mlp.experts.local_experts.*.linear_fc1/fc2.weight`), on the same HF names.

Exporting an MoE model whose experts are a `SequentialMLP` (names `...mlp.experts.local_experts.{e}.linear_fc1
.weight`, the layout megatron-prune prunes) to Hugging Face crashes in
`MegatronParamMapping.gather_from_ep_ranks`: it parses the expert number from the grouped-GEMM name
(`...mlp.experts.linear_fc1.weight{e}`) and gets `int('')`. It only needs that number to gather the expert
over expert-parallel ranks; at expert-parallel size 1 there is nothing to gather, so the weight goes out
under the HF name the mapping already resolved (the expert number of a SequentialMLP name is global there).
Grouped-GEMM names take the bridge's own path. Lives here, not in `runtime/cpu.py`, because a GPU run exporting
SequentialMLP experts hits the same bug.

At expert-parallel size > 1 the same layout meets two more: the bridge numbers a rank's experts globally only in
grouped-GEMM names (`_megatron_local_name_to_global`), so every EP rank imported HF experts 0..E/EP-1 into its
SequentialMLP; and the export's gather over EP ranks parses the grouped-GEMM name. Both are done here for
`local_experts.{e}` names: rank r's local expert e is global expert r*E/EP + e, and an exported expert is
all-gathered over the EP ranks under the HF names of the experts every rank holds in that slot.
"""

from __future__ import annotations

import contextlib
import functools
import re

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


_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


def apply_bridge_compat() -> None:
    """Patch the bridge's expert numbering and its gather over EP ranks for SequentialMLP experts (see the module)."""
    import torch
    from megatron.bridge.models.conversion import model_bridge
    from megatron.bridge.models.conversion.param_mapping import MegatronParamMapping
    from megatron.core import parallel_state

    gather = MegatronParamMapping.gather_from_ep_ranks
    if getattr(gather, "_sequential_experts", False):
        return

    @functools.wraps(gather)
    def gather_from_ep_ranks(self, megatron_weights, megatron_module, hf_param_name):
        match = _LOCAL_EXPERT.search(str(self.megatron_param))
        if match is None:
            return gather(self, megatron_weights, megatron_module, hf_param_name)
        if self.ep_size == 1:
            return {str(hf_param_name): megatron_weights}
        per_rank = None if megatron_module is None else self._get_config(megatron_module).num_moe_experts // self.ep_size
        per_rank = self.broadcast_obj_from_pp_rank(per_rank, "num_experts_per_rank")
        slot = int(match[1]) % per_rank  # the name carries the global expert number
        names = [re.sub(r"experts\.(\d+)", f"experts.{slot + per_rank * k}", str(hf_param_name)) for k in range(self.ep_size)]
        gathered = [torch.empty_like(megatron_weights) for _ in range(self.ep_size)]
        torch.distributed.all_gather(gathered, megatron_weights.contiguous(), group=self.ep_group)
        return dict(zip(names, gathered))

    to_global = model_bridge._megatron_local_name_to_global

    @functools.wraps(to_global)
    def local_name_to_global(models, config, param_name, vp_stage=None):
        name = to_global(models, config, param_name, vp_stage)
        match = _LOCAL_EXPERT.search(name)
        group = parallel_state.get_expert_model_parallel_group()
        if match is not None and group.size() > 1:
            number = int(match[1]) + config.num_moe_experts // group.size() * group.rank()
            name = name[: match.start(1)] + str(number) + name[match.end(1) :]
        return name

    _add_sequential_expert_mappings()
    gather_from_ep_ranks._sequential_experts = True
    MegatronParamMapping.gather_from_ep_ranks = gather_from_ep_ranks
    model_bridge._megatron_local_name_to_global = local_name_to_global


def _add_sequential_expert_mappings() -> None:
    """DeepSeek-V2/V3 bridges: SequentialMLP expert mappings next to their grouped-GEMM ones (see the module)."""
    from megatron.bridge.models.conversion.mapping_registry import MegatronMappingRegistry
    from megatron.bridge.models.conversion.param_mapping import AutoMapping, GatedMLPMapping
    from megatron.bridge.models.deepseek.deepseek_v2_bridge import DeepSeekV2Bridge
    from megatron.bridge.models.deepseek.deepseek_v3_bridge import DeepSeekV3Bridge

    experts, hf = "decoder.layers.*.mlp.experts.local_experts.*", "model.layers.*.mlp.experts.*"
    for bridge in (DeepSeekV2Bridge, DeepSeekV3Bridge):
        original = bridge.mapping_registry

        @functools.wraps(original)
        def mapping_registry(self, original=original):
            return MegatronMappingRegistry(
                *original(self).mappings,
                GatedMLPMapping(megatron_param=f"{experts}.linear_fc1.weight", gate=f"{hf}.gate_proj.weight", up=f"{hf}.up_proj.weight"),
                AutoMapping(megatron_param=f"{experts}.linear_fc2.weight", hf_param=f"{hf}.down_proj.weight"),
            )

        bridge.mapping_registry = mapping_registry
