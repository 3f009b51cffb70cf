"""Command-line flags for NAS (the CLI adds them to its parser): budgets, score function, search options.

    parser = argparse.ArgumentParser(); add_search_arguments(parser)
    options = search_options_from_args(parser.parse_args())
    prune(model, constraints=options.constraints, search=options.search, score_func=make_score_func(options.score, ...))

Divisor flags and defaults come from `SearchConfig`'s fields, so a new `*_divisor` field is a new flag.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Union

from megatron_prune.common.budgets import is_percent, parse_budget, parse_count
from megatron_prune.errors import PruneConfigError
from megatron_prune.minitron.config import BUDGETS, SearchConfig
from megatron_prune.minitron.data.scores import ScoreSpec

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SearchConfig)}


@dataclass(frozen=True)
class SearchOptions:
    constraints: Optional[Dict[str, Union[float, str]]]  # None: no budget flag given; "60%" until the model is counted
    search: SearchConfig
    score: ScoreSpec


def count_arg(text: str) -> float:
    """argparse type for a count ("1.5B", "3e9"): `budgets.parse_count`, its error shown as argparse's."""
    try:
        return parse_count(text, "value")
    except PruneConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def budget_arg(text: str) -> Union[float, str]:
    """argparse type for a budget: a count ("350M", as a number) or a percentage ("60%", kept as text: it is
    resolved against the model's own count once the model's config is read, `config.validate_budgets`)."""
    if not is_percent(text):
        return count_arg(text)  # on a command line a plain "8000" is a number
    try:
        parse_budget("budget", text, original=1.0)  # the syntax, whatever the original
    except PruneConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_search_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the NAS flags in their own argument group and return it."""
    g = parser.add_argument_group("NAS auto pruning", "give any of the --target-* budgets to search instead of a fixed export config")
    for budget in BUDGETS:
        unit = "MB of inference memory" if budget == "memory_mb" else budget.replace("_", " ") + " (e.g. 3B, 350M)"
        g.add_argument(_flag(f"target_{budget}"), type=budget_arg, default=None,
                       help=f"upper bound on {unit}, or a percentage of the model's (e.g. 60%%)")
    g.add_argument("--score-func", choices=("lm_loss", "mmlu"), default="lm_loss",
                   help="lm_loss: minus the LM loss on held-out batches; mmlu: accuracy on --score-data")  # fmt: skip
    g.add_argument("--score-data", default=None,
                   help="mmlu: a JSONL file of {question, choices, answer}; lm_loss (CLI): held-out text, else rows of --calib-data")
    g.add_argument("--score-fraction", type=float, default=1.0, help="mmlu: share of the questions scored")
    g.add_argument("--score-seed", type=int, default=0, help="mmlu: seed of the sample")
    g.add_argument("--score-batch-size", type=int, default=1, help="micro-batch size while scoring")
    g.add_argument("--top-k", type=int, default=_DEFAULTS["top_k"], help="candidates built and scored")
    for name in ("max_width_pruning", "max_depth_pruning"):
        g.add_argument(_flag(name), type=float, default=_DEFAULTS[name], help="largest share of an axis' choices dropped")
    g.add_argument("--axes-to-skip", nargs="+", default=[], metavar="AXIS", help="axes kept at their original size")
    for name, default in _DEFAULTS.items():
        if name.endswith("_divisor"):
            g.add_argument(_flag(name), type=int, default=default, help=f"{name[: -len('_divisor')]} choices are multiples of this")
    g.add_argument("--search-query-groups", action="store_true", help="also search num_query_groups (KV groups)")
    g.add_argument("--inference-seq-length", type=int, default=_DEFAULTS["seq_length"], help="memory budget: KV cache tokens per sequence")
    g.add_argument("--inference-batch-size", type=int, default=_DEFAULTS["batch_size"], help="memory budget: sequences")
    g.add_argument("--inference-weight-bytes", type=int, default=_DEFAULTS["dtype_bytes"],
                   help="memory budget: bytes per weight (2: bf16, 1: fp8)")
    g.add_argument("--inference-kv-cache-bytes", type=int, default=None,
                   help="memory budget: bytes per K/V cache value (default: --inference-weight-bytes)")
    g.add_argument("--inference-mamba-state-bytes", type=int, default=None,
                   help="memory budget: bytes per Mamba conv/SSM state value (default: --inference-weight-bytes)")
    return g


def search_options_from_args(args: argparse.Namespace) -> SearchOptions:
    """Budgets, SearchConfig and score spec from parsed flags (invalid values raise PruneConfigError)."""
    budgets = {b: getattr(args, f"target_{b}") for b in BUDGETS if getattr(args, f"target_{b}") is not None}
    divisors = {name: getattr(args, name) for name in _DEFAULTS if name.endswith("_divisor")}
    search = SearchConfig(
        top_k=args.top_k, max_width_pruning=args.max_width_pruning, max_depth_pruning=args.max_depth_pruning,
        axes_to_skip=tuple(args.axes_to_skip), search_query_groups=args.search_query_groups,
        seq_length=args.inference_seq_length, batch_size=args.inference_batch_size,
        dtype_bytes=args.inference_weight_bytes, kv_cache_dtype_bytes=args.inference_kv_cache_bytes,
        mamba_state_dtype_bytes=args.inference_mamba_state_bytes, **divisors,
    )  # fmt: skip
    score = ScoreSpec(args.score_func, args.score_data, args.score_fraction, args.score_seed, args.score_batch_size)
    return SearchOptions(budgets or None, search, score)
