"""The prune command's flags: the parser (`build_parser`) and what the flags mean as options (targets, depth
controls, the world layout). No model, no weights: importing this module is cheap (`--help` is instant)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, Optional

from megatron_prune.errors import PruneConfigError
from megatron_prune.minitron.axes import AXES, SUPPORTED_AXES
from megatron_prune.minitron.depth import DepthOptions, parse_layer_list
from megatron_prune.minitron.distill.args import add_run_card_arguments
from megatron_prune.minitron.importance.criteria import describe, resolve_criteria
from megatron_prune.minitron.search.args import add_search_arguments

# The default job: SmolLM2-135M (hidden 576, FFN 1536, 9 heads, 30 layers) to 72.4% of its 134.5M parameters:
# the NAS winner at <= 100M parameters in benchmarks/quality (held-out perplexity 52.8 / 126.3, against
# 91.6 / 188.1 for hidden 512 + FFN 1024 at 71.3%).
DEFAULT_TARGET = {"ffn_hidden_size": 1024, "num_layers": 26}
REFERENCE_CALIB_SAMPLES = 1024  # what the reference's Megatron-LM pruning example calibrates on (--calib-size)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-prune",
        description="Minitron structured pruning of a Hugging Face causal LM through Megatron-core and Megatron-Bridge. "
        "Run under torchrun for TP/PP/DP; data parallelism is WORLD_SIZE / (TP x PP).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    m = p.add_argument_group("model and output")
    m.add_argument("--hf-model", "--pretrained-model-path", default=None,
                   help="HF model folder or hub id; none: SmolLM2-135M-Instruct, offline (the demo job)")
    m.add_argument("--load", default=None, metavar="DIR",
                   help="a Megatron-LM or Megatron-Bridge checkpoint (torch_dist) instead of --hf-model, loaded at this "
                        "run's TP/PP whatever it was saved at")  # fmt: skip
    m.add_argument("--ckpt-step", type=int, default=None, help="--load: the iteration to load (default: the latest)")
    m.add_argument("--tokenizer-model", default=None,
                   help="--load: HF tokenizer (folder or hub id) for the calibration text; default: the checkpoint's")
    m.add_argument("--output-dir", required=True, help="new directory for the pruned checkpoints and the report")
    m.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists and is not empty")
    m.add_argument("--save-format", choices=("hf", "megatron", "both"), default=None,
                   help="hf: OUT/hf (transformers); megatron: OUT/megatron (a Megatron-Bridge checkpoint, or with --load "
                        "the format loaded); both. Default: both for --hf-model, megatron for --load")  # fmt: skip
    m.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="weights while pruning and in the output; auto: the source checkpoint's (config.json)")
    m.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own Python code (transformers)")

    t = p.add_argument_group("targets (TransformerConfig names)")
    t.add_argument("--export-config", default=None, help='JSON, e.g. \'{"hidden_size": 512, "ffn_hidden_size": 1024}\'')
    for axis in SUPPORTED_AXES:
        t.add_argument(AXES[axis].flag, type=int, default=None, dest=f"target_{axis}", help=f"pruned {axis}: {AXES[axis].help}")

    c = p.add_argument_group("calibration")
    c.add_argument("--calib-data", default=None,
                   help="'default' (the packaged public-domain Jargon File excerpt, the default), files, a directory, "
                        "a glob, or a dataset name (name or org/name, :config); use text like the model's training data")
    c.add_argument("--calib-text-field", default="text", help="column holding the text (JSON/Parquet/datasets)")
    c.add_argument("--calib-split", default="train", help="split of a named dataset")
    c.add_argument("--calib-samples", "--calib-size", type=int, default=64,
                   help=f"calibration samples of --seq-length tokens (the reference's example uses {REFERENCE_CALIB_SAMPLES})")
    c.add_argument("--seq-length", type=int, default=256, help="tokens per calibration sample (at most max_position_embeddings)")
    c.add_argument("--micro-batch-size", type=int, default=4, help="samples per forward pass while calibrating")
    c.add_argument("--seed", type=int, default=1234, help="choice of calibration samples")
    c.add_argument("--scores-path", "--pruning-scores-path", default=None,
                   help="statistics file: reused if it exists (no calibration), else written; default OUT/importance_scores.pt")
    c.add_argument("--reuse-scores", action="store_true",
                   help="use --scores-path even though it was calibrated on other data than the calibration flags give")
    c.add_argument("--all-statistics", action="store_true",
                   help="collect every forward-only statistic, not only what --importance reads (a little slower; the "
                        "scores file then serves any forward-only criterion)")
    c.add_argument("--importance", default=None, metavar="AXIS=CRITERION,...",
                   help="importance criterion per axis, e.g. heads=output_contribution,ffn=taylor (axes: "
                        + ", ".join(a.alias for a in AXES.values()) + "; criteria: minitron, "
                        "output_contribution, taylor (a backward pass per calibration batch), block_influence; "
                        "'reference': the reference's); default: " + describe(resolve_criteria(None)))  # fmt: skip

    dep = p.add_argument_group("depth controls (layers are 1-indexed)")
    dep.add_argument("--layers-to-drop", default=None, metavar="LIST",
                     help="drop exactly these layers, e.g. 5,7-9 (overrides the ranking; sets --target-num-layers)")
    dep.add_argument("--protect-layers", default=None, metavar="LIST",
                     help="never drop these layers, also in NAS: numbers (-1 = last), ranges, first, last, attention")
    dep.add_argument("--iterative-depth", action="store_true",
                     help="re-score block influence after each dropped layer, as SLEB does (one more pass over the "
                          "calibration data per dropped layer)")  # fmt: skip

    par = p.add_argument_group("parallelism (the layout the model is imported and pruned at)")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP: ranks each layer is split over")
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP: stages the layers are spread over")
    par.add_argument("--expert-model-parallel-size", type=int, default=1,
                     help="EP: ranks the routed experts of a MoE model are spread over (within the data-parallel ranks)")
    par.add_argument("--expert-tensor-parallel-size", type=int, default=None, metavar="ETP",
                     help="ranks each routed expert's linears are split over (default: the TP size; 1: whole experts)")


    nas = add_search_arguments(p)
    nas.add_argument("--score-samples", type=int, default=16,
                     help="lm_loss: held-out samples of --seq-length tokens (from --score-data text if given, else "
                          "rows of --calib-data disjoint from the calibration rows)")  # fmt: skip

    chk = p.add_argument_group("checks and report")
    chk.add_argument("--skip-roundtrip-check", action="store_true", help="skip the HF/MCore logits comparisons")
    chk.add_argument("--roundtrip-tolerance", type=float, default=None, help="relative logits error allowed (default 1e-4 in float32; in bf16/fp16 2e-2 or twice the HF model's own rounding in that dtype, whichever is larger)")
    chk.add_argument("--no-report", action="store_true", help="skip the PNG (the JSON summary is always written)")
    chk.add_argument("--verbose", action="store_true", help="also show third-party warnings (Apex / Transformer Engine fallbacks, deprecations) and library logging")


    add_run_card_arguments(p)
    return p


def export_config_from_args(args: argparse.Namespace) -> Optional[Dict[str, int]]:
    """Targets from --export-config and --target-* (the two may be combined if they agree); None if none given."""
    target: Dict[str, int] = {}
    if args.export_config:
        try:
            target = json.loads(args.export_config)
        except json.JSONDecodeError as e:
            raise PruneConfigError(f"--export-config is not valid JSON: {e}") from None
        if not isinstance(target, dict):
            raise PruneConfigError(f"--export-config must be a JSON object of axis: size, got {args.export_config!r}")
    for axis in SUPPORTED_AXES:
        value = getattr(args, f"target_{axis}")
        if value is not None:
            if axis in target and target[axis] != value:
                raise PruneConfigError(f"{AXES[axis].flag}={value} contradicts --export-config {axis}={target[axis]}")
            target[axis] = value
    return target or None


def depth_options_from_args(args: argparse.Namespace):
    """`DepthOptions` from --layers-to-drop, --protect-layers and --iterative-depth."""

    drop = parse_layer_list(args.layers_to_drop) if args.layers_to_drop else []
    if any(not isinstance(n, int) for n in drop):
        raise PruneConfigError(f"--layers-to-drop {args.layers_to_drop!r}: give layer numbers and ranges (e.g. 5,7-9)")
    protect = parse_layer_list(args.protect_layers) if args.protect_layers else []
    return DepthOptions(tuple(drop), tuple(protect), args.iterative_depth)


def check_world(args: argparse.Namespace) -> int:
    """The data-parallel size, or PruneConfigError when the world size does not fit TP x PP."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise PruneConfigError(f"--tensor-model-parallel-size ({tp}) and --pipeline-model-parallel-size ({pp}) must be >= 1")
    if world % (tp * pp):
        raise PruneConfigError(
            f"world size {world} (torchrun --nproc-per-node x nodes) is not a multiple of "
            f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} = {tp * pp}"
        )
    ep, dp = args.expert_model_parallel_size, world // (tp * pp)
    etp = tp if args.expert_tensor_parallel_size is None else args.expert_tensor_parallel_size
    if ep < 1 or etp < 1 or (world // pp) % (etp * ep):  # megatron-core's expert grid: ETP x EP x expert-DP x PP
        raise PruneConfigError(f"--expert-tensor-parallel-size {etp} x --expert-model-parallel-size {ep} must divide the "
                               f"ranks of a pipeline stage, {world // pp} (world size {world} / PP {pp})")  # fmt: skip
    return dp
