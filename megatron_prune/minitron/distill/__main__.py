"""`python -m megatron_prune.minitron.distill`: distil a pruned student from its teacher on CPU, driven by the run card.

    python -m megatron_prune.minitron.distill --run-card PRUNED/distillation_run_card.yaml --output-dir DISTILLED \\
        --train-iters 100 --seq-length 256 --global-batch-size 8 --micro-batch-size 2 [--data FILES] [--eval-data FILES]

Flags override the card's recipe (a new --train-iters re-derives the token budget). The card's parallelism is a
suggestion for GPU runs: this loop runs at TP = PP = 1 (torchrun adds data-parallel replicas). DISTILLED appears
complete or not at all:
    DISTILLED/hf/                     the distilled student (HF folder: the next `megatron-prune --hf-model`)
    DISTILLED/loss_curve.csv|.png     kd loss, student lm loss, grad norm and LR per step
    DISTILLED/distill_summary.json    the recipe run, tokens seen, losses, held-out perplexities (--eval-data)
    DISTILLED/checkpoints/iter_N.pt   the student's state dict every --save-interval steps (kept beside the
                                      output while running, so a failed run keeps them)
This loop checks recovery on small models; real recovery needs Megatron-Bridge / Megatron-LM distillation at scale.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional

from megatron_prune.errors import PruneConfigError

_OVERRIDES = ("train_iters", "train_tokens", "seq_length", "micro_batch_size", "global_batch_size", "lr", "min_lr",
              "lr_warmup_iters", "temperature", "seed")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from megatron_prune.minitron.search.args import count_arg

    p = argparse.ArgumentParser(prog="python -m megatron_prune.minitron.distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--run-card", required=True, help="distillation_run_card.yaml written by megatron-prune")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--verbose", action="store_true", help="also show third-party warnings (Apex / Transformer Engine fallbacks, deprecations) and library logging")
    r = p.add_argument_group("recipe overrides (default: the card's)")
    kinds = {"train_iters": int, "train_tokens": lambda s: int(count_arg(s)), "seq_length": int, "micro_batch_size": int,
             "global_batch_size": int, "lr": float, "min_lr": float, "lr_warmup_iters": int, "temperature": float, "seed": int}
    for name, kind in kinds.items():  # the flags of _OVERRIDES
        r.add_argument(f"--{name.replace('_', '-')}", type=kind)
    d = p.add_argument_group("data (the card's data_blend is Megatron-tokenized data for GPU runs)")
    d.add_argument("--data", default="default", help="training text: 'default' (packaged), files, a directory, a glob, a dataset")
    d.add_argument("--text-field", default="text")
    d.add_argument("--eval-data", default=None, help="held-out text: perplexity of teacher and student before and after")
    d.add_argument("--eval-samples", type=int, default=8)
    d.add_argument("--eval-seq-length", type=int, default=None, help="default: --seq-length")
    o = p.add_argument_group("logging and checkpoints")
    o.add_argument("--log-interval", type=int, default=10)
    o.add_argument("--save-interval", type=int, default=0, help="save the student's state dict every N steps (0: never)")
    o.add_argument("--no-plot", action="store_true")
    return p


def run(args: argparse.Namespace) -> dict:
    """Check everything, load both models, distil, publish the output directory; returns the summary."""
    from transformers import AutoTokenizer

    from megatron_prune.minitron.bridge import import_hf_model, save_hf
    from megatron_prune.minitron.bridge.checkpoint import load_megatron_model, save_checkpoint_like
    from megatron_prune.common.checkpoint import atomic_save
    from megatron_prune.minitron.cli import _check_apart
    from megatron_prune.minitron.data.calibration import token_rows
    from megatron_prune.minitron.distill.evaluate import heldout_batches, perplexity
    from megatron_prune.minitron.distill.kd import Distiller, Schedule, replica_batches, run as run_steps
    from megatron_prune.minitron.distill.run_card import load_run_card, override_recipe
    from megatron_prune.common.log import log
    from megatron_prune.minitron.output import atomic_output_dir, check_output_dir
    from megatron_prune.minitron.runtime.distributed import init_distributed
    from megatron_prune.minitron.runtime.parallel import ParallelContext

    started = time.perf_counter()
    card = load_run_card(args.run_card)
    recipe = override_recipe(card.recipe, **{k: getattr(args, k) for k in _OVERRIDES})
    student_path = card.student.hf_checkpoint or card.student.megatron_checkpoint  # HF first, else Megatron in and out
    teacher_path = card.teacher.hf_checkpoint or card.teacher.megatron_checkpoint
    for name, least in (("log_interval", 1), ("eval_samples", 1), ("save_interval", 0)):
        if getattr(args, name) < least:
            raise PruneConfigError(f"--{name.replace('_', '-')} must be >= {least}")
    out = check_output_dir(args.output_dir, args.overwrite)
    field = lambda model: "hf_checkpoint" if model.hf_checkpoint else "megatron_checkpoint"  # noqa: E731
    _check_apart(out, {"--run-card": args.run_card, f"student.{field(card.student)}": student_path,
                       f"teacher.{field(card.teacher)}": teacher_path, "--data": args.data, "--eval-data": args.eval_data})  # fmt: skip
    schedule = Schedule(recipe.train_iters, recipe.micro_batch_size, recipe.global_batch_size, recipe.lr, recipe.min_lr,
                        recipe.lr_warmup_iters, recipe.lr_decay_style, recipe.kd.temperature)  # fmt: skip

    init_distributed(1, 1, seed=recipe.seed)
    ctx = ParallelContext.from_megatron()
    tokenizer = AutoTokenizer.from_pretrained(card.tokenizer.path or student_path)
    rows = token_rows(args.data, tokenizer, recipe.seq_length, recipe.train_iters * recipe.global_batch_size, args.text_field)
    epochs = recipe.train_iters * recipe.global_batch_size / rows.shape[0]
    log(f"training data: {rows.shape[0]} sequences of {recipe.seq_length} tokens from {args.data!r} "
        f"({epochs:.2f} epochs over {recipe.train_iters} steps of {recipe.global_batch_size} sequences)")  # fmt: skip
    evals = heldout_batches(args.eval_data, tokenizer, args.eval_samples, args.eval_seq_length or recipe.seq_length,
                            text_field=args.text_field) if args.eval_data else None  # fmt: skip

    teacher = import_hf_model(teacher_path).model if card.teacher.hf_checkpoint else load_megatron_model(teacher_path).model
    # a Megatron checkpoint (Megatron-LM or Megatron-Bridge) is distilled and written back in its format
    student = import_hf_model(student_path) if card.student.hf_checkpoint else load_megatron_model(student_path)
    original_config = None if card.student.hf_checkpoint else copy.deepcopy(student.model.config)
    eval_record = {}
    if evals:
        eval_record = {"teacher": perplexity(teacher, evals), "student_before": perplexity(student.model, evals)}
        log(f"held-out perplexity: teacher {eval_record['teacher']:.2f}, student before {eval_record['student_before']:.2f}")
    distiller = Distiller(student.model, teacher, schedule, card.tokenizer.vocab_size)
    saved = out.parent / f".{out.name}.checkpoints"  # outside the temporary directory: kept if the run fails

    def save_checkpoint(iteration: int, record: dict) -> None:
        if args.save_interval and iteration % args.save_interval == 0:
            state = {k: v for k, v in distiller.student.state_dict().items() if not k.endswith("_extra_state")}
            ctx.on_main(lambda: atomic_save({"iteration": iteration, "model": state}, saved / f"iter_{iteration:07d}.pt"))

    with atomic_output_dir(args.output_dir, args.overwrite) as tmp:
        history = run_steps(distiller, replica_batches(rows, schedule, ctx, recipe.seed), args.log_interval, save_checkpoint)
        distiller.student.eval()
        if evals:
            eval_record["student_after"] = perplexity(distiller.student, evals)
            log(f"held-out perplexity: student after {eval_record['student_after']:.2f}")
        if card.student.hf_checkpoint:
            save_hf(student, distiller.student, list(range(1, distiller.student.config.num_layers + 1)), os.path.join(tmp, "hf"))
        else:
            original = SimpleNamespace(config=original_config)  # the sizes do not change: the args are carried over
            save_checkpoint_like(student.info, original, distiller.student, os.path.join(tmp, "megatron"), card.tokenizer.path)
        summary = {
            "run_card": str(Path(args.run_card).absolute()), "student": student_path,
            "teacher": teacher_path, "output_dir": str(out),
            "recipe": {k: v for k, v in dataclasses.asdict(recipe).items() if k != "data_blend"},
            "data": args.data, "data_sequences": int(rows.shape[0]), "epochs": round(epochs, 3),
            "tokens_seen": history[-1]["tokens"], "data_parallel_size": ctx.dp_size,
            "kd_loss": {"first": history[0]["kd_loss"], "last": history[-1]["kd_loss"]},
            "eval": {"data": args.eval_data, "samples": args.eval_samples, **{k: round(v, 3) for k, v in eval_record.items()}} if evals else None,
            "wall_time_s": round(time.perf_counter() - started, 1),
        }  # fmt: skip

        def write_outputs() -> None:
            _write_curve(history, Path(tmp), plot=not args.no_plot)
            (Path(tmp) / "distill_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if saved.is_dir():
                shutil.move(str(saved), str(Path(tmp) / "checkpoints"))

        ctx.on_main(write_outputs)
    log(f"done in {time.perf_counter() - started:.0f}s: kd loss {history[0]['kd_loss']:.4f} -> {history[-1]['kd_loss']:.4f}, "
        f"written to {out}")  # fmt: skip
    return summary


def _write_curve(history: List[dict], out: Path, plot: bool) -> None:
    """loss_curve.csv (one row per step) and, with matplotlib, loss_curve.png."""
    with open(out / "loss_curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    if not plot:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    steps = [h["iteration"] for h in history]
    fig, (kd, lm) = plt.subplots(1, 2, figsize=(10, 3.5))
    kd.plot(steps, [h["kd_loss"] for h in history])
    kd.set(xlabel="step", ylabel="KL(teacher || student)", title="distillation loss")
    lm.plot(steps, [h["lm_loss"] for h in history], color="tab:orange")
    lm.set(xlabel="step", ylabel="cross-entropy", title="student next-token loss (training batch)")
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=100)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_prune.minitron.runtime.command import run_command

    return run_command("megatron_prune.minitron.distill", run, build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
