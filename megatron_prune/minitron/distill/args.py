"""The prune CLI's run-card flags: the distillation recipe and layout written into `distillation_run_card.yaml`.

    add_run_card_arguments(parser)
    layout, recipe = run_card_options_from_args(args, hf_config, shape.sizes())  # before any weights are read

Unset flags keep the guideline defaults of `run_card.Recipe`; the suggested TP/PP are then the pruning run's, or
the largest smaller sizes that divide the pruned model (`handoff`).
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Tuple

from megatron_prune.minitron.distill.run_card import Parallelism, Recipe, RunCardError, check_parallelism, override_recipe
from megatron_prune.minitron.search.args import count_arg

_RECIPE_FLAGS = ("seq_length", "micro_batch_size", "global_batch_size", "train_tokens", "lr", "min_lr", "lr_warmup_iters")
_LAYOUT_FLAGS = ("tensor_model_parallel_size", "pipeline_model_parallel_size")


def add_run_card_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = parser.add_argument_group("distillation run card (distillation_run_card.yaml; defaults: the Minitron guideline)")
    g.add_argument("--distill-seq-length", type=int, default=None,
                   help=f"default {Recipe.seq_length}, at most the model's max_position_embeddings")
    g.add_argument("--distill-micro-batch-size", type=int, default=None, help=f"default {Recipe.micro_batch_size}")
    g.add_argument("--distill-global-batch-size", type=int, default=None, help=f"default {Recipe.global_batch_size}")
    g.add_argument("--distill-train-tokens", type=lambda s: int(count_arg(s)), default=None,
                   help=f"token budget, e.g. 80B (default {Recipe.train_tokens / 1e9:.0f}B); train_iters follows")
    g.add_argument("--distill-lr", type=float, default=None, help=f"peak LR (default {Recipe.lr})")
    g.add_argument("--distill-min-lr", type=float, default=None, help=f"final LR of the linear decay (default {Recipe.min_lr})")
    g.add_argument("--distill-lr-warmup-iters", type=int, default=None,
                   help=f"warm-up steps (default {Recipe.lr_warmup_iters}); fewer than train_iters")
    g.add_argument("--distill-tensor-model-parallel-size", type=int, default=None,
                   help="default: the pruning run's, or the largest smaller size that divides the pruned model")
    g.add_argument("--distill-pipeline-model-parallel-size", type=int, default=None,
                   help="default: the pruning run's, or the largest smaller size that divides the pruned model's layers")
    return g  # fmt: skip


def run_card_options_from_args(args: argparse.Namespace, hf_config, sizes: Dict[str, int]) -> Tuple[Dict[str, int], Dict[str, Any]]:
    """({Parallelism field: size} given by flags, recipe overrides), checked now against the model to prune
    (`hf_config`, its `sizes`) so that a bad flag fails before calibration; the card checks the student's sizes."""
    recipe = {k: getattr(args, f"distill_{k}") for k in _RECIPE_FLAGS if getattr(args, f"distill_{k}", None) is not None}
    limit = getattr(hf_config, "max_position_embeddings", None)
    seq = {} if "seq_length" in recipe or not isinstance(limit, int) else {"seq_length": min(Recipe.seq_length, limit)}
    try:
        override_recipe(Recipe(), **seq, **recipe)  # the default length as build_run_card caps it
    except RunCardError as e:  # the recipe's messages name the distill command's flags; these are this one's
        raise RunCardError(str(e).replace("pass --", "pass --distill-")) from None
    layout = {k: getattr(args, f"distill_{k}") for k in _LAYOUT_FLAGS if getattr(args, f"distill_{k}", None) is not None}
    check_parallelism(Parallelism(**layout), {"teacher": sizes})
    return layout, recipe
