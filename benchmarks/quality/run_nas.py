"""NAS on SmolLM2-135M to <= 100M parameters, versus the hand-chosen targets of run_quality.py, by held-out perplexity.

    python benchmarks/quality/run_nas.py [--budget 100e6] [--top-k 10] [--out benchmarks/results/quality_nas.json]

Candidates are scored by the LM loss on 16 x 256 tokens of the calibration corpus that are disjoint from the
64 calibration rows (the CLI's default for --score-func lm_loss); the winner is then evaluated exactly like
run_quality.py (Python docs, Shakespeare; never seen by calibration or scoring). Statistics come from the same
cached scores file as run_quality.py, so only the candidates cost time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=100e6)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--out", default="benchmarks/results/quality_nas.json")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from heldout import heldout_sources
    from megatron_prune import make_forward_loop, prune
    from megatron_prune.minitron.bridge import import_hf_model
    from megatron_prune.minitron.bridge.offline_model import cache_dir, smollm2_folder
    from megatron_prune.minitron.data.calibration import calibration_tokens, micro_batches
    from megatron_prune.minitron.data.scores import lm_loss_score
    from megatron_prune.minitron.runtime.distributed import init_distributed

    init_distributed(1, 1)
    source = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(source)
    rows = calibration_tokens("default", tokenizer, 64 + 16, 256, seed=1234)
    calib, held_out = micro_batches(rows[:64], 4), micro_batches(rows[64:], 4)
    evals = {name: lm_loss_score(micro_batches(calibration_tokens(path, tokenizer, args.windows, 512, seed=0), 1))
             for name, path in heldout_sources().items()}  # fmt: skip
    model = import_hf_model(source).model
    start = time.perf_counter()
    pruned, result = prune(model, constraints={"params": args.budget}, forward_loop=make_forward_loop(calib),
                           score_func=lm_loss_score(held_out), search={"top_k": args.top_k},
                           scores_path=str(cache_dir() / "quality_nas_smollm2_scores.pt"))  # fmt: skip
    search_s = time.perf_counter() - start
    ppl = {name: round(math.exp(-score(pruned)), 2) for name, score in evals.items()}
    out = {
        "budget_params": args.budget, "top_k": args.top_k, "search_wall_time_s": round(search_s),
        "space": {k: list(v) for k, v in result.search.space.items()}, "space_size": result.search.space_size,
        "candidates": [{"export_config": c.export_config, "params": c.counts.params,
                        "score_lm_loss": None if c.score is None else -c.score} for c in result.search.candidates],
        "winner": {"export_config": result.search.best.export_config, "params": result.params_after, **ppl},
    }  # fmt: skip
    print(json.dumps(out["winner"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
