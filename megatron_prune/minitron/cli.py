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
import os
import time
from types import SimpleNamespace
from typing import List, Optional

import torch

from megatron_prune.common.log import log
from megatron_prune.errors import PruneConfigError, RoundTripError
# the steps that read or write weights are called through their modules (`api.prune`, `bridge.import_hf_model`,
# `megatron_checkpoint.load_megatron_model`, ...), so tests can replace them and prove no weights were read
from megatron_prune.minitron import api, bridge
from megatron_prune.minitron.bridge import checkpoint as megatron_checkpoint
from megatron_prune.minitron.bridge.checkpoint import find_checkpoint
from megatron_prune.minitron.bridge.hf_import import finalized_provider, provider_inventory
from megatron_prune.minitron.bridge.offline_model import smollm2_folder
from megatron_prune.minitron.bridge.roundtrip import dtype_name
from megatron_prune.minitron.cli_args import (  # noqa: F401  (build_parser: the parser of this command)
    DEFAULT_TARGET, REFERENCE_CALIB_SAMPLES, build_parser, check_world, depth_options_from_args, export_config_from_args,
)
from megatron_prune.minitron.axes import format_sizes
from megatron_prune.minitron.config import ModelShape, layer_symbols, validate_export_config
from megatron_prune.minitron.data.calibration import calibration_tokens, micro_batches
from megatron_prune.minitron.data.forward import make_forward_loop
from megatron_prune.minitron.data.scores import make_score_func
from megatron_prune.minitron.distill.args import run_card_options_from_args
from megatron_prune.minitron.distill.handoff import write_prune_run_card
from megatron_prune.minitron.importance.calibration import precheck_scores_file
from megatron_prune.minitron.importance.criteria import criteria_at_layout, needing_backward, resolve_criteria
from megatron_prune.minitron.output import atomic_output_dir, check_output_dir
from megatron_prune.minitron.preflight import check_sequence_length, check_weight_files, resolve_dtype
from megatron_prune.minitron.report import format_tables, parameter_groups, write_report
from megatron_prune.minitron.runtime.command import run_command
from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.search.args import search_options_from_args
from megatron_prune.minitron.search.nas import plan_search, search_record
from megatron_prune.minitron.search.plot import plot_candidates


def main(argv: Optional[List[str]] = None) -> int:
    return run_command("megatron-prune", run, build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> dict:
    """The whole job, in steps; returns the JSON summary. Collective under torchrun."""
    started = time.perf_counter()
    job = prepare(args)  # every check that needs no weights; the calibration data tokenised
    model, imported = load_model(job, args)
    groups_before = parameter_groups(model, job.ctx)
    with atomic_output_dir(args.output_dir, args.overwrite, job.ctx) as tmp:
        nas = dict(constraints=job.budgets, score_func=job.score_func, search=job.search.search) if job.budgets else {}
        pruned, result = api.prune(model, job.target, job.loop, scores_path=job.scores_path, criteria=job.criteria,
                               reuse_scores=args.reuse_scores, all_statistics=args.all_statistics, depth=job.depth, **nas)  # fmt: skip
        groups_after = parameter_groups(pruned, job.ctx)
        job.ctx.on_main(lambda: print("\n" + format_tables(result, groups_before, groups_after) + "\n", flush=True))
        saved = save_checkpoints(job, args, model, imported, pruned, result, tmp)
        summary = summary_record(job, args, result, saved, started)
        job.ctx.on_main(lambda: write_outputs(job, args, imported, result, tmp, groups_before, groups_after, summary))
    log(f"done in {time.perf_counter() - started:.0f}s: {result.params_before:,} -> {result.params_after:,} parameters "
        f"({100 * result.params_after / result.params_before:.1f}%), written to {job.out}")  # fmt: skip
    return summary


def load_model(job: SimpleNamespace, args: argparse.Namespace):
    """(the model to prune, what exports it back or None): a Megatron checkpoint (`--load`) and, for an HF export, its
    `hf_exporter`; or a Hugging Face model imported through Megatron-Bridge (checked against the HF model)."""
    if job.checkpoint is not None:
        model = megatron_checkpoint.load_megatron_model(job.source, info=job.checkpoint, tokenizer_model=args.tokenizer_model,
                                                        ctx=job.ctx).model
        return model, megatron_checkpoint.hf_exporter(job.checkpoint, model) if job.save_format != "megatron" else None
    imported = bridge.import_hf_model(job.source, dtype=job.dtype, trust_remote_code=args.trust_remote_code, ctx=job.ctx)
    job.check(imported.model, job.source, "HF source vs imported MCore")
    return imported.model, imported


def save_checkpoints(job, args, model, imported, pruned, result, tmp: str) -> dict:
    """The pruned checkpoints under `tmp` (published with the rest): the input's Megatron format, and/or Hugging
    Face and a Megatron-Bridge checkpoint; each checked against the pruned model unless --skip-roundtrip-check.
    Returns what the summary records about them."""
    hf_dir, megatron_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "megatron")
    saved = {}
    if job.checkpoint is not None:
        saved.update(megatron_checkpoint.save_checkpoint_like(job.checkpoint, model, pruned, megatron_dir, job.tokenizer_path,
                                                              ctx=job.ctx))
        if not args.skip_roundtrip_check:
            job.roundtrip_checks.append(_checked(megatron_checkpoint.compare_with_reload(
                pruned, megatron_dir, job.check_tokens, "pruned MCore vs reloaded checkpoint", args.tokenizer_model, ctx=job.ctx)))  # fmt: skip
    if job.save_format in ("hf", "both"):
        bridge.save_hf(imported, pruned, result.plan.kept_layers, hf_dir, ctx=job.ctx)
        job.check(pruned, hf_dir, "pruned MCore vs exported HF")
    if job.save_format in ("megatron", "both") and job.checkpoint is None:
        bridge.save_megatron(imported, pruned, megatron_dir, hf_dir if job.save_format == "both" else job.source, ctx=job.ctx)
    return saved


