"""Megatron-LM integration: prune the model your own Megatron-LM script has built, with Megatron-LM's flag names.

    from megatron_prune.minitron.megatron_lm import add_prune_args, prune_megatron_lm_model

    initialize_megatron(extra_args_provider=add_prune_args, args_defaults={"no_load_rng": True, "no_load_optim": True})
    args = get_args()
    model = get_model(model_provider, wrap_with_ddp=False)      # this rank's stage(s), any TP/PP
    load_checkpoint(model, None, None)                          # --load
    pruned, result, pruned_args = prune_megatron_lm_model(model, args)   # calibrates, prunes, saves to --save

The flags are those of Megatron-LM's post-training prune example (`--calib-size`, `--target-<axis>`,
`--layers-to-drop`, `--pruning-scores-path`) plus this package's (`--target-params` budgets, `--protect-layers`,
`--iterative-depth`, `--prune-importance`, `--calib-data`). Calibration rows are `--seq-length` tokens in micro-batches of
`--micro-batch-size`, Megatron-LM's own flags. Megatron-LM's `megatron.training` package is not needed here: the
model may come from anywhere, and `pruned_args` is Megatron-LM's namespace with the pruned sizes.
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional, Tuple

import torch

from megatron_prune.minitron.axes import AXES
from megatron_prune.errors import PruneConfigError
from megatron_prune.minitron.config import BUDGETS, SUPPORTED_AXES
from megatron_prune.common.log import log


def add_prune_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's `extra_args_provider`: the pruning flags in their own group. Returns the parser."""
    from megatron_prune.minitron.search.args import budget_arg

    g = parser.add_argument_group("megatron-prune")
    g.add_argument("--calib-size", type=int, default=1024, help="calibration samples of --seq-length tokens")
    g.add_argument("--calib-data", default="default", help="calibration text: files, a directory, a glob or a dataset name")
    for axis in SUPPORTED_AXES:
        g.add_argument(AXES[axis].flag, type=int, default=None, help=f"prune {axis} to this value")
    for budget in BUDGETS:
        g.add_argument(f"--target-{budget.replace('_', '-')}", type=budget_arg, default=None,
                       help="NAS: upper bound, a count (3B) or a percentage of the model's (60%%)")  # fmt: skip
    g.add_argument("--prune-top-k", type=int, default=1, help="NAS: candidates scored (1: the closest fit, unscored)")
    g.add_argument("--layers-to-drop", type=int, nargs="*", default=None, metavar="N", help="drop these layers (1-indexed)")
    g.add_argument("--protect-layers", default=None, help="never drop these layers, e.g. first,last or 1,-1")
    g.add_argument("--iterative-depth", action="store_true", help="re-score block influence after each dropped layer")
    g.add_argument("--pruning-scores-path", default=None, help="statistics file: reused if it exists, else written")
    g.add_argument("--prune-importance", default=None, help="importance criteria, e.g. heads=output_contribution")
    return parser


def prune_megatron_lm_model(model, args: argparse.Namespace, forward_loop: Optional[Callable] = None,
                            tokenizer=None, score_func: Optional[Callable] = None,
                            save: bool = True) -> Tuple[torch.nn.Module, object, argparse.Namespace]:  # fmt: skip
    """Prune this rank's stage of `model` (a module, a list of chunks, or wrapped in Float16Module/DDP) from the
    flags of `add_prune_args`, and with `save` and Megatron-LM's `--save` set, write it there as a Megatron-LM
    checkpoint (`release/`, the pruned args). `forward_loop`: calibration (default: `--calib-size` rows of
    `--calib-data` tokenised with `tokenizer`, default the HF tokenizer of `--tokenizer-model`). Returns (pruned
    stage, PruneResult, a copy of `args` with the pruned sizes). Collective."""
    from megatron_prune.minitron.api import prune
    from megatron_prune.minitron.bridge.checkpoint import megatron_lm_flags, pruned_megatron_lm_args, save_megatron_lm
    from megatron_prune.minitron.depth import DepthOptions, parse_layer_list

    stage = _unwrap(model)
    export_config = {axis: getattr(args, f"target_{axis}") for axis in SUPPORTED_AXES if getattr(args, f"target_{axis}", None) is not None}
    budgets = {b: getattr(args, f"target_{b}") for b in BUDGETS if getattr(args, f"target_{b}", None) is not None}
    if budgets and export_config:
        raise PruneConfigError("--target-<axis> sizes and NAS budgets (--target-params ...): give one")
    depth = DepthOptions(tuple(args.layers_to_drop or ()), tuple(parse_layer_list(args.protect_layers or "")), args.iterative_depth)
    if not export_config and not budgets and not depth.layers_to_drop:
        raise PruneConfigError("nothing to prune: pass --target-<axis> sizes, --layers-to-drop, or a --target-params budget")
    if forward_loop is None:
        forward_loop = calibration_loop(args, tokenizer)
    kwargs = dict(constraints=budgets, search={"top_k": args.prune_top_k}, score_func=score_func) if budgets else {}
    pruned, result = prune(stage, None if budgets else export_config, forward_loop, scores_path=args.pruning_scores_path,
                           criteria=args.prune_importance, depth=depth, **kwargs)  # fmt: skip
    pruned_args = pruned_megatron_lm_args(args, stage.config, pruned.config)
    log("pruned model flags for Megatron-LM: " + " ".join(megatron_lm_flags(args, pruned_args)))
    if save and getattr(args, "save", None):
        save_megatron_lm(pruned, pruned_args, args.save)
    return pruned, result, pruned_args


def calibration_loop(args: argparse.Namespace, tokenizer=None):
    """`make_forward_loop` over `--calib-size` rows of `--seq-length` tokens of `--calib-data`."""
    from megatron_prune.minitron.data.calibration import calibration_tokens, micro_batches
    from megatron_prune.minitron.data.forward import make_forward_loop

    if tokenizer is None:
        if not getattr(args, "tokenizer_model", None):
            raise PruneConfigError("calibration needs an HF tokenizer: pass --tokenizer-model (or a forward_loop)")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_model)
    rows = calibration_tokens(args.calib_data, tokenizer, args.calib_size, args.seq_length, getattr(args, "seed", 1234))
    return make_forward_loop(micro_batches(rows, args.micro_batch_size),
                             settings={"data": args.calib_data, "seed": getattr(args, "seed", 1234)})  # fmt: skip


def _unwrap(model) -> torch.nn.Module:
    """This rank's GPTModel/MambaModel: the first chunk of a list, without DDP/Float16Module wrappers."""
    stage = model[0] if isinstance(model, (list, tuple)) else model
    if isinstance(model, (list, tuple)) and len(model) > 1:
        raise PruneConfigError("virtual pipeline parallelism (several model chunks per rank) is not supported")
    while hasattr(stage, "module") and not hasattr(stage, "decoder"):
        stage = stage.module
    return stage
