"""megatron-prune: Minitron structured pruning of Megatron-core language models.

    pruned, result = megatron_prune.prune(model, export_config={"ffn_hidden_size": 1024},
                                          forward_loop=make_forward_loop(batches), scores_path="scores.pt")
    pruned, result = megatron_prune.prune(model, constraints={"params": 100e6}, forward_loop=...,
                                          score_func=megatron_prune.lm_loss_score(held_out_batches))
"""

from megatron_prune.api import PruneResult, calibrate, count_params, prune
from megatron_prune.config import SUPPORTED_AXES, PruneConfigError, SearchConfig, UnsupportedModelError
from megatron_prune.data.forward import make_forward_loop, run_forward
from megatron_prune.data.scores import lm_loss_score, multiple_choice_score
from megatron_prune.importance.scores_file import ScoresFileError
from megatron_prune.search.counting import inventory_of, inventory_of_config
from megatron_prune.search.nas import SearchResult
from megatron_prune.search.plot import plot_candidates

__version__ = "0.1.0"
__all__ = [
    "prune", "calibrate", "PruneResult", "count_params", "make_forward_loop", "run_forward", "SUPPORTED_AXES",
    "PruneConfigError", "ScoresFileError", "UnsupportedModelError",
    "SearchConfig", "SearchResult", "lm_loss_score", "multiple_choice_score", "plot_candidates",
    "inventory_of", "inventory_of_config",
]  # fmt: skip