def summary_record(job, args, result, saved: dict, started: float) -> dict:
    """What `prune_summary.json` records beside the prune itself (`report.summary`)."""
    summary = {
        "source": str(job.source), "source_format": job.checkpoint.format if job.checkpoint else "hf", **saved,
        "output_dir": str(job.out), "save_format": job.save_format,
        "dtype": dtype_name(job.dtype), "source_dtype": dtype_name(job.source_dtype),
        "parallelism": {"tp": job.ctx.tp_size, "pp": job.ctx.pp_size, "dp": job.ctx.dp_size},
        "calibration_micro_batch_size": args.micro_batch_size,
        "roundtrip_checks": [c.__dict__ | {"ok": c.ok} for c in job.roundtrip_checks],
        "wall_time_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    if not args.scores_path:
        summary["scores_path"] = str(job.out / "importance_scores.pt")
    if result.search is not None:
        summary["nas"] = search_record(result.search)
    if result.depth is not None:
        summary["depth"] = result.depth
    return summary


def write_outputs(job, args, imported, result, tmp: str, groups_before, groups_after, summary: dict) -> None:
    """Rank 0: the report, the NAS plot, the statistics and the distillation run card, under `tmp`."""
    changed = ", ".join(f"{k} {result.original_sizes[k]}→{v}" for k, v in result.export_config.items() if result.original_sizes[k] != v)
    title = f"{os.path.basename(str(job.source).rstrip('/'))}: {changed}"
    write_report(result, str(tmp), groups_before, groups_after, summary, title, plot_png=not args.no_report)
    if result.search is not None and not args.no_report:
        plot_candidates(result, os.path.join(tmp, "nas_candidates.png"))
    if not args.scores_path:  # published with the rest
        os.replace(job.scores_path, os.path.join(tmp, "importance_scores.pt"))
    vocab = job.checkpoint.vocab_size() if job.checkpoint else imported.bridge.hf_pretrained.config.vocab_size
    write_prune_run_card(result, str(tmp), str(job.out), job.source, vocab, job.save_format, job.ctx, job.card_layout,
                         dtypes=(dtype_name(job.dtype), dtype_name(job.source_dtype)), megatron_source=job.checkpoint is not None,
                         tokenizer=job.tokenizer_path if job.checkpoint is not None else None, **job.card_recipe)  # fmt: skip


def prepare(args: argparse.Namespace) -> SimpleNamespace:
    """Every check that needs no weights, in order: flags, layout, output directory, the model's config and weight
    files, targets or budgets (percentages resolved from the config's counts), calibration data, an existing
    scores file. Initialises torch.distributed. Returns what the job needs."""
    flags = check_flags(args)
    dp = check_world(args)
    out = check_output_dir(args.output_dir, args.overwrite)
    _check_apart(out, {"--hf-model": args.hf_model, "--load": args.load, "--scores-path": args.scores_path,
                       "--calib-data": args.calib_data, "--score-data": args.score_data})  # fmt: skip
    if args.scores_path and os.path.isdir(args.scores_path):
        raise PruneConfigError(f"--scores-path {args.scores_path!r} is a directory; give a file path")

    # imports megatron-core (which warns at import time): only once run_command has quieted the output
    from megatron_prune.minitron.runtime.distributed import init_distributed

    init_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, seed=args.seed,
                     expert_model_parallel_size=args.expert_model_parallel_size,
                     expert_tensor_parallel_size=args.expert_tensor_parallel_size)
    ctx = ParallelContext.from_megatron()
    if flags.default_job:
        goal = format_sizes(flags.target) if flags.target is not None else "the NAS budget"
        log(f"no --hf-model: pruning the offline demo model SmolLM2-135M-Instruct to {goal} "
            "(pass --hf-model PATH to prune your model)")  # fmt: skip
    src = open_source(args, ctx, flags)
    shape = ModelShape.from_config(src.provider)
    target, depth_options, budgets = resolve_targets(args, ctx, flags, src, shape)
    card_layout, card_recipe = run_card_options_from_args(args, src.hf_config, shape.sizes())
    loop, score_func, calib_data = calibration_data(args, flags, src, dp)
    # the statistics live outside the temporary directory, so a failed or interrupted run keeps them: the same
    # command resumes without calibrating (and NAS at the next unscored candidate)
    scores_path = args.scores_path or str(out.parent / f".{out.name}.importance_scores.pt")
    if src.checkpoint is None:  # (a Megatron checkpoint's scores file is checked once the model is loaded)
        _precheck_scores(scores_path, src.provider, flags.criteria, loop.calibration, args, ctx, shape, src.dtype)
    log(f"calibration data: {args.calib_samples} samples x {args.seq_length} tokens from {calib_data!r}, "
        f"micro-batch {args.micro_batch_size}; TP={ctx.tp_size} PP={ctx.pp_size} DP={dp}")  # fmt: skip
    tolerance = args.roundtrip_tolerance
    if tolerance is None:
        tolerance = 1e-4 if src.dtype == torch.float32 else 2e-2  # (16 bits: or twice the HF model's own rounding)
    job = SimpleNamespace(
        ctx=ctx, source=src.source, out=out, target=target, budgets=budgets, search=flags.search, criteria=flags.criteria,
        dtype=src.dtype, source_dtype=src.source_dtype, tolerance=tolerance, loop=loop, score_func=score_func,
        scores_path=scores_path, card_layout=card_layout, card_recipe=card_recipe, depth=depth_options,
        checkpoint=src.checkpoint, tokenizer_path=src.tokenizer_path, save_format=flags.save_format,
        check_tokens=loop.batches[0][:2, :64], roundtrip_checks=[],
    )  # fmt: skip

    def check(model, hf_dir: str, name: str) -> None:  # a round-trip check of `model` against an HF folder
        if not args.skip_roundtrip_check:
            job.roundtrip_checks.append(_checked(bridge.compare_with_hf(model, hf_dir, job.check_tokens, name, job.tolerance,
                                                                 args.trust_remote_code, ctx=ctx)))  # fmt: skip

    job.check = check
    return job


