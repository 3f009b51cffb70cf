"""Quality benchmark: held-out perplexity of SmolLM2-135M pruned (no retraining) with Minitron importance versus
random selection and weight magnitude at identical shapes.

    python benchmarks/quality/run_quality.py [--windows 8] [--seeds 3] [--out benchmarks/results/quality.json]

Calibration: the packaged Jargon File excerpt, 64 x 256 tokens (the CLI default), once; statistics cached.
Evaluation: `--windows` windows of 512 tokens from each held-out text (heldout.py), perplexity = exp(mean
next-token cross-entropy), through the same Megatron pipeline schedule as pruning. Runs on CPU in ~15 min.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGETS = {
    "FFN 1536→1024": {"ffn_hidden_size": 1024},
    "hidden 576→448": {"hidden_size": 448},
    "heads 9→6": {"num_attention_heads": 6},
    "layers 30→22": {"num_layers": 22},
    "width: hidden 512 + FFN 1024": {"hidden_size": 512, "ffn_hidden_size": 1024},
    "heads 9→6 + FFN 1536→1024": {"num_attention_heads": 6, "ffn_hidden_size": 1024},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seeds", type=int, default=3, help="random-selection seeds per target")
    p.add_argument("--targets", nargs="*", default=list(TARGETS), help="subset of the target names")
    p.add_argument("--out", default="benchmarks/results/quality.json")
    args = p.parse_args()

    from baselines import magnitude_importance, random_importance
    from megatron_prune import make_forward_loop, prune

    model, shape, calib, perplexities = load_benchmark(args.windows)
    scores = str(cache_file("quality_smollm2_scores.pt"))

    rows, start = [], time.perf_counter()
    base = perplexities(model)
    rows.append({"target": "unpruned", "method": "—", "params": sum(p.numel() for p in model.parameters()), **base})
    print(json.dumps(rows[-1]), flush=True)
    magnitude = magnitude_importance(model, shape)
    for target_name in args.targets:
        target = TARGETS[target_name]
        methods = [("minitron", {"criteria": "reference"})] + [("magnitude", {"importance": magnitude})]
        methods += [(f"random seed {s}", {"importance": random_importance(shape, s)}) for s in range(args.seeds)]
        for method, kwargs in methods:
            pruned, result = prune(model, target, make_forward_loop(calib), scores_path=scores, **kwargs)
            rows.append({"target": target_name, "method": method, "params": result.params_after, **perplexities(pruned)})
            print(json.dumps(rows[-1]), flush=True)
            del pruned
    out = {"model": "SmolLM2-135M-Instruct", "calibration": "jargon file excerpt, 64 x 256 tokens",
           "eval": f"{args.windows} windows x 512 tokens per text", "wall_time_s": round(time.perf_counter() - start),
           "rows": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


def load_benchmark(windows: int, load: str | None = None):
    """(SmolLM2 GPTModel at TP=PP=1, its ModelShape, calibration micro-batches, perplexities(model) -> {text: ppl}).

    Calibration: 64 x 256 tokens of the packaged corpus (seed 1234) in micro-batches of 4, as the CLI's
    default; evaluation: `windows` windows of 512 tokens of each held-out text."""
    from transformers import AutoTokenizer

    from heldout import heldout_sources
    from megatron_prune.minitron.bridge import import_hf_model
    from megatron_prune.minitron.bridge.offline_model import smollm2_folder
    from megatron_prune.minitron.config import ModelShape
    from megatron_prune.minitron.data.calibration import calibration_tokens, micro_batches
    from megatron_prune.minitron.data.scores import lm_loss_score
    from megatron_prune.minitron.runtime.distributed import init_distributed

    init_distributed(1, 1)
    source = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(source)
    calib = micro_batches(calibration_tokens("default", tokenizer, 64, 256, seed=1234), 4)
    evals = {name: lm_loss_score(micro_batches(calibration_tokens(path, tokenizer, windows, 512, seed=0), 1))
             for name, path in heldout_sources().items()}  # fmt: skip
    if load:  # the same model as a Megatron checkpoint, saved once (Megatron-Bridge's format) and loaded from it
        from megatron_prune.minitron.bridge.checkpoint import load_megatron_model, save_bridge_checkpoint

        if not Path(load).is_dir():
            save_bridge_checkpoint(import_hf_model(source).model, load, source)
        model = load_megatron_model(load).model
    else:
        model = import_hf_model(source).model

    def perplexities(m):
        return {name: round(math.exp(-score(m)), 2) for name, score in evals.items()}

    return model, ModelShape.from_config(model.config), calib, perplexities


def cache_file(name: str) -> Path:
    from megatron_prune.minitron.bridge.offline_model import cache_dir

    return cache_dir() / name


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    main()
