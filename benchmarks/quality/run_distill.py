"""Distillation benchmark (issue 6): does a short CPU logit distillation recover SmolLM2-135M pruned to ~72%?

    python benchmarks/quality/run_distill.py [--train-iters 10] [--global-batch-size 4] [--seq-length 256]
        [--out benchmarks/results/quality_distill.json]

The CLI's default target ({"ffn_hidden_size": 1024, "num_layers": 26}, 97.4M of 134.5M parameters) is pruned twice:
with the CLI's default importance (calibration as run_quality.py: Jargon File excerpt, 64 x 256 tokens) and
with random importance (seed 0) at the same shape. Each student is then distilled from the unpruned model by
`megatron_prune.minitron.distill.kd` (KL(teacher || student) on logits, Megatron-core schedule, DDP grad buffers, Adam and
`OptimizerParamScheduler`) for the same fixed token budget, on text disjoint from the evaluation: the Jargon
File excerpt plus the Python docs' tutorial/, howto/ and faq/ (the evaluation reads library/ and Shakespeare).
Held-out perplexity (heldout.py, windows of 512 tokens, as run_quality.py) before pruning, after pruning, after
distillation. The default budget, 10 steps x 4 x 256 = 10,240 tokens per student, took about 25 min on 2 shared
cores (a step of 1,024 tokens: teacher forward, student forward and backward, ~50 s); it is tiny next to the
guideline's 80-100B tokens: this measures the direction and the early slope of recovery, not its end point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET = {"ffn_hidden_size": 1024, "num_layers": 26}  # megatron_prune.minitron.cli.DEFAULT_TARGET


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-iters", type=int, default=10)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4, help="peak LR (the guideline's 1e-4 -> 1e-5 linear decay)")
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps (the guideline's 100, scaled to the budget)")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--out", default="benchmarks/results/quality_distill.json")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from baselines import random_importance
    from heldout import heldout_sources
    from megatron_prune import make_forward_loop, prune
    from megatron_prune.minitron.bridge import import_hf_model
    from megatron_prune.minitron.bridge.offline_model import cache_dir, smollm2_folder
    from megatron_prune.minitron.config import ModelShape
    from megatron_prune.minitron.data.calibration import DEFAULT_CORPUS, calibration_tokens, micro_batches, token_rows
    from megatron_prune.minitron.distill.evaluate import heldout_batches, perplexity
    from megatron_prune.minitron.distill.kd import Distiller, Schedule, replica_batches, run
    from megatron_prune.minitron.runtime.distributed import init_distributed
    from megatron_prune.minitron.runtime.parallel import ParallelContext

    init_distributed(1, 1)
    start = time.perf_counter()
    source = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(source)
    calib = micro_batches(calibration_tokens("default", tokenizer, 64, 256, seed=1234), 4)
    heldout = heldout_sources()
    evals = {name: heldout_batches(path, tokenizer, args.windows, 512) for name, path in heldout.items()}
    docs = Path(heldout["python_docs"]).parent
    train_text = ",".join([str(DEFAULT_CORPUS)] + [str(docs / d) for d in ("tutorial", "howto", "faq")])
    schedule = Schedule(args.train_iters, args.micro_batch_size, args.global_batch_size, args.lr, args.min_lr, args.warmup)
    rows = token_rows(train_text, tokenizer, args.seq_length, args.train_iters * args.global_batch_size)
    budget = args.train_iters * args.global_batch_size * args.seq_length
    if rows.shape[0] < args.train_iters * args.global_batch_size:
        raise SystemExit(f"the training text holds {rows.shape[0]} rows of {args.seq_length}: fewer than the budget")

    teacher = import_hf_model(source).model
    shape = ModelShape.from_config(teacher.config)
    scores = str(cache_dir() / "quality_distill_smollm2_scores.pt")  # calibrated once, for the default criteria

    def perplexities(model) -> dict:
        return {name: round(perplexity(model, batches), 2) for name, batches in evals.items()}

    rows_out = [{"model": "unpruned (teacher)", "params": sum(p.numel() for p in teacher.parameters()), **perplexities(teacher)}]
    print(json.dumps(rows_out[-1]), flush=True)
    for method, kwargs in (("minitron", {}), ("random seed 0", {"importance": random_importance(shape, 0)})):
        student, result = prune(teacher, TARGET, make_forward_loop(calib, progress=False), scores_path=scores, **kwargs)
        pruned = perplexities(student)
        began = time.perf_counter()
        distiller = Distiller(student, teacher, schedule, vocab_size=teacher.vocab_size)
        history = run(distiller, replica_batches(rows, schedule, ParallelContext.from_megatron(), seed=0), log_interval=5)
        distilled = perplexities(distiller.student.eval())
        rows_out.append({"model": f"pruned, {method}", "params": result.params_after, "after_pruning": pruned,
                         "after_distillation": distilled, "kd_loss_first": round(history[0]["kd_loss"], 4),
                         "kd_loss_last": round(history[-1]["kd_loss"], 4),
                         "kd_loss_curve": [round(h["kd_loss"], 4) for h in history],
                         "distill_wall_time_s": round(time.perf_counter() - began),
                         "criteria": "random" if kwargs else _criteria()})  # fmt: skip
        print(json.dumps({k: v for k, v in rows_out[-1].items() if k != "kd_loss_curve"}), flush=True)
        del student, distiller

    out = {"model": "SmolLM2-135M-Instruct", "target": TARGET, "calibration": "jargon file excerpt, 64 x 256 tokens",
           "eval": f"{args.windows} windows x 512 tokens per text",
           "distillation": {"data": "jargon file excerpt + python docs tutorial/howto/faq (disjoint from the eval)",
                            "train_iters": args.train_iters, "global_batch_size": args.global_batch_size,
                            "micro_batch_size": args.micro_batch_size, "seq_length": args.seq_length,
                            "token_budget": budget, "lr": args.lr, "min_lr": args.min_lr, "lr_decay_style": "linear",
                            "warmup_iters": args.warmup, "loss": "KL(teacher || student) on logits, temperature 1",
                            "optimizer": "megatron-core Adam (fp32), beta2 0.95, clip 1.0, no weight decay"},
           "wall_time_s": round(time.perf_counter() - start), "rows": rows_out}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


def _criteria() -> str:
    """The CLI's default importance criteria, as this checkout names them."""
    try:
        from megatron_prune.minitron.importance.criteria import describe, resolve_criteria

        return describe(resolve_criteria(None))
    except ImportError:
        return "minitron"


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    main()
