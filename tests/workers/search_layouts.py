"""torchrun worker (2 processes): NAS counters, score functions and search under several parallel layouts.

Usage: search_layouts.py CASE OUT. CASE (torch file): "state_dict" of a full PP=1 model, "batches"
(calibration token ids), "held_out" (token ids), "questions" (a JSONL path), "constraints", "search".
For each layout every rank writes OUT/<layout>-rank<r>.pt with: the analytic and live parameter counts of
several model variants and candidate sizes, the two built-in scores of the original model, and the NAS
result (candidates, scores, winner) with the pruned weights under global names.
"""

import sys

import torch
from megatron.core import parallel_state

import megatron_prune as mp
from megatron_prune.minitron.runtime.distributed import init_distributed
from megatron_prune.minitron.runtime.parallel import ParallelContext
from tests.stages import global_state_dict, stage_state_dict
from tests.test_search_scores import CharTokenizer
from tests.tiny import build_tiny_gpt, tiny_gpt_config

LAYOUTS = {"pp2": (1, 2), "tp2": (2, 1), "dp2": (1, 1)}  # name: (tensor-parallel size, pipeline size)
VARIANTS = {  # config overrides, tied embeddings
    "gqa-swiglu-tied": ({}, True),
    "mha-swiglu-untied": ({"num_query_groups": 8}, False),
    "gqa-plain-untied-bias": ({"gated_linear_unit": False, "add_bias_linear": True}, False),
    "mha-plain-tied-layernorm": ({"num_query_groups": 8, "gated_linear_unit": False, "normalization": "LayerNorm"}, True),
}
CANDIDATES = [  # sizes the variants are counted at (heads/groups as multiples of 2 for TP=2)
    dict(hidden_size=64, ffn_hidden_size=128, num_layers=4),
    dict(hidden_size=48, ffn_hidden_size=96, num_layers=2),
    dict(hidden_size=32, ffn_hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=4),
]


def counts(ctx: ParallelContext) -> list:
    """(variant, sizes, analytic count, live count of the model Megatron builds for the sizes) for each case."""
    out = []
    for name, (opts, tied) in VARIANTS.items():
        model = build_tiny_gpt(tiny_gpt_config(**opts), tied=tied)
        inventory = mp.inventory_of(model, ctx)
        assert inventory == mp.inventory_of_config(model.config, 128, tied), name
        for sizes in CANDIDATES:
            sizes = dict(sizes)
            if opts.get("num_query_groups") == 8 and "num_attention_heads" in sizes:  # MHA keeps one head per group
                sizes["num_attention_heads"] = sizes["num_query_groups"]
            full = dict(hidden_size=64, ffn_hidden_size=128, num_attention_heads=8, num_query_groups=opts.get("num_query_groups", 4), num_layers=4)
            full.update(sizes)
            candidate = build_tiny_gpt(tiny_gpt_config(**{**opts, **full, "kv_channels": 8}), tied=tied)
            out.append((name, full, inventory.count(full).params, mp.count_params(candidate, ctx)))
    return out


def run(case: dict, out: str, name: str) -> None:
    tp, pp = LAYOUTS[name]
    init_distributed(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    ctx = ParallelContext.from_megatron()
    result = {"counts": counts(ctx)}
    model = build_tiny_gpt(tiny_gpt_config(), vocab_size=128, max_seq_length=128)
    model.load_state_dict(stage_state_dict(case["state_dict"], model), strict=True)
    result["lm"] = mp.lm_loss_score(case["held_out"])(model)
    result["mc"] = mp.multiple_choice_score(case["questions"], CharTokenizer(), batch_size=2)(model)
    loop = mp.make_forward_loop(case["batches"], progress=False)
    pruned, r = mp.prune(model, constraints=case["constraints"], forward_loop=loop, score_func=mp.lm_loss_score(case["held_out"]),
                         search=case["search"], scores_path=f"{out}/{name}-scores.pt")  # fmt: skip
    result["nas"] = {"candidates": [(c.export_config, c.counts.params, c.score) for c in r.search.candidates], "winner": r.search.winner}
    result["weights"] = global_state_dict(pruned)
    torch.save(result, f"{out}/{name}-rank{torch.distributed.get_rank()}.pt")
    parallel_state.destroy_model_parallel()


def run_uneven_with_identity_first_layer(case: dict, out: str) -> None:
    """Stage 0 holds only layer 1, which is an identity (lowest block influence): candidates with fewer
    layers would empty stage 0, so NAS must drop them, and a manual prune to 3 layers must refuse."""
    init_distributed(pipeline_model_parallel_size=2)
    state = dict(case["state_dict"])
    for name in ("decoder.layers.0.self_attention.linear_proj.weight", "decoder.layers.0.mlp.linear_fc2.weight"):
        state[name] = torch.zeros_like(state[name])
    model = build_tiny_gpt(tiny_gpt_config(num_layers_in_first_pipeline_stage=1), vocab_size=128, max_seq_length=128)
    model.load_state_dict(stage_state_dict(state, model), strict=True)
    scores = f"{out}/uneven-scores.pt"
    _, r = mp.prune(model, constraints=case["constraints"], forward_loop=mp.make_forward_loop(case["batches"], progress=False),
                    score_func=mp.lm_loss_score(case["held_out"]), search=case["search"], scores_path=scores)  # fmt: skip
    try:
        mp.prune(model, {"num_layers": 3}, scores_path=scores)
        error = "no error"
    except mp.PruneConfigError as e:
        error = str(e)
    result = {"candidates": [c.export_config for c in r.search.candidates], "ranking": r.orders.layer_ranking, "error": error}
    torch.save(result, f"{out}/uneven-rank{torch.distributed.get_rank()}.pt")
    parallel_state.destroy_model_parallel()


if __name__ == "__main__":
    case_path, out_dir = sys.argv[1:3]
    case = torch.load(case_path, weights_only=False)
    for layout in LAYOUTS:
        run(case, out_dir, layout)
    run_uneven_with_identity_first_layer(case, out_dir)
