"""FastNAS: channel-width search for PyTorch vision models under a FLOPs or parameter budget.

    from megatron_prune import fastnas
    fastnas.profile(model, dummy_input)                        # the search space, before any search
    pruned, result = fastnas.prune(model, constraints={"flops": "50%"}, dummy_input=x,
                                   data_loader=loader, score_func=validate, checkpoint="search.pt")
    fastnas.save(pruned, "pruned.pt", result); fastnas.restore(fresh_model, "pruned.pt")
"""

from megatron_prune.fastnas.api import DEFAULTS, profile, prune, restore, save
from megatron_prune.fastnas.search import FastNASResult
from megatron_prune.fastnas.space import SearchSpace

__all__ = ["prune", "profile", "save", "restore", "FastNASResult", "SearchSpace", "DEFAULTS"]
