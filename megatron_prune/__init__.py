"""megatron-prune: Minitron structured pruning of Megatron-core language models.

    pruned, result = megatron_prune.prune(model, export_config={"ffn_hidden_size": 1024},
                                          forward_loop=make_forward_loop(batches), scores_path="scores.pt")
"""

from megatron_prune.api import PruneResult, calibrate, count_params, prune
from megatron_prune.config import SUPPORTED_AXES, PruneConfigError, UnsupportedModelError
from megatron_prune.data.forward import make_forward_loop, run_forward
from megatron_prune.importance.scores_file import ScoresFileError

__version__ = "0.1.0"
__all__ = [
    "prune", "calibrate", "PruneResult", "count_params", "make_forward_loop", "run_forward", "SUPPORTED_AXES",
    "PruneConfigError", "ScoresFileError", "UnsupportedModelError",
]  # fmt: skip
