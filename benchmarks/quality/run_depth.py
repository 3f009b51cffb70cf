"""Depth benchmark: one-shot vs iterative (SLEB-style) block-influence scoring on SmolLM2-135M, no retraining.

    python benchmarks/quality/run_depth.py [--windows 8] [--load CKPT] [--out benchmarks/results/quality_depth.json]

Same calibration (64 x 256 tokens of the packaged corpus) and held-out texts as run_quality.py. For 30→22 and
30→20 layers: the layers dropped, held-out perplexity, and the cost of the depth ranking (one-shot: part of the
single calibration; iterative: one more pass over the calibration data per dropped layer, timed). With --load the
model comes from a Megatron checkpoint (written there once from the HF folder if the directory does not exist)
instead of the HF folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGETS = {"layers 30→22": 22, "layers 30→20": 20}
VARIANTS = {
    "one-shot block influence": {},
    "iterative block influence": {"iterative": True},
    "one-shot, first and last protected": {"protected_layers": ["first", "last"]},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--load", default=None, help="a Megatron checkpoint of SmolLM2, written there first if absent "
                   "(default: the HF folder)")
    p.add_argument("--out", default="benchmarks/results/quality_depth.json")
    p.add_argument("--targets", nargs="*", default=list(TARGETS), help="subset of the target names")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), help="subset of the variant names")
    args = p.parse_args()

    from run_quality import cache_file, load_benchmark

    from megatron_prune import make_forward_loop, prune

    model, shape, calib, perplexities = load_benchmark(args.windows, load=args.load)
    scores = str(cache_file("quality_smollm2_scores.pt"))
    rows, start = [{"target": "unpruned", "variant": "—", **perplexities(model)}], time.perf_counter()
    print(json.dumps(rows[-1]), flush=True)
    for target_name in args.targets:
        layers = TARGETS[target_name]
        for variant in args.variants:
            depth = VARIANTS[variant]
            t0 = time.perf_counter()
            pruned, result = prune(model, {"num_layers": layers}, make_forward_loop(calib, progress=False),
                                   scores_path=scores, criteria="reference", depth=depth)  # fmt: skip
            seconds = time.perf_counter() - t0
            cost = (result.depth or {}).get("iterative_scoring", {"passes": 0, "seconds": 0.0})
            rows.append({"target": target_name, "variant": variant, "dropped": result.plan.dropped_layers,
                         "params": result.params_after, "ranking_passes": cost["passes"],
                         "ranking_seconds": cost["seconds"], "prune_seconds": round(seconds, 1), **perplexities(pruned)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
            del pruned
    out = {"model": "SmolLM2-135M-Instruct" + (f" from {args.load}" if args.load else ""),
           "calibration": "jargon file excerpt, 64 x 256 tokens, micro-batches of 4",
           "eval": f"{args.windows} windows x 512 tokens per text", "wall_time_s": round(time.perf_counter() - start),
           "rows": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    main()
