"""megatron-prune: structured pruning inside the frameworks people train with. Three algorithms:

- Minitron (Megatron-core GPT/MoE/Mamba/hybrid models): `megatron_prune.prune`, the `megatron-prune` CLI
      pruned, result = megatron_prune.prune(model, export_config={"ffn_hidden_size": 1024},
                                            forward_loop=make_forward_loop(batches), scores_path="scores.pt")
      pruned, result = megatron_prune.prune(model, constraints={"params": 100e6}, forward_loop=...,
                                            score_func=megatron_prune.lm_loss_score(held_out_batches))
- FastNAS (vision `nn.Module`s, traced): `megatron_prune.fastnas.prune(model, constraints={"flops": "50%"}, ...)`
- GradNAS (Hugging Face LMs): `megatron_prune.gradnas.prune(model, constraints={"params": "70%"}, ...)`

The top-level names are imported on first use, so `from megatron_prune import fastnas` does not import
megatron-core.
"""

import importlib

__version__ = "0.1.0"

# name -> module that defines it (imported on first access; PEP 562)
_EXPORTS = {
    "prune": "megatron_prune.minitron.api", "calibrate": "megatron_prune.minitron.api", "PruneResult": "megatron_prune.minitron.api",
    "count_params": "megatron_prune.minitron.api",
    "SUPPORTED_AXES": "megatron_prune.minitron.config", "SearchConfig": "megatron_prune.minitron.config",
    "PruneConfigError": "megatron_prune.errors", "UnsupportedModelError": "megatron_prune.errors",
    "make_forward_loop": "megatron_prune.minitron.data.forward", "run_forward": "megatron_prune.minitron.data.forward",
    "lm_loss_score": "megatron_prune.minitron.data.scores", "multiple_choice_score": "megatron_prune.minitron.data.scores",
    "ScoresFileError": "megatron_prune.errors", "RunCardError": "megatron_prune.errors", "PruneError": "megatron_prune.errors", "RoundTripError": "megatron_prune.errors",
    "inventory_of": "megatron_prune.minitron.search.counting", "inventory_of_config": "megatron_prune.minitron.search.counting",
    "SearchResult": "megatron_prune.minitron.search.nas", "plot_candidates": "megatron_prune.minitron.search.plot",
    "DepthOptions": "megatron_prune.minitron.depth",
    "init_distributed": "megatron_prune.minitron.runtime.distributed",
    "destroy_distributed": "megatron_prune.minitron.runtime.distributed",
    "load_megatron_model": "megatron_prune.minitron.bridge.checkpoint", "find_checkpoint": "megatron_prune.minitron.bridge.checkpoint",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megatron_prune' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
