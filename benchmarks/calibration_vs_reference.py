"""Benchmark: calibration cost of megatron-prune's hooks against Model Optimizer's own `mcore_minitron` hooks, side by
side in one run, on a Transformer-Engine-layout GPT (fused norm + linear, built from the CPU stand-ins of
../shared/peers/modelopt-minitron/te_standin.py, which the peer comparison script `compare.py` also uses).

Each round forwards the same calibration micro-batches (plain `model(tokens, positions, None)` calls) through: the
plain model; Model Optimizer's `mtp.prune` (its hooks installed; the forward loop is timed, not its sorting); and
megatron-prune's `prune()` with the reference's Minitron statistics and with the default criteria (its forward loop
timed the same way). Ratios are each side's CPU time over the plain forward's, best round and summed over rounds.

    .venv/bin/python benchmarks/calibration_vs_reference.py [--size small|medium|smollm2|llama8b] [--rounds 3] [--micro-batches N]
small: 8 layers, hidden 512, FFN 1536, 8 heads in 2 groups, 8 x 256 tokens (compare.py's timing model).
medium: 12 layers, hidden 768, FFN 2048, 12 heads in 4 groups, 4 x 512 tokens (~100M parameters with vocab 32k).
smollm2: SmolLM2-135M's shape (30 layers, hidden 576, FFN 1536, 9 heads in 3 groups, vocab 49k), 2 x 512 tokens.
llama8b: two of Llama-3.1-8B's layers (hidden 4096, FFN 14336, 32 heads in 8 groups), vocab 8192 so the output layer
keeps its 7% share of a token's multiply-adds, 4 x 512 tokens (the scale this library is built for).
Writes benchmarks/results/calibration_vs_reference_<size>.json.
"""

import argparse
import json
import os
import sys

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "peers", "modelopt-minitron")
if not os.path.isfile(os.path.join(PEER, "compare.py")):
    sys.exit(f"needs the peer comparison kit at {os.path.normpath(PEER)} (compare.py, te_standin.py)")
sys.path.insert(0, PEER)
os.environ.setdefault("COMPARE_OUT", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))

import compare  # noqa: E402  (initialises one process and installs the TE stand-ins; Model Optimizer imported)

import megatron_prune as mp  # noqa: E402

SIZES = {  # L, H, F, N, G, vocab, seq, micro-batches
    "small": (8, 512, 1536, 8, 2, 1024, 256, 8),
    "medium": (12, 768, 2048, 12, 4, 32000, 512, 4),
    "smollm2": (30, 576, 1536, 9, 3, 49152, 512, 2),
    "llama8b": (2, 4096, 14336, 32, 8, 8192, 512, 4),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--micro-batches", type=int, default=None,
                   help="calibration micro-batches (default: the size's); more of them amortise the one-time cost "
                        "per layer (the Gram blocks of linear_proj) as a real calibration does")
    args = p.parse_args()
    L, H, F_, N, G, V, S, n = SIZES[args.size]
    n = args.micro_batches or n
    base = compare.build("RMSNorm", L, H, F_, N, G, V, S, seed=3)
    calib = compare.batches_of(n, 1, S, V, seed=11)
    export = {"hidden_size": H * 3 // 4}
    t = {"plain": [], "modelopt": [], "reference_statistics": [], "default_criteria": []}
    compare.make_loop(calib[:2])(base)  # warm-up
    for _ in range(args.rounds):
        compare.make_loop(calib, t["plain"])(base)
        compare.modelopt_prune(compare.build("RMSNorm", L, H, F_, N, G, V, S, seed=3), export, compare.make_loop(calib, t["modelopt"]))
        mp.prune(base, export, compare.make_loop(calib, t["reference_statistics"]), criteria="reference")
        mp.prune(base, export, compare.make_loop(calib, t["default_criteria"]))  # no scores_path: always calibrates
    cpu = {k: [c for _, c in v] for k, v in t.items()}
    out = {
        "model": dict(layers=L, hidden=H, ffn=F_, heads=N, groups=G, vocab=V, seq=S, micro_batches=n, norm="RMSNorm",
                      layout="Transformer Engine stand-ins (fused norm + linear)", threads=2),
        "cpu_seconds": cpu,
        "ratio_best_round": {k: min(v) / min(cpu["plain"]) for k, v in cpu.items() if k != "plain"},
        "ratio_summed": {k: sum(v) / sum(cpu["plain"]) for k, v in cpu.items() if k != "plain"},
    }  # fmt: skip
    print(json.dumps({k: out[k] for k in ("model", "ratio_best_round", "ratio_summed")}, indent=1))
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"calibration_vs_reference_{args.size}{'' if args.micro_batches is None else f'_{n}mb'}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
