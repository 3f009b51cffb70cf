"""Tier 1: the NAS command-line flags map onto budgets, SearchConfig and the score function spec."""

import argparse

import pytest

from megatron_prune.minitron.config import PruneConfigError, SearchConfig
from megatron_prune.minitron.data.scores import ScoreSpec
from megatron_prune.minitron.search.args import add_search_arguments, search_options_from_args


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_search_arguments(parser)
    return search_options_from_args(parser.parse_args(list(argv)))


def test_defaults_are_the_search_config_defaults():
    options = parse()
    assert options.constraints is None and options.search == SearchConfig() and options.score == ScoreSpec()


def test_flags():
    options = parse(
        "--target-params", "3.5B", "--target-memory-mb", "8000", "--target-active-params", "350M", "--top-k", "4",
        "--max-width-pruning", "0.5", "--max-depth-pruning", "0.25", "--axes-to-skip", "num_layers", "hidden_size",
        "--hidden-size-divisor", "64", "--ffn-hidden-size-divisor", "128", "--num-layers-divisor", "1",
        "--num-moe-experts-divisor", "4", "--mamba-head-dim-divisor", "16", "--search-query-groups",
        "--inference-seq-length", "8192", "--inference-batch-size", "2", "--inference-weight-bytes", "1",
        "--inference-kv-cache-bytes", "1", "--inference-mamba-state-bytes", "4",
        "--score-func", "mmlu", "--score-data", "mmlu.jsonl", "--score-fraction", "0.1", "--score-seed", "7",
        "--score-batch-size", "4",
    )  # fmt: skip
    assert options.constraints == {"active_params": 350e6, "params": 3.5e9, "memory_mb": 8000.0}
    assert options.search == SearchConfig(
        top_k=4, max_width_pruning=0.5, max_depth_pruning=0.25, axes_to_skip=("num_layers", "hidden_size"),
        hidden_size_divisor=64, ffn_hidden_size_divisor=128, num_layers_divisor=1, num_moe_experts_divisor=4,
        mamba_head_dim_divisor=16, search_query_groups=True, seq_length=8192, batch_size=2, dtype_bytes=1,
        kv_cache_dtype_bytes=1, mamba_state_dtype_bytes=4,
    )  # fmt: skip
    assert options.score == ScoreSpec("mmlu", "mmlu.jsonl", 0.1, 7, 4)


def test_bad_values():
    parser = argparse.ArgumentParser()
    add_search_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--target-params", "lots"])
    with pytest.raises(PruneConfigError, match="search.max_width_pruning=1.5 must be a fraction"):
        search_options_from_args(parser.parse_args(["--max-width-pruning", "1.5"]))
    with pytest.raises(PruneConfigError, match="search.kv_cache_dtype_bytes"):
        search_options_from_args(parser.parse_args(["--inference-kv-cache-bytes", "0"]))


def test_percent_budgets_are_kept_until_the_model_is_counted():
    options = parse("--target-params", "60%", "--target-memory-mb", "512")
    assert options.constraints == {"params": "60%", "memory_mb": 512.0}
    from megatron_prune.minitron.config import validate_budgets

    assert validate_budgets(options.constraints, {"params": 1e6, "memory_mb": 1e3}) == {"params": 6e5, "memory_mb": 512.0}
    parser = argparse.ArgumentParser()
    add_search_arguments(parser)
    for bad in ("150%", "x%"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--target-params", bad])
