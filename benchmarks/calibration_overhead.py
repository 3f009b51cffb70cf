"""Benchmark: calibration with importance hooks vs a plain forward over the same batches.

Runs a ~110M-parameter dense GPT (local spec, fp32, CPU) through Megatron's pipeline schedule, alternating
plain forwards, calibration passes collecting the reference's Minitron statistics only, and calibration
passes collecting every forward-only statistic (what `prune()` and `calibrate()` store: Minitron plus
output contribution, so that any forward-only criterion can be chosen later without calibrating again) over
identical micro-batches, and reports ratios (hooked / plain) measured in this one run: of the fastest
repeats (the least disturbed by other load on the machine), of the medians, and of the CPU time this
process used. Goal: <= 1.05 for the Minitron statistics.

    .venv/bin/python benchmarks/calibration_overhead.py [--layers 12 --hidden 768 --seq 512 --batches 6 --repeats 3]

Writes benchmarks/results/calibration_overhead.json.
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch

from megatron_prune.minitron.data.forward import run_forward
from megatron_prune.minitron.importance import statistics as S
from megatron_prune.minitron.importance.criteria import CRITERIA, REFERENCE_CRITERIA, resolve_criteria, statistics_needed
from megatron_prune.minitron.importance.hooks import FORWARD_SITES, collect_statistics
from megatron_prune.minitron.runtime.distributed import init_distributed


def build(args):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.hidden // 64,
        num_query_groups=args.hidden // 64 // 3 or 1, ffn_hidden_size=args.ffn, gated_linear_unit=True,
        normalization="RMSNorm", add_bias_linear=False, use_cpu_initialization=True, params_dtype=torch.float32,
        hidden_dropout=0.0, attention_dropout=0.0, pipeline_dtype=torch.float32,
    )  # fmt: skip
    model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=args.vocab,
                     max_sequence_length=args.seq, position_embedding_type="rope",
                     share_embeddings_and_output_weights=True)  # fmt: skip
    return model.eval()


def statistics_ms_per_layer(args, repeats: int = 50) -> float:
    """Milliseconds of the statistics' own arithmetic for one layer and one micro-batch (no forward)."""
    shape = (args.seq, args.micro_batch_size)
    hidden, ffn = torch.randn(*shape, args.hidden), torch.randn(*shape, args.ffn)
    store = S.StatStore()

    def one_layer():
        for site in ("qkv_in", "fc1_in", "proj_in"):  # proj_in is [S, B, N*d] = [S, B, H] here
            store.add(site, S.channel_sum_sq(hidden))
        store.add("fc2_in", S.channel_sum_sq(ffn))
        store.add("block", S.block_influence(hidden, ffn[..., : args.hidden]))

    one_layer()
    start = time.perf_counter()
    for _ in range(repeats):
        one_layer()
    return (time.perf_counter() - start) / repeats * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "calibration_overhead.json"))
    args = p.parse_args()

    init_distributed(seed=0)
    model = build(args)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.micro_batch_size, args.seq), generator=g) for _ in range(args.batches)]

    def plain():
        with torch.no_grad():
            run_forward(model, batches)

    minitron_sites = sorted({s for axis, name in REFERENCE_CRITERIA.items() for s in CRITERIA[axis][name].statistics})
    default_sites = statistics_needed(resolve_criteria(None), backward=False, everything=False)

    def hooked():
        collect_statistics(model, lambda m: run_forward(m, batches), minitron_sites)

    def hooked_default():
        collect_statistics(model, lambda m: run_forward(m, batches), default_sites)

    def hooked_all():
        collect_statistics(model, lambda m: run_forward(m, batches), FORWARD_SITES)

    runs = (("plain", plain), ("hooked", hooked), ("hooked_default", hooked_default), ("hooked_all", hooked_all))
    for _, fn in runs:  # warm-up every path
        fn()
    times = {name: [] for name, _ in runs}
    cpu = {name: 0.0 for name, _ in runs}
    for _ in range(args.repeats):
        for name, fn in runs:
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu[name] += time.process_time() - start_cpu
    ratios = [h / p for h, p in zip(times["hooked"], times["plain"])]
    stats_ms = statistics_ms_per_layer(args)
    plain_ms_per_batch = min(times["plain"]) / args.batches * 1e3
    result = {
        "params": n_params, "config": vars(args), "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "seconds": times, "cpu_seconds": cpu,
        "ratio_fastest": min(times["hooked"]) / min(times["plain"]),
        "ratio_median": statistics.median(times["hooked"]) / statistics.median(times["plain"]),
        "ratio_cpu_time": cpu["hooked"] / cpu["plain"], "ratios_per_repeat": ratios,
        "default_criteria": {
            "sites": list(default_sites),
            "ratio_fastest": min(times["hooked_default"]) / min(times["plain"]),
            "ratio_median": statistics.median(times["hooked_default"]) / statistics.median(times["plain"]),
            "ratio_cpu_time": cpu["hooked_default"] / cpu["plain"],
        },
        "all_forward_statistics": {
            "ratio_fastest": min(times["hooked_all"]) / min(times["plain"]),
            "ratio_median": statistics.median(times["hooked_all"]) / statistics.median(times["plain"]),
            "ratio_cpu_time": cpu["hooked_all"] / cpu["plain"],
        },
        "statistics_ms_per_layer": stats_ms,
        "ratio_predicted_from_statistics_cost": 1 + args.layers * stats_ms / plain_ms_per_batch,
        "tokens_per_s_plain": args.batches * args.micro_batch_size * args.seq / min(times["plain"]),
    }  # fmt: skip
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"model: {n_params / 1e6:.1f}M parameters, {args.batches} micro-batches of {args.micro_batch_size}x{args.seq} tokens")
    for name, _ in runs:
        print(f"{name:7s}: fastest {min(times[name]):.2f}s, median {statistics.median(times[name]):.2f}s, "
              f"CPU time {cpu[name]:.1f}s over {args.repeats} repeats")  # fmt: skip
    print(f"statistics arithmetic: {stats_ms:.2f} ms per layer per micro-batch -> predicted ratio "
          f"{result['ratio_predicted_from_statistics_cost']:.3f}")  # fmt: skip
    print(f"ratio hooked/plain: fastest {result['ratio_fastest']:.3f}, median {result['ratio_median']:.3f}, "
          f"CPU time {result['ratio_cpu_time']:.3f} (per repeat: {', '.join(f'{r:.3f}' for r in ratios)})")  # fmt: skip
    default = result["default_criteria"]
    print(f"ratio with the default criteria' statistics/plain: fastest {default['ratio_fastest']:.3f}, median "
          f"{default['ratio_median']:.3f}, CPU time {default['ratio_cpu_time']:.3f}")  # fmt: skip
    every = result["all_forward_statistics"]
    print(f"ratio with every forward statistic/plain: fastest {every['ratio_fastest']:.3f}, median {every['ratio_median']:.3f}, "
          f"CPU time {every['ratio_cpu_time']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
