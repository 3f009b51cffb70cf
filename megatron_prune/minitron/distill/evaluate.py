"""Held-out perplexity of a Hugging Face causal LM through Megatron's pipeline schedule (the evaluate step).

    python -m megatron_prune.minitron.distill.evaluate --hf-model OUT/hf [--data default|FILES] [--samples 8] [--seq-length 512]
        [--output ppl.json]          # torchrun for TP/PP/DP; prints one JSON line, also written to --output

Perplexity = exp(mean next-token cross-entropy) over `--samples` windows of `--seq-length` tokens packed from
`--data` (`megatron_prune.minitron.data.calibration`'s sources; the packaged Jargon File excerpt by default, which is the
default calibration text too: pass other text for a held-out figure). Every predicted token weighs the same.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from megatron_prune.errors import PruneConfigError


def perplexity(model: torch.nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """exp(mean next-token cross-entropy) of `model` (this rank's stage) on token batches [B, S]; every rank."""
    from megatron_prune.minitron.data.scores import lm_loss_score

    return math.exp(-lm_loss_score(batches)(model))


def heldout_batches(data: str, tokenizer, samples: int, seq_length: int, micro_batch_size: int = 1, seed: int = 0,
                    text_field: str = "text") -> List[torch.Tensor]:  # fmt: skip
    """`samples` windows [micro_batch_size, seq_length] of `data` (a calibration source), chosen with `seed`."""
    from megatron_prune.minitron.data.calibration import calibration_tokens, micro_batches

    return micro_batches(calibration_tokens(data, tokenizer, samples, seq_length, seed, text_field), micro_batch_size)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_prune.minitron.distill.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--hf-model", required=True, help="HF model folder or hub id")
    p.add_argument("--data", default="default", help="text: 'default', files, a directory, a glob or a dataset name")
    p.add_argument("--text-field", default="text")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="choice of windows")
    p.add_argument("--output", default=None, help="also write the JSON result to this file")
    p.add_argument("--verbose", action="store_true", help="also show third-party warnings and library logging")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--trust-remote-code", action="store_true")
    return p


def evaluate(args: argparse.Namespace) -> dict:
    """Check the inputs, tokenise, import the model, return {hf_model, data, samples, seq_length, tokens, perplexity}."""
    from transformers import AutoTokenizer

    from megatron_prune.minitron.bridge import check_hf_source, import_hf_model
    from megatron_prune.minitron.runtime.distributed import init_distributed
    from megatron_prune.minitron.runtime.parallel import ParallelContext

    if args.samples < 1 or args.seq_length < 2:
        raise PruneConfigError(f"--samples ({args.samples}) must be >= 1 and --seq-length ({args.seq_length}) >= 2")
    if args.samples % args.micro_batch_size:
        raise PruneConfigError(f"--samples ({args.samples}) must be a multiple of --micro-batch-size ({args.micro_batch_size})")
    if args.output and os.path.isdir(args.output):
        raise PruneConfigError(f"--output {args.output!r} is a directory; give a file path")
    check_hf_source(args.hf_model, args.trust_remote_code)
    init_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    tokenizer = AutoTokenizer.from_pretrained(args.hf_model, trust_remote_code=args.trust_remote_code)
    batches = heldout_batches(args.data, tokenizer, args.samples, args.seq_length, args.micro_batch_size, args.seed,
                              args.text_field)  # fmt: skip
    model = import_hf_model(args.hf_model, trust_remote_code=args.trust_remote_code).model
    result = {"hf_model": str(args.hf_model), "data": args.data, "samples": args.samples, "seq_length": args.seq_length,
              "tokens": args.samples * (args.seq_length - 1), "perplexity": round(perplexity(model, batches), 4)}  # fmt: skip
    ctx = ParallelContext.from_megatron()
    ctx.on_main(lambda: print(json.dumps(result), flush=True))
    if args.output:
        ctx.on_main(lambda: _write_json(Path(args.output), result))
    return result


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_prune.minitron.runtime.command import run_command

    return run_command("megatron_prune.minitron.distill.evaluate", evaluate, build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
