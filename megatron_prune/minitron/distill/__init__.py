"""Distillation hand-off: the run card written next to every pruned checkpoint, and a small CPU distillation loop.

    run_card.py   the card's schema, defaults (the published Minitron guideline), validation; YAML in and out
    handoff.py    a finished prune -> its card (what `megatron-prune` writes)
    args.py       the prune CLI's --distill-* flags
    kd.py         logit-KL distillation through Megatron-core's schedule and optimizer (`python -m megatron_prune.minitron.distill`)
    evaluate.py   held-out perplexity of an HF folder (`python -m megatron_prune.minitron.distill.evaluate`)

The CPU loop checks recovery on small models; real recovery needs Megatron-Bridge / Megatron-LM distillation at
scale on GPUs (launch/distill.sh consumes the same card).
"""

__all__ = ["FILE_NAME", "Checkpoint", "Parallelism", "Recipe", "RunCard", "RunCardError", "Tokenizer",
           "build_run_card", "load_run_card", "write_run_card"]  # fmt: skip


def __getattr__(name: str):
    """The run-card API, imported on first use (so `python -m megatron_prune.minitron.distill.run_card` runs cleanly)."""
    if name in __all__:
        from megatron_prune.minitron.distill import run_card

        return getattr(run_card, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
