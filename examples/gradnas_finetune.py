"""Prune a Hugging Face causal LM with GradNAS, fine-tune it (optionally distilling from the original), evaluate.

    python examples/gradnas_finetune.py                                # offline SmolLM2-135M, 75% of the params
    python examples/gradnas_finetune.py --model gpt2-folder --flops 60% --steps 200 --distill --uniform
    python examples/gradnas_finetune.py --data my_texts/ --out outputs/pruned

Data: --data is anything megatron-prune's calibration reader takes (a text/JSONL/parquet file or folder; default:
the packaged Jargon File excerpt). Its rows are split into gradient rows (the GradNAS loss: next-token
cross-entropy), fine-tuning rows, and held-out rows for the perplexity reported before pruning, after pruning and
after fine-tuning. The result is saved with `save_pretrained` when the HF config states every size
(`--uniform` makes sure of that), otherwise as one megatron-prune architecture file (`gradnas.restore` loads it).
"""

import argparse
import copy
import math
import os
import time

import torch
import torch.nn.functional as F

from megatron_prune import gradnas
from megatron_prune.minitron.data.calibration import calibration_tokens


@torch.no_grad()
def perplexity(model, rows) -> float:
    model.eval()
    total = count = 0.0
    for row in rows:
        logits = model(input_ids=row[None]).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, row[1:], reduction="sum"))
        count += row.numel() - 1
    return math.exp(total / count)


def finetune(student, rows, steps: int, lr: float, batch: int, teacher=None, log_every: int = 5) -> None:
    """AdamW with linear decay; next-token loss, plus KL(teacher || student) on the logits with --distill."""
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    student.train()
    start, running = time.time(), []
    for step in range(steps):
        ids = rows[(step * batch) % len(rows):][:batch]
        out = student(input_ids=ids, labels=ids)
        loss = out.loss
        if teacher is not None:
            with torch.no_grad():
                target = teacher(input_ids=ids).logits.log_softmax(-1)
            loss = loss + F.kl_div(out.logits.log_softmax(-1).flatten(0, 1), target.flatten(0, 1), log_target=True,
                                   reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            rate = (time.time() - start) / (step + 1)
            print(f"fine-tune step {step + 1}/{steps}: loss {sum(running) / len(running):.4f}, "
                  f"{rate:.1f} s/step, ETA {rate * (steps - step - 1):.0f} s", flush=True)
            running = []
    student.eval()
    student.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or hub name (default: the offline SmolLM2-135M)")
    p.add_argument("--data", default="default")
    p.add_argument("--params", default=None, help="parameter budget, e.g. 75%% or 100M (default 75%% without --flops)")
    p.add_argument("--flops", default=None, help="FLOPs budget, e.g. 60%%")
    p.add_argument("--uniform", action="store_true", help="same FFN width / head count in every layer (from_pretrained loads it)")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--grad-rows", type=int, default=16, help="rows whose loss gradients rank heads and channels")
    p.add_argument("--tune-rows", type=int, default=64)
    p.add_argument("--eval-rows", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--distill", action="store_true", help="add KL to the unpruned model's logits")
    p.add_argument("--out", default="outputs/gradnas")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model is None:
        from megatron_prune.minitron.bridge.offline_model import smollm2_folder

        args.model = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    rows = calibration_tokens(args.data, tokenizer, args.grad_rows + args.tune_rows, args.seq_length, held_out=args.eval_rows)
    grad_rows, tune_rows = rows[:args.grad_rows], rows[args.grad_rows:args.grad_rows + args.tune_rows]
    eval_rows = rows[args.grad_rows + args.tune_rows:]
    constraints = {k: v for k, v in (("params", args.params), ("flops", args.flops)) if v} or {"params": "75%"}

    before = perplexity(model, eval_rows)
    print(f"original: {sum(p.numel() for p in model.parameters()):,} params, held-out perplexity {before:.2f}", flush=True)
    batches = [{"input_ids": b, "labels": b} for b in grad_rows.split(args.batch)]
    pruned, result = gradnas.prune(model, constraints=constraints, dummy_input=grad_rows[:1], data_loader=batches,
                                   uniform=args.uniform, checkpoint=os.path.join(args.out, "gradnas_checkpoint.pt"))
    after_pruning = perplexity(pruned, eval_rows)
    print(f"pruned: {result.counts['params']:,.0f} params, held-out perplexity {after_pruning:.2f}", flush=True)

    finetune(pruned, tune_rows, args.steps, args.lr, args.batch, teacher=copy.deepcopy(model) if args.distill else None)
    after_tuning = perplexity(pruned, eval_rows)
    print(f"fine-tuned ({args.steps} steps{', distilled' if args.distill else ''}): held-out perplexity {after_tuning:.2f} "
          f"(original {before:.2f}, right after pruning {after_pruning:.2f})", flush=True)

    os.makedirs(args.out, exist_ok=True)
    if result.hf_loadable:
        pruned.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        print(f"saved to {args.out} (from_pretrained loads it)")
    else:
        gradnas.save(pruned, os.path.join(args.out, "pruned.pt"), result)
        print(f"saved to {args.out}/pruned.pt (per-layer sizes: gradnas.restore(original_model, path) loads it)")


if __name__ == "__main__":
    main()
