"""Benchmark: what calibration costs over a plain forward, against the reference's own hooks, in one run.

On GPTs in the Transformer Engine layout (fused norm + linear, built from the pure-torch stand-ins of
`../shared/peers/modelopt-minitron/te_standin.py`, the layout where norms must be recomputed), calibration runs
    null             no calibration at all: a third identical model without hooks (the noise floor of the pairing)
    modelopt         inside NVIDIA Model Optimizer's `mcore_minitron` pruning (its hooks: the reference)
    ours_default     inside `megatron_prune.prune` with the default criteria (what it collects by default)
    ours_reference   the same with criteria="reference" (the reference's statistics)
    ours_all         the same with all_statistics=True (every forward statistic, for later criterion switches)
and each calibration micro-batch is forwarded twice in a row: through the hooked model, then through an identical
model without hooks (the plain forward). The ratio is hooked / plain CPU time of the process, summed over every
micro-batch of every round: pairing each batch with its plain twin cancels the drift of a machine shared with
other jobs, which alternating whole passes did not (plain passes varied by 30% there). One torch thread by
default, so CPU time measures work, not threads spinning while another job holds the cores. compare.py
--timing-only (whole passes, 2 threads) is the reference's own measurement.

    .venv/bin/python benchmarks/calibration_cost.py [--models compare smollm2 llama1b llama8b] [--rounds 3] [--threads 1]

Writes benchmarks/results/calibration_cost.json.
"""

import argparse
import json
import os
import platform
import sys
import time

PEER = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "peers", "modelopt-minitron")
MODELS = {  # name: (layers, hidden, ffn, heads, query groups, vocabulary, sequence, calibration batches)
    "compare": (8, 512, 1536, 8, 2, 1024, 256, 8),  # compare.py --timing-only's model
    "smollm2": (30, 576, 1536, 9, 3, 49152, 256, 4),  # SmolLM2-135M's shape, random weights
    "llama1b": (4, 2048, 8192, 32, 8, 32000, 512, 2),  # Llama-3.2-1B's layer width (4 of its 16 layers), 32k vocabulary
    # two of Llama-3.1-8B's layers; vocabulary 8k keeps the output layer's 7% share of a token's multiply-adds
    "llama8b": (2, 4096, 14336, 32, 8, 8192, 512, 4),
}
VARIANTS = ("null", "modelopt", "ours_default", "ours_reference", "ours_all")


def paired_loop(batches, plain_model, record):
    """A calibration loop that forwards each batch through the (hooked) model, then through `plain_model`, and
    appends (hooked wall, hooked CPU, plain wall, plain CPU) seconds per batch to `record`."""
    import torch

    def forward(model, tok):
        pos = torch.arange(tok.shape[1])[None].expand(tok.shape[0], -1)
        t0, c0 = time.perf_counter(), time.process_time()
        model(tok, pos, None)
        return time.perf_counter() - t0, time.process_time() - c0

    def loop(model):
        with torch.no_grad():
            for tok in batches:
                record.append((*forward(model, tok), *forward(plain_model, tok)))

    return loop


def measure(C, mp, name, rounds):
    L, H, F, N, G, V, S, n = MODELS[name]
    build = lambda: C.build("RMSNorm", L, H, F, N, G, V, S, seed=3)  # noqa: E731 - identical weights every time
    ours, plain, null = build(), build(), build()
    calib = C.batches_of(n, 1, S, V, seed=11)
    export = {"hidden_size": H - 128}
    records = {v: [] for v in VARIANTS}
    options = {"ours_default": {}, "ours_reference": {"criteria": "reference"}, "ours_all": {"all_statistics": True}}
    C.make_loop(calib[:1])(plain)  # warm-up
    for _ in range(rounds):
        for variant in VARIANTS:
            loop = paired_loop(calib, plain, records[variant])
            if variant == "null":
                loop(null)
            elif variant == "modelopt":  # it prunes its model in place: a fresh copy each time
                C.modelopt_prune(build(), export, loop)
            else:
                mp.prune(ours, export, loop, **options[variant])

    return {
        "model": dict(zip(("layers", "hidden", "ffn", "heads", "query_groups", "vocab", "seq", "batches"), MODELS[name])),
        "seconds_per_batch_hooked_wall_cpu_plain_wall_cpu": records,
        **ratios(records, n),
    }


def ratios(records, n: int) -> dict:
    """Hooked / plain time summed over every batch (`ratio_cpu`, `ratio_wall`); the same without each calibration's
    first batch (`ratio_cpu_steady`: the cost per micro-batch of a long calibration); and what that first batch costs
    beyond the steady ratio, in plain batches (`one_time_cpu_in_plain_batches`: the Gram blocks of `linear_proj`, paid
    once per calibration, which a calibration of n batches spreads over n)."""

    def ratio(rows, hooked, base):
        return sum(r[hooked] for r in rows) / sum(r[base] for r in rows)

    out = {"ratio_cpu": {}, "ratio_wall": {}, "ratio_cpu_steady": {}, "one_time_cpu_in_plain_batches": {}}
    for variant, rows in records.items():
        out["ratio_cpu"][variant], out["ratio_wall"][variant] = ratio(rows, 1, 3), ratio(rows, 0, 2)
        if n > 1:
            steady, firsts = [r for i, r in enumerate(rows) if i % n], rows[::n]
            per_batch = out["ratio_cpu_steady"][variant] = ratio(steady, 1, 3)
            plain_batch = sum(r[3] for r in steady) / len(steady)
            out["one_time_cpu_in_plain_batches"][variant] = sum(r[1] - per_batch * r[3] for r in firsts) / len(firsts) / plain_batch
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--peer", default=PEER, help="folder of compare.py and te_standin.py")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "calibration_cost.json"))
    args = p.parse_args()

    sys.path.insert(0, os.path.abspath(args.peer))
    os.environ.setdefault("COMPARE_OUT", "/tmp")
    import compare as C  # initialises the process group and installs the TE stand-ins
    import torch

    import megatron_prune as mp
    from megatron_prune.common.log import log

    log("(the prunes below are only the vehicle of each calibration; their results are not used)")

    torch.set_num_threads(args.threads)
    result = {"torch_threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "date": time.strftime("%Y-%m-%d %H:%M"), "models": {}}  # fmt: skip
    for name in args.models:
        result["models"][name] = measure(C, mp, name, args.rounds)
        for key in ("ratio_cpu", "ratio_cpu_steady", "one_time_cpu_in_plain_batches"):
            print(f"{name} {key}: " + ", ".join(f"{v} {r:.3f}" for v, r in result["models"][name][key].items()), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
