"""`megatron-prune`: prune a Hugging Face model with Minitron and write pruned HF and Megatron checkpoints.

    torchrun --nproc-per-node P -m megatron_prune --hf-model PATH --target-ffn-hidden-size 1024 --output-dir OUT
    megatron-prune --output-dir OUT          # the offline default: SmolLM2-135M to ~70% of its parameters

Every check of the user's input runs before the model's weights are read (`preflight.py`); calibration data is
tokenised before the model is imported. OUT appears complete or not at all (never after Ctrl-C, which exits 130
keeping the calibration statistics saved so far: the same command resumes):
    OUT/hf/                  the pruned model as a Hugging Face folder (config, tokenizer, safetensors)
    OUT/megatron/            a Megatron-Bridge checkpoint that carries its model config and tokenizer
    OUT/prune_summary.json   sizes, parameters, per-layer importance, round-trip results, dtype, statistics' origin
    OUT/prune_report.png     block influence, hidden-channel importance, FFN/head keep masks
    OUT/importance_scores.pt calibration statistics (unless --scores-path): reuse them to re-prune
    OUT/distillation_run_card.yaml  student, teacher, layout and a starting recipe for `python -m megatron_prune.minitron.distill`
                             and launch/distill.sh (megatron_prune/minitron/distill/run_card.py has the schema)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace
from typing import Dict, List, Optional

from megatron_prune.minitron.axes import AXES
from megatron_prune.minitron.config import SUPPORTED_AXES
from megatron_prune.errors import PruneConfigError
from megatron_prune.minitron.importance.criteria import describe, needing_backward, resolve_criteria
from megatron_prune.minitron.runtime.command import run_command

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

    from megatron_prune.minitron.search.args import add_search_arguments

    nas = add_search_arguments(p)
    nas.add_argument("--score-samples", type=int, default=16,
                     help="lm_loss: held-out samples of --seq-length tokens (from --score-data text if given, else "
                          "rows of --calib-data disjoint from the calibration rows)")  # fmt: skip

    chk = p.add_argument_group("checks and report")
    chk.add_argument("--skip-roundtrip-check", action="store_true", help="skip the HF/MCore logits comparisons")
    chk.add_argument("--roundtrip-tolerance", type=float, default=None, help="relative logits error allowed (default 1e-4 fp32, 2e-2 bf16)")
    chk.add_argument("--no-report", action="store_true", help="skip the PNG (the JSON summary is always written)")
    chk.add_argument("--verbose", action="store_true", help="also show third-party warnings (Apex / Transformer Engine fallbacks, deprecations) and library logging")

    from megatron_prune.minitron.distill.args import add_run_card_arguments

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
    from megatron_prune.minitron.depth import DepthOptions, parse_layer_list

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
    return world // (tp * pp)


def run(args: argparse.Namespace) -> dict:
    """The whole job; returns the JSON summary. Collective under torchrun."""
    from megatron_prune.minitron.api import prune
    from megatron_prune.minitron.bridge import compare_with_hf, import_hf_model, save_hf, save_megatron
    from megatron_prune.minitron.bridge.checkpoint import compare_with_reload, hf_exporter, load_megatron_model, save_checkpoint_like
    from megatron_prune.minitron.distill.handoff import write_prune_run_card
    from megatron_prune.common.log import log
    from megatron_prune.minitron.output import atomic_output_dir
    from megatron_prune.minitron.report import format_tables, parameter_groups, write_report
    from megatron_prune.minitron.search.nas import search_record
    from megatron_prune.minitron.search.plot import plot_candidates

    started = time.perf_counter()
    job = prepare(args)
    ctx, source, out = job.ctx, job.source, job.out
    if job.checkpoint is not None:
        model = load_megatron_model(source, info=job.checkpoint, tokenizer_model=args.tokenizer_model).model
        imported = hf_exporter(job.checkpoint, model) if job.save_format != "megatron" else None
    else:
        imported = import_hf_model(source, dtype=job.dtype, trust_remote_code=args.trust_remote_code)
        model = imported.model
    check_tokens = job.loop.batches[0][:2, :64]
    checks: List = []

    def check(model, hf_dir: str, name: str) -> None:
        if not args.skip_roundtrip_check:
            checks.append(_checked(compare_with_hf(model, hf_dir, check_tokens, name, job.tolerance, args.trust_remote_code)))

    if job.checkpoint is None:
        check(model, source, "HF source vs imported MCore")
    groups_before = parameter_groups(model, ctx)
    with atomic_output_dir(args.output_dir, args.overwrite) as tmp:
        nas = dict(constraints=job.budgets, score_func=job.score_func, search=job.search.search) if job.budgets else {}
        pruned, result = prune(model, job.target, job.loop, scores_path=job.scores_path, criteria=job.criteria,
                               reuse_scores=args.reuse_scores, all_statistics=args.all_statistics, depth=job.depth, **nas)  # fmt: skip
        groups_after = parameter_groups(pruned, ctx)
        ctx.on_main(lambda: print("\n" + format_tables(result, groups_before, groups_after) + "\n", flush=True))
        hf_dir, megatron_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "megatron")
        extra = {}
        if job.checkpoint is not None:
            extra.update(save_checkpoint_like(job.checkpoint, model, pruned, megatron_dir, job.tokenizer_path))
            if not args.skip_roundtrip_check:
                checks.append(_checked(compare_with_reload(pruned, megatron_dir, check_tokens, "pruned MCore vs reloaded checkpoint",
                                                           args.tokenizer_model)))  # fmt: skip
        if job.save_format in ("hf", "both"):
            save_hf(imported, pruned, result.plan.kept_layers, hf_dir)
            check(pruned, hf_dir, "pruned MCore vs exported HF")
        if job.save_format in ("megatron", "both") and job.checkpoint is None:
            save_megatron(imported, pruned, megatron_dir, hf_dir if job.save_format == "both" else source)
        extra = {
            "source": str(source), "source_format": job.checkpoint.format if job.checkpoint else "hf", **extra,
            "output_dir": str(out), "save_format": job.save_format,
            "dtype": _name(job.dtype), "source_dtype": _name(job.source_dtype),
            "parallelism": {"tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size},
            "calibration_micro_batch_size": args.micro_batch_size,
            "roundtrip_checks": [c.__dict__ | {"ok": c.ok} for c in checks],
            "wall_time_s": round(time.perf_counter() - started, 1),
        }  # fmt: skip
        if not args.scores_path:
            extra["scores_path"] = str(out / "importance_scores.pt")
        if result.search is not None:
            extra["nas"] = search_record(result.search)
        if result.depth is not None:
            extra["depth"] = result.depth
        title = f"{os.path.basename(str(source).rstrip('/'))}: {_sizes(result)}"

        def write_outputs() -> None:
            write_report(result, str(tmp), groups_before, groups_after, extra, title, plot_png=not args.no_report)
            if result.search is not None and not args.no_report:
                plot_candidates(result, os.path.join(tmp, "nas_candidates.png"))
            if not args.scores_path:  # published with the rest
                os.replace(job.scores_path, os.path.join(tmp, "importance_scores.pt"))
            vocab = job.checkpoint.vocab_size() if job.checkpoint else imported.bridge.hf_pretrained.config.vocab_size
            write_prune_run_card(result, str(tmp), str(out), source, vocab, job.save_format, ctx, job.card_layout,
                                 dtypes=(_name(job.dtype), _name(job.source_dtype)), megatron_source=job.checkpoint is not None,
                                 tokenizer=job.tokenizer_path if job.checkpoint is not None else None, **job.card_recipe)  # fmt: skip

        ctx.on_main(write_outputs)
    log(f"done in {time.perf_counter() - started:.0f}s: {result.params_before:,} -> {result.params_after:,} parameters "
        f"({100 * result.params_after / result.params_before:.1f}%), written to {out}")  # fmt: skip
    return extra


def prepare(args: argparse.Namespace) -> SimpleNamespace:
    """Every check that needs no weights, in order: flags, layout, output directory, the model's config and weight
    files, targets or budgets (percentages resolved from the config's counts), calibration data, an existing
    scores file. Initialises torch.distributed. Returns what the job needs."""
    from megatron_prune.minitron.bridge import check_hf_source
    from megatron_prune.minitron.bridge.checkpoint import find_checkpoint
    from megatron_prune.minitron.bridge.hf_import import provider_inventory
    from megatron_prune.minitron.bridge.offline_model import smollm2_folder
    from megatron_prune.minitron.config import ModelShape, layer_symbols, validate_export_config
    from megatron_prune.minitron.distill.args import run_card_options_from_args
    from megatron_prune.common.log import log
    from megatron_prune.minitron.output import check_output_dir
    from megatron_prune.minitron.preflight import check_budgets, check_sequence_length, check_weight_files, resolve_dtype
    from megatron_prune.minitron.runtime.distributed import init_distributed
    from megatron_prune.minitron.runtime.parallel import ParallelContext
    from megatron_prune.minitron.search.args import search_options_from_args

    criteria = resolve_criteria(args.importance)
    target = export_config_from_args(args)
    if target is None and args.layers_to_drop:  # the layers to drop are the target (of num_layers)
        target = {}
    search = search_options_from_args(args)
    if args.load and args.hf_model:
        raise PruneConfigError("--load and --hf-model name two models: give one")
    if (args.ckpt_step is not None or args.tokenizer_model) and not args.load:
        raise PruneConfigError("--ckpt-step and --tokenizer-model apply to --load (a Megatron checkpoint)")
    default_job = args.hf_model is None and args.load is None
    save_format = args.save_format or ("megatron" if args.load else "both")
    if search.constraints is not None:
        if target is not None and not args.layers_to_drop:
            raise PruneConfigError("--export-config/--target-<axis> sizes cannot be combined with NAS budgets (--target-params...): give one")
        if search.score.name == "mmlu" and not args.score_data:
            raise PruneConfigError("--score-func mmlu needs --score-data (a JSONL file of question/choices/answer)")
    elif target is None:
        if not default_job:
            raise PruneConfigError("no target given: pass --export-config or --target-<axis> sizes, or a NAS budget (--target-params)")
        target = dict(DEFAULT_TARGET)
    dp = check_world(args)
    out = check_output_dir(args.output_dir, args.overwrite)
    _check_apart(out, {"--hf-model": args.hf_model, "--load": args.load, "--scores-path": args.scores_path,
                       "--calib-data": args.calib_data, "--score-data": args.score_data})  # fmt: skip
    if args.scores_path and os.path.isdir(args.scores_path):
        raise PruneConfigError(f"--scores-path {args.scores_path!r} is a directory; give a file path")

    init_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, seed=args.seed)
    ctx = ParallelContext.from_megatron()
    if default_job:
        goal = _compact(target) if target is not None else "the NAS budget"
        log(f"no --hf-model: pruning the offline demo model SmolLM2-135M-Instruct to {goal} "
            "(pass --hf-model PATH to prune your model)")  # fmt: skip
    checkpoint = None
    if args.load:  # configs only: the weights are read once every check has passed
        checkpoint = find_checkpoint(args.load, args.ckpt_step)
        source, provider = args.load, checkpoint.config
        hf_config = SimpleNamespace(max_position_embeddings=checkpoint.max_positions(), dtype=checkpoint.dtype())
        tokenizer_path = args.tokenizer_model or checkpoint.tokenizer_path()
        if tokenizer_path is None:
            raise PruneConfigError(f"--load {args.load!r}: the checkpoint names no Hugging Face tokenizer for the calibration "
                                   "text; pass --tokenizer-model (an HF tokenizer folder or hub id)")  # fmt: skip
        log(f"--load: {checkpoint.format} checkpoint {checkpoint.path}")
        if save_format != "megatron" and checkpoint.hf_model() is None:
            raise PruneConfigError(f"--save-format {save_format}: a Hugging Face export needs the HF architecture, which only a "
                                   "Megatron-Bridge checkpoint converted from a local HF folder names (hf_model_id); "
                                   "save as megatron")  # fmt: skip
    else:
        source = smollm2_folder() if default_job else args.hf_model
        hf_config, provider = check_hf_source(source, args.trust_remote_code)
        ctx.on_main(lambda: check_weight_files(source, hf_config, args.trust_remote_code))
        tokenizer_path = source
    check_sequence_length(args.seq_length, hf_config)
    source_dtype = resolve_dtype("auto", hf_config)
    dtype = resolve_dtype(args.dtype, hf_config)
    shape = ModelShape.from_config(provider)
    card_layout, card_recipe = run_card_options_from_args(args, hf_config, shape.sizes())
    depth_options = depth_options_from_args(args)
    depth = depth_options.resolve(shape.num_layers, layer_symbols(provider))
    if depth.layers_to_drop and search.constraints is not None:
        raise PruneConfigError("--layers-to-drop fixes the depth, which NAS searches: give sizes instead of a budget, "
                               "or --protect-layers to keep layers out of the search")  # fmt: skip
    if target is not None and (depth.layers_to_drop or depth.protected):
        layers = depth.check_target(shape.num_layers, target.get("num_layers"))
        target = {**target, "num_layers": layers} if layers != shape.num_layers else target
    budgets = None
    if target is not None:
        validate_export_config(target, shape, pp_size=ctx.pp_size, tp_size=ctx.tp_size)
    else:  # counted from the config: a budget that cannot work fails before the import, and "60%" is resolved
        inventory = checkpoint.inventory(ctx.tp_size) if checkpoint else provider_inventory(provider, ctx.tp_size)
        budgets = check_budgets(search.constraints, search.search, inventory, shape, ctx.tp_size, ctx.pp_size)
        log(f"NAS budgets: {', '.join(f'{k} <= {v:,.0f}' for k, v in budgets.items())}")
    if args.calib_data is None and not default_job:
        log(f"warning: no --calib-data: calibrating on the packaged Jargon File excerpt ({args.calib_samples} x "
            f"{args.seq_length} tokens of public-domain computing folklore); pass text like your model's training data (the reference "
            f"calibrates on {REFERENCE_CALIB_SAMPLES} samples)")  # fmt: skip
    calib_data = args.calib_data or "default"

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=args.trust_remote_code)
    batches, score_func = _calibration_and_score(args, calib_data, search, tokenizer)
    if len(batches) < dp:
        raise PruneConfigError(f"{len(batches)} micro-batches cannot feed {dp} data-parallel replicas: raise --calib-samples")
    from megatron_prune.minitron.data.forward import make_forward_loop

    settings = {"data": calib_data, "seed": args.seed, "text_field": args.calib_text_field, "split": args.calib_split}
    loop = make_forward_loop(batches, backward=bool(needing_backward(criteria)), settings=settings)
    # the statistics live outside the temporary directory, so a failed or interrupted run keeps them: the same
    # command resumes without calibrating (and NAS at the next unscored candidate)
    scores_path = args.scores_path or str(out.parent / f".{out.name}.importance_scores.pt")
    if checkpoint is None:  # (a Megatron checkpoint's scores file is checked once the model is loaded)
        _precheck_scores(scores_path, provider, criteria, loop.calibration, args, ctx, shape, dtype)
    log(f"calibration data: {args.calib_samples} samples x {args.seq_length} tokens from {calib_data!r}, "
        f"micro-batch {args.micro_batch_size}; TP={ctx.tp_size} PP={ctx.pp_size} DP={dp}")  # fmt: skip
    tolerance = args.roundtrip_tolerance
    if tolerance is None:
        import torch

        tolerance = 1e-4 if dtype == source_dtype == torch.float32 else 2e-2
    return SimpleNamespace(ctx=ctx, source=source, out=out, target=target, budgets=budgets, search=search, criteria=criteria,
                           dtype=dtype, source_dtype=source_dtype, tolerance=tolerance, loop=loop, score_func=score_func,
                           scores_path=scores_path, card_layout=card_layout, card_recipe=card_recipe, depth=depth_options,
                           checkpoint=checkpoint, tokenizer_path=tokenizer_path, save_format=save_format)  # fmt: skip


def _precheck_scores(scores_path: str, provider, criteria, calibration, args, ctx, shape, dtype) -> None:
    """An existing scores file, checked from the config before the import (architecture, statistics, data)."""
    from megatron_prune.minitron.bridge.hf_import import finalized_provider
    from megatron_prune.minitron.importance.calibration import precheck_scores_file
    from megatron_prune.minitron.importance.criteria import criteria_at_layout

    if not ctx.broadcast_object(os.path.exists(scores_path)):
        return
    at_layout = criteria_at_layout(criteria, shape.num_query_groups, ctx.tp_size)[0]
    config = finalized_provider(provider, ctx.tp_size, ctx.pp_size, dtype)
    ctx.on_main(lambda: precheck_scores_file(scores_path, config, at_layout, calibration, args.reuse_scores))


def _calibration_and_score(args, calib_data: str, search, tokenizer):
    """Calibration micro-batches and, for NAS, the score function. lm_loss scores on --score-samples rows of
    --score-data, or else on rows of --calib-data disjoint from the calibration rows (which do not depend on them)."""
    from megatron_prune.minitron.data.calibration import calibration_tokens, micro_batches
    from megatron_prune.minitron.data.scores import make_score_func

    scored = search.constraints is not None and search.search.top_k > 1  # one candidate needs no score
    carve = args.score_samples if scored and search.score.name == "lm_loss" and not args.score_data else 0
    rows = calibration_tokens(calib_data, tokenizer, args.calib_samples, args.seq_length, args.seed, args.calib_text_field,
                              args.calib_split, held_out=carve)  # fmt: skip
    batches = micro_batches(rows[: args.calib_samples], args.micro_batch_size)
    if not scored:
        return batches, None
    held_out = rows[args.calib_samples :]
    if search.score.name == "lm_loss" and args.score_data:
        held_out = calibration_tokens(args.score_data, tokenizer, args.score_samples, args.seq_length, args.seed + 1,
                                      args.calib_text_field, args.calib_split)  # fmt: skip
    try:
        if search.score.name == "lm_loss" and len(held_out) % search.score.batch_size:
            raise ValueError(f"--score-samples ({len(held_out)}) must be a multiple of --score-batch-size ({search.score.batch_size})")
        score_batches = list(held_out.split(search.score.batch_size)) if len(held_out) else None
        return batches, make_score_func(search.score, score_batches, tokenizer)
    except (ValueError, OSError) as e:
        raise PruneConfigError(f"score function {search.score.name}: {e}") from None


def _check_apart(out, inputs) -> None:
    """Refuse an --output-dir that is, holds, or lies inside an input: publishing (or --overwrite) would
    replace it, or the source folder would be written into."""
    for flag, value in inputs.items():
        if not value or value == "default":
            continue
        for part in str(value).split(","):
            path = os.path.abspath(os.path.expanduser(part.strip()))
            if not os.path.exists(path) and flag != "--scores-path":  # e.g. a hub id or a dataset name
                continue
            inside = os.path.commonpath([path, str(out)])
            if inside in (path, str(out)):
                raise PruneConfigError(f"--output-dir {str(out)!r} overlaps {flag} {part.strip()!r}: choose a separate directory")


def _checked(check):
    from megatron_prune.common.log import log

    log(str(check))
    if not check.ok:
        raise RuntimeError(f"round-trip check failed: {check} (nothing was written; --skip-roundtrip-check skips it)")
    return check


def _sizes(result) -> str:
    return ", ".join(f"{k} {result.original_sizes[k]}→{v}" for k, v in result.export_config.items() if result.original_sizes[k] != v)


def _compact(sizes: Dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items())


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def main(argv: Optional[List[str]] = None) -> int:
    return run_command("megatron-prune", run, build_parser().parse_args(argv))
