"""Importance criteria benchmark: every criterion of every pruned axis on SmolLM2-135M, no retraining, plus the
cost of each criterion's statistics.

    python benchmarks/quality/run_criteria.py [--windows 8] [--seeds 3] [--out benchmarks/results/quality_criteria.json]

One calibration (64 x 256 tokens of the packaged corpus, forward + backward so the Taylor statistics are there
too) serves every row: the criteria only choose which stored statistic ranks each axis. Random and magnitude
rows of the targets of run_quality.py are read from benchmarks/results/quality.json (they do not depend on the
criteria); the new head targets get their own random rows. Cost: each statistic set collected alone over the
same 4 micro-batches of 4 x 256 tokens, alternating with plain forwards; process CPU time (mean over
`--repeats`, robust to other jobs on the machine), the fastest wall time, and peak resident memory above the
model's, sampled every 5 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_quality import TARGETS as QUALITY_TARGETS  # noqa: E402

TARGETS = {**QUALITY_TARGETS, "heads 9→3": {"num_attention_heads": 3}, "KV groups 3→2": {"num_query_groups": 2, "num_attention_heads": 6}}
CRITERIA = ("minitron", "output_contribution", "taylor")


def variants(target: dict) -> list:
    """(label, criteria) pairs: every criterion of the axis the target prunes (heads + FFN: each heads criterion
    with FFN minitron, then each other FFN criterion with heads output_contribution)."""
    axes = set(target)
    if {"num_attention_heads", "ffn_hidden_size"} <= axes:
        return [(f"heads={c}, ffn=minitron", f"heads={c},ffn=minitron") for c in CRITERIA] + [
            (f"heads=output_contribution, ffn={c}", f"heads=output_contribution,ffn={c}") for c in CRITERIA[1:]]
    for axis, short in (("num_query_groups", "groups"), ("num_attention_heads", "heads"), ("ffn_hidden_size", "ffn")):
        if axis in axes:
            return [(f"{short}={c}", f"{short}={c}") for c in CRITERIA]
    return [("minitron / block_influence (only criterion)", "reference")]


COST_SETS = {  # statistic sets timed alone: what each criterion needs
    "minitron (reference)": ("qkv_in", "fc1_in", "proj_in", "fc2_in", "block"),
    "output_contribution (heads, groups, FFN)": ("proj_heads_out", "proj_groups_out", "fc2_out"),
    "all forward statistics (what calibration stores)": None,  # hooks.FORWARD_SITES
    "taylor (heads, groups, FFN) + all forward": "taylor",
}


class PeakRSS:
    """Peak resident set size (bytes) of this process while the block runs, sampled every 5 ms."""

    def __enter__(self):
        self.peak, self.stop = _rss(), False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_costs(model, batches, repeats: int) -> list:
    import gc

    from megatron_prune.minitron.data.forward import make_forward_loop, run_forward
    from megatron_prune.minitron.importance.hooks import FORWARD_SITES, LAYER_SITES, collect_statistics

    import torch

    def forward_only(m):
        with torch.no_grad():
            run_forward(m, batches)

    runs = {"plain forward (no hooks)": (lambda: forward_only(model))}
    for label, sites in COST_SETS.items():
        if sites == "taylor":
            loop, chosen = make_forward_loop(batches, progress=False, backward=True), tuple(s.name for s in LAYER_SITES)
        else:
            loop, chosen = make_forward_loop(batches, progress=False), sites or FORWARD_SITES
        runs[label] = (lambda loop=loop, chosen=chosen: collect_statistics(model, loop, chosen))
    times = {k: [] for k in runs}
    cpu = {k: 0.0 for k in runs}
    memory = {k: 0 for k in runs}
    for _ in range(repeats):
        for label, fn in runs.items():
            gc.collect()
            base = _rss()
            with PeakRSS() as peak:
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                times[label].append(time.perf_counter() - start)
                cpu[label] += time.process_time() - start_cpu
            memory[label] = max(memory[label], peak.peak - base)
    plain = "plain forward (no hooks)"
    return [{"statistics": k, "passes": "1 forward + 1 backward" if "taylor" in k else "1 forward",
             "fastest_s": round(min(v), 2), "cpu_s": round(cpu[k] / repeats, 2),
             "cpu_vs_plain_forward": round(cpu[k] / cpu[plain], 3), "fastest_vs_plain_forward": round(min(v) / min(times[plain]), 3),
             "peak_extra_memory_mb": round(memory[k] / 2**20)} for k, v in times.items()]  # fmt: skip


def markdown(results: dict, quality: dict) -> str:
    """The RESULTS.md tables: quality per target and criterion (with the random mean and magnitude at the same
    shape), then the costs."""
    def ppl(r):
        return " / ".join(f"{r[k]:,.1f}" if r[k] < 1000 else f"{r[k]:,.0f}" for k in r if k in TEXTS)

    baselines = {}
    for r in quality.get("rows", []) + results["rows"]:
        if r["method"].startswith("random") or r["method"] == "magnitude":
            kind = "random" if r["method"].startswith("random") else "magnitude"
            baselines.setdefault((r["target"], kind), []).append(r)
    mean = lambda rows: {k: sum(r[k] for r in rows) / len(rows) for k in TEXTS}  # noqa: E731
    lines = ["| target | criteria | parameters | held-out perplexity | random (mean) | magnitude |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if r["method"].startswith("random"):
            continue
        rnd, mag = baselines.get((r["target"], "random")), baselines.get((r["target"], "magnitude"))
        params = f"{r['params'] / 1e6:.1f}M" if "params" in r else ""
        lines.append(f"| {r['target']} | {r['method']} | {params} | {ppl(r)} | {ppl(mean(rnd)) if rnd else ''} | {ppl(mag[0]) if mag else ''} |")
    lines += ["", "| statistics collected | passes | CPU time | vs plain forward (CPU) | fastest wall | peak extra memory |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for c in results["costs"]:
        lines.append(f"| {c['statistics']} | {c['passes']} | {c['cpu_s']} s | {c['cpu_vs_plain_forward']:.2f} | {c['fastest_s']} s | {c['peak_extra_memory_mb']} MB |")
    return "\n".join(lines)


TEXTS = ("python_docs", "shakespeare")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seeds", type=int, default=3, help="random-selection seeds for the new head targets")
    p.add_argument("--repeats", type=int, default=2, help="cost: alternating repeats per statistic set (0: skip)")
    p.add_argument("--targets", nargs="*", default=list(TARGETS), help="subset of the target names")
    p.add_argument("--out", default="benchmarks/results/quality_criteria.json")
    p.add_argument("--costs-only", action="store_true", help="measure the costs and update them in --out")
    p.add_argument("--markdown", action="store_true", help="print the tables of --out (and quality.json) and exit")
    args = p.parse_args()
    if args.markdown:
        quality = Path(args.out).with_name("quality.json")
        print(markdown(json.loads(Path(args.out).read_text()), json.loads(quality.read_text()) if quality.exists() else {}))
        return

    from baselines import random_importance
    from megatron_prune import calibrate, make_forward_loop, prune
    from run_quality import cache_file, load_benchmark

    model, shape, calib, perplexities = load_benchmark(args.windows)
    scores = str(cache_file("criteria_smollm2_scores.pt"))
    start = time.perf_counter()
    costs = measure_costs(model, calib[:4], args.repeats) if args.repeats else []
    for row in costs:
        print(json.dumps(row), flush=True)
    if args.costs_only:
        previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        Path(args.out).write_text(json.dumps({**previous, "costs": costs, "cost_repeats": args.repeats}, indent=2) + "\n")
        return

    loop = make_forward_loop(calib, backward=True)  # stores the Taylor statistics too (used only if a criterion asks)
    calibration_start = time.perf_counter()
    if not os.path.exists(scores):  # one calibration for every row (kept in the cache for reruns)
        calibrate(model, loop, scores_path=scores)
    calibration_s = round(time.perf_counter() - calibration_start)
    rows = [{"target": "unpruned", "method": "—", **perplexities(model)}]
    print(json.dumps(rows[-1]), flush=True)
    for target_name in args.targets:
        target = TARGETS[target_name]
        methods = [(label, {"criteria": spec}) for label, spec in variants(target)]
        if target_name not in QUALITY_TARGETS:
            methods += [(f"random seed {s}", {"importance": random_importance(shape, s)}) for s in range(args.seeds)]
        for method, kwargs in methods:
            pruned, result = prune(model, target, loop, scores_path=scores, **kwargs)
            rows.append({"target": target_name, "method": method, "params": result.params_after, **perplexities(pruned)})
            print(json.dumps(rows[-1]), flush=True)
            del pruned
    out = {"model": "SmolLM2-135M-Instruct", "calibration": "jargon file excerpt, 64 x 256 tokens, forward + backward",
           "calibration_s": calibration_s, "eval": f"{args.windows} windows x 512 tokens per text",
           "wall_time_s": round(time.perf_counter() - start), "costs": costs, "rows": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    main()
