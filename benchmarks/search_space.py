"""Benchmark: enumerating and counting a NAS search space, for Llama-3.1-8B shapes, without building a model.

Hidden 4096, FFN 14336, 32 heads in 8 KV groups (head dim 128), 32 layers, vocabulary 128256, untied.
Each case builds the search space, then for every combination checks it (`validate_export_config`),
counts its parameters and inference memory analytically and keeps those within the budget, sorted by
closeness to it: `search_candidates`, what `prune(constraints=...)` runs before calibration. Goal: under
one second with the default divisors.

    .venv/bin/python benchmarks/search_space.py     # writes benchmarks/results/search_space.json
"""

import json
import os
import statistics
import time

from megatron_prune.minitron.config import ModelShape, SearchConfig
from megatron_prune.minitron.search.counting import inventory_of_config
from megatron_prune.minitron.search.space import build_space, search_candidates

REPEATS = 7
CASES = {  # name: (search options, params budget)
    "defaults": ({}, 6e9),
    "defaults + query groups": ({"search_query_groups": True}, 6e9),
    "wide (60% width, 50% depth, divisors 128/256/1)": (
        {"max_width_pruning": 0.6, "max_depth_pruning": 0.5, "hidden_size_divisor": 128, "ffn_hidden_size_divisor": 256,
         "num_layers_divisor": 1}, 4e9),
}  # fmt: skip


def llama_8b():
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                             num_query_groups=8, kv_channels=128, gated_linear_unit=True, normalization="RMSNorm",
                             add_bias_linear=False)  # fmt: skip


def run_case(config, options: dict, budget: float) -> dict:
    search = SearchConfig(**options)
    shape = ModelShape.from_config(config)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        inventory = inventory_of_config(config, 128256, share_embeddings_and_output_weights=False)
        space = build_space(shape, search)
        fitting = search_candidates(space, inventory, {"params": budget}, search, shape)
        times.append(time.perf_counter() - start)
    best = fitting.candidates[0]
    return {
        "options": options, "space": space.display(), "space_size": space.size, "budget_params": budget,
        "fitting": len(fitting.candidates), "invalid": fitting.invalid, "closest": best.export_config,
        "closest_params": best.counts.params, "seconds_median": statistics.median(times), "seconds_max": max(times),
        "seconds_per_combination_us": 1e6 * statistics.median(times) / space.size,
    }  # fmt: skip


def main():
    config = llama_8b()
    original = inventory_of_config(config, 128256, share_embeddings_and_output_weights=False).count(ModelShape.from_config(config).sizes())
    result = {"model": "Llama-3.1-8B shapes", "params": original.params, "memory_mb_bf16_4k": original.memory_mb,
              "repeats": REPEATS, "cases": {name: run_case(config, *case) for name, case in CASES.items()}}  # fmt: skip
    out = os.path.join(os.path.dirname(__file__), "results", "search_space.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
