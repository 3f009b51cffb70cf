"""Benchmark: the layouts issue 16 added, per rank, in one run each: calibration cost over a plain forward, and
peak host memory while pruning against the model's size.

    .venv/bin/torchrun --nproc-per-node 2 benchmarks/parallel_layouts.py --layout hybrid-tp2
    .venv/bin/torchrun --nproc-per-node 2 benchmarks/parallel_layouts.py --layout moe-ep2
    .venv/bin/torchrun --nproc-per-node 2 benchmarks/parallel_layouts.py --layout moe-tp2
writes benchmarks/results/parallel_layouts_<layout>.json.

hybrid-tp2: a hybrid model ("M*-M*-M-": Mamba, attention, MLP layers; hidden 512, 16 Mamba heads of 64 in 4 groups,
state 64, megatron-prune's CPU Mamba kernels) split over two TP ranks. moe-ep2: a MoE GPT (8 layers, hidden 512,
16 routed experts of FFN 512, top-2, the allgather dispatcher) with its experts split over two EP ranks (the dense
weights data-parallel). moe-tp2: the same MoE GPT with every linear split over two TP ranks, the routed experts' too
(expert TP 2, the alltoall dispatcher). All: vocabulary 8k, fp32, local spec. The model is built twice with the same weights: each
calibration micro-batch is forwarded through the hooked model and through its plain twin (alternating which
goes first), and the ratio is the
hooked / plain CPU time of each process summed over all micro-batches of all rounds (pairing cancels the drift of
a shared machine). The hooks are those of the default criteria (what `prune()` collects), registered once as
calibration registers them. Then the model is pruned
from the statistics (no calibration) and the peak RSS growth of each rank is compared with its shard's bytes.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: tests' model builders

import megatron_prune as mp  # noqa: E402
from megatron_prune.minitron.importance.criteria import resolve_criteria, statistics_needed  # noqa: E402
from megatron_prune.minitron.importance.hooks import register_hooks  # noqa: E402
from megatron_prune.minitron.importance.statistics import StatStore  # noqa: E402
from megatron_prune.minitron.runtime.distributed import init_distributed  # noqa: E402
from megatron_prune.minitron.runtime.parallel import ParallelContext  # noqa: E402

MB = 2**20
PATTERN = "M*-M*-M-"
MOE_TARGET = {"hidden_size": 384, "num_moe_experts": 8, "moe_ffn_hidden_size": 384, "num_layers": 6}
LAYOUTS = {  # name: (TP, EP, token dispatcher, the pruning target)
    "hybrid-tp2": (2, 1, None, {"hidden_size": 384, "mamba_num_heads": 8, "mamba_head_dim": 48, "num_layers": 6}),
    "moe-ep2": (1, 2, "allgather", MOE_TARGET),
    "moe-tp2": (2, 1, "alltoall", MOE_TARGET),
}


def build(layout: str, args):
    torch.manual_seed(0)
    if layout == "hybrid-tp2":
        from tests.tiny_mamba import build_tiny_mamba, tiny_mamba_config

        config = tiny_mamba_config(num_layers=len(PATTERN), hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden,
                                   num_attention_heads=8, num_query_groups=4, mamba_num_heads=16, mamba_head_dim=64,
                                   mamba_num_groups=4, mamba_state_dim=64)  # fmt: skip
        return build_tiny_mamba(config, vocab_size=args.vocab, hybrid_pattern=PATTERN, chunk_size=64).eval()
    from tests.tiny import build_tiny_gpt, tiny_gpt_config

    config = tiny_gpt_config(num_layers=8, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden, num_attention_heads=8,
                             num_query_groups=4, num_moe_experts=16, moe_router_topk=2, moe_ffn_hidden_size=args.hidden,
                             moe_token_dispatcher_type=LAYOUTS[layout][2], moe_grouped_gemm=False)  # fmt: skip
    return build_tiny_gpt(config, vocab_size=args.vocab).eval()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", choices=sorted(LAYOUTS), required=True)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="default: benchmarks/results/parallel_layouts_<layout>.json")
    args = p.parse_args()
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"parallel_layouts_{args.layout.replace('-', '_')}.json")
    torch.set_num_threads(1)
    tp, ep, _, target = LAYOUTS[args.layout]
    init_distributed(tensor_model_parallel_size=tp, expert_model_parallel_size=ep, seed=0)
    ctx = ParallelContext.from_megatron()
    hooked = build(args.layout, args)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (1, args.seq), generator=g) for _ in range(args.batches)]
    shard_mb = sum(p.numel() * p.element_size() for p in hooked.parameters()) / MB
    with tempfile.TemporaryDirectory() as tmp:  # memory first: the timing below holds a second copy of the model
        scores = os.path.join(tmp, "scores.pt")
        mp.calibrate(hooked, mp.make_forward_loop(batches[:2], progress=False), scores)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        pruned, result = mp.prune(hooked, target, scores_path=scores)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pruned_mb = sum(p.numel() * p.element_size() for p in pruned.parameters()) / MB
    del pruned
    plain = build(args.layout, args)
    sites = statistics_needed(resolve_criteria(None), backward=False, everything=False)
    handles = register_hooks(hooked, StatStore(), sites, ctx)  # once, as calibration registers them
    cpu = {"hooked": 0.0, "plain": 0.0}
    for round_ in range(args.rounds + 1):  # round 0 warms up and is not counted
        for tokens in batches:
            pair = (("hooked", hooked), ("plain", plain))
            for name, model in pair if round_ % 2 else pair[::-1]:  # alternate which goes first
                start = time.process_time()
                with torch.no_grad():
                    mp.run_forward(model, [tokens], shard_over_dp=False)
                if round_:
                    cpu[name] += time.process_time() - start
    for handle in handles:
        handle.remove()
    rank = {"cpu_s": cpu, "ratio": cpu["hooked"] / cpu["plain"], "shard_mb": shard_mb, "pruned_shard_mb": pruned_mb,
            "peak_rss_growth_mb": peak - before}  # fmt: skip
    ranks = ctx.gather_all(rank)
    if torch.distributed.get_rank() == 0:
        record = {"layout": args.layout, "model": {"hidden": args.hidden, "params": result.params_before,
                                                   "pruned_params": result.params_after, "tp": ctx.tp_size, "ep": ctx.ep_size,
                                                   "etp": ctx.etp_size},
                  "micro_batches": f"{args.rounds} rounds x {args.batches} x 1 x {args.seq} tokens", "ranks": ranks}  # fmt: skip
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(record, f, indent=1)
        print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
