"""GradNAS: per-layer attention heads and MLP channels of Hugging Face language models, ranked by gradients of a
task loss and pruned to a FLOPs or parameter budget.

    from megatron_prune import gradnas
    gradnas.profile(model, input_ids)                                   # the search space, before any gradient
    pruned, result = gradnas.prune(model, constraints={"params": "70%"}, dummy_input=input_ids,
                                   data_loader=batches, checkpoint="grads.pt")
    gradnas.save(pruned, "pruned.pt", result); gradnas.restore(fresh_model, "pruned.pt")
    gradnas.count(pruned, input_ids)                                    # params and FLOPs, measured

Supported: BERT, RoBERTa, DistilBERT, GPT-2, GPT-J, Llama, Mistral, Qwen2, Qwen3 (see `families.py`).
"""

from megatron_prune.gradnas.api import DEFAULTS, profile, prune, restore, save
from megatron_prune.gradnas.families import SUPPORTED
from megatron_prune.gradnas.search import GradNASResult
from megatron_prune.gradnas.space import SearchSpace, count

__all__ = ["prune", "profile", "save", "restore", "count", "GradNASResult", "SearchSpace", "DEFAULTS", "SUPPORTED"]