def check_flags(args: argparse.Namespace) -> SimpleNamespace:
    """The flags that contradict each other or lack a companion, before anything is read."""
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
    return SimpleNamespace(criteria=criteria, target=target, search=search, default_job=default_job, save_format=save_format)


def open_source(args: argparse.Namespace, ctx: ParallelContext, flags: SimpleNamespace) -> SimpleNamespace:
    """The model's config, dtype, maximum positions and tokenizer, from a Megatron checkpoint (`--load`) or a
    Hugging Face folder (whose weight files are checked complete): configs only, no weights."""
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
        if flags.save_format != "megatron" and checkpoint.hf_model() is None:
            raise PruneConfigError(f"--save-format {flags.save_format}: a Hugging Face export needs the HF architecture, "
                                   "which only a Megatron-Bridge checkpoint converted from a local HF folder names "
                                   "(hf_model_id); save as megatron")  # fmt: skip
    else:
        source = smollm2_folder(ctx) if flags.default_job else args.hf_model
        hf_config, provider = bridge.check_hf_source(source, args.trust_remote_code)
        ctx.on_main(lambda: check_weight_files(source, hf_config, args.trust_remote_code))
        tokenizer_path = source
    check_sequence_length(args.seq_length, hf_config)
    return SimpleNamespace(checkpoint=checkpoint, source=source, provider=provider, hf_config=hf_config,
                           tokenizer_path=tokenizer_path, source_dtype=resolve_dtype("auto", hf_config),
                           dtype=resolve_dtype(args.dtype, hf_config))  # fmt: skip


