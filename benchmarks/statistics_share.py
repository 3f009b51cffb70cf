"""Benchmark: the importance statistics' own arithmetic as a share of a plain forward, timed inside a real calibration.

Whole-loop ratios (calibration_vs_reference.py) on this shared 2-core VM swing by +-10% from round to round, more
than the effect measured; here each statistic function is timed (process CPU time) as the default-criteria hooks call
it during calibration, and divided by the median plain forward of the same batches. It is the overhead the hooks
add up to the hook dispatch itself (a few microseconds per call). Same Transformer-Engine-layout GPT and sizes as
calibration_vs_reference.py (the peer kit's CPU stand-ins).

    .venv/bin/python benchmarks/statistics_share.py [--size smollm2|small|medium|llama8b] [--micro-batches N] [--repeats 4]

Writes benchmarks/results/statistics_share_<size>_<N>mb.json.
"""

import argparse
import json
import os
import statistics
import sys
import time

from calibration_vs_reference import SIZES, compare  # noqa: F401  (sets up the peer kit and one process)

from megatron_prune.minitron.importance import statistics as S  # noqa: E402
from megatron_prune.minitron.importance.criteria import resolve_criteria, statistics_needed  # noqa: E402
from megatron_prune.minitron.importance.hooks import collect_statistics  # noqa: E402

TIMED = ("head_and_group_output_norms", "gram_blocks", "rms_normed_channel_sum_sq", "channel_sum_sq", "block_influence")


def timed(spent: dict, name: str):
    function = getattr(S, name)

    def wrapper(*args, **kwargs):
        start = time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.process_time() - start

    return wrapper


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="smollm2")
    p.add_argument("--micro-batches", type=int, default=None)
    p.add_argument("--repeats", type=int, default=4)
    args = p.parse_args()
    L, H, F_, N, G, V, Sq, n = SIZES[args.size]
    n = args.micro_batches or n
    model = compare.build("RMSNorm", L, H, F_, N, G, V, Sq, seed=3)
    loop = compare.make_loop(compare.batches_of(n, 1, Sq, V, seed=11))
    sites = statistics_needed(resolve_criteria(None))
    spent: dict = {}
    for name in TIMED:  # the hooks call them through the module, so the wrappers see every call
        setattr(S, name, timed(spent, name))
    loop(model)  # warm-up
    plain = []
    for _ in range(args.repeats):
        start = time.process_time()
        loop(model)
        plain.append(time.process_time() - start)
        collect_statistics(model, loop, sites)
    forward = statistics.median(plain)
    share = {name: spent.get(name, 0.0) / args.repeats / forward for name in TIMED}
    out = {"model": dict(size=args.size, layers=L, hidden=H, ffn=F_, heads=N, groups=G, vocab=V, seq=Sq, micro_batches=n),
           "plain_forward_cpu_s": forward, "share_of_plain_forward": share, "total": sum(share.values())}  # fmt: skip
    print(json.dumps(out, indent=1))
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"statistics_share_{args.size}_{n}mb.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