def resolve_targets(args, ctx: ParallelContext, flags: SimpleNamespace, src: SimpleNamespace, shape: ModelShape):
    """(target sizes or None, depth options, NAS budgets or None), checked against the model's config: a target
    or a budget that cannot work fails before the import, and "60%" budgets are resolved from the config's counts."""
    target, search = flags.target, flags.search
    depth_options = depth_options_from_args(args)
    depth = depth_options.resolve(shape.num_layers, layer_symbols(src.provider))
    if depth.layers_to_drop and search.constraints is not None:
        raise PruneConfigError("--layers-to-drop fixes the depth, which NAS searches: give sizes instead of a budget, "
                               "or --protect-layers to keep layers out of the search")  # fmt: skip
    if target is not None and (depth.layers_to_drop or depth.protected):
        layers = depth.check_target(shape.num_layers, target.get("num_layers"))
        target = {**target, "num_layers": layers} if layers != shape.num_layers else target
    budgets = None
    if target is not None:
        validate_export_config(target, shape, **ctx.sizes())
    else:
        inventory = src.checkpoint.inventory(ctx.tp_size) if src.checkpoint else provider_inventory(src.provider, ctx.tp_size)
        budgets = plan_search(inventory, shape, search.constraints, search.search, verbose=False, **ctx.sizes()).budgets
        log(f"NAS budgets: {', '.join(f'{k} <= {v:,.0f}' for k, v in budgets.items())}")
    return target, depth_options, budgets


def calibration_data(args, flags: SimpleNamespace, src: SimpleNamespace, dp: int):
    """(the calibration forward loop, the NAS score function or None, the data's name): the text tokenised with
    the model's tokenizer, before the model is imported."""
    if args.calib_data is None and not flags.default_job:
        log(f"warning: no --calib-data: calibrating on the packaged Jargon File excerpt ({args.calib_samples} x "
            f"{args.seq_length} tokens of public-domain computing folklore); pass text like your model's training data (the reference "
            f"calibrates on {REFERENCE_CALIB_SAMPLES} samples)")  # fmt: skip
    calib_data = args.calib_data or "default"
    from transformers import AutoTokenizer  # seconds to import: only for a job that got this far

    tokenizer = AutoTokenizer.from_pretrained(src.tokenizer_path, trust_remote_code=args.trust_remote_code)
    batches, score_func = _calibration_and_score(args, calib_data, flags.search, tokenizer)
    if len(batches) < dp:
        raise PruneConfigError(f"{len(batches)} micro-batches cannot feed {dp} data-parallel replicas: raise --calib-samples")
    settings = {"data": calib_data, "seed": args.seed, "text_field": args.calib_text_field, "split": args.calib_split}
    loop = make_forward_loop(batches, backward=bool(needing_backward(flags.criteria)), settings=settings)
    return loop, score_func, calib_data


def _precheck_scores(scores_path: str, provider, criteria, calibration, args, ctx, shape, dtype) -> None:
    """An existing scores file, checked from the config before the import (architecture, statistics, data)."""
    if not ctx.broadcast_object(os.path.exists(scores_path)):
        return
    at_layout = criteria_at_layout(criteria, shape, ctx.tp_size)[0]
    config = finalized_provider(provider, ctx, dtype)
    ctx.on_main(lambda: precheck_scores_file(scores_path, config, at_layout, calibration, args.reuse_scores))


def _calibration_and_score(args, calib_data: str, search, tokenizer):
    """Calibration micro-batches and, for NAS, the score function. lm_loss scores on --score-samples rows of
    --score-data, or else on rows of --calib-data disjoint from the calibration rows (which do not depend on them)."""
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
    log(str(check))
    if not check.ok:
        raise RoundTripError(f"round-trip check failed: {check} (nothing was written; --roundtrip-tolerance sets the "
                             "tolerance, --skip-roundtrip-check skips the check)")  # fmt: skip
    return check
