"""From a finished prune to its distillation run card: which checkpoints, which sizes, which teacher.

`write_prune_run_card` is what `megatron-prune` calls before publishing its output directory: the card is
validated against the folders just written (under the temporary directory) and written with their final paths.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

from megatron_prune.minitron.distill.run_card import (
    FILE_NAME, Checkpoint, Parallelism, Pruning, Tokenizer, build_run_card, fitting_size, misfits, write_run_card,
)  # fmt: skip
from megatron_prune.common.log import log
from megatron_prune.minitron.runtime.parallel import ParallelContext


def write_prune_run_card(result, written: str, final: str, source: str, vocab_size: int, save_format: str,
                         pruned_with: ParallelContext, layout: Dict[str, int], dtypes=(None, None),
                         megatron_source: bool = False, tokenizer: Optional[str] = None, **recipe) -> Path:  # fmt: skip
    """Write `written`/distillation_run_card.yaml for `result` (a `PruneResult`) whose checkpoints `hf/` and/or
    `megatron/` (per `save_format`: hf, megatron or both) lie under `written`, to be published as `final`: the card
    is validated against them, with their paths as they will be under `final`.

    `source`: the HF folder or hub id pruned (the teacher). `layout`: parallel sizes asked for ({Parallelism field:
    size}; kept, and checked); TP and PP not asked for are the pruning run's (`pruned_with`) or, if that does not
    divide both models, the largest smaller size that does (logged, with the reason). `dtypes`: (student, teacher)
    weight dtypes. `megatron_source`: `source` is a Megatron checkpoint (`--load`), whose tokenizer is `tokenizer`.
    `recipe`: overrides of the recipe defaults (e.g. seq_length, global_batch_size, train_tokens)."""
    hf_dir = os.path.join(written, "hf") if save_format in ("hf", "both") else None
    megatron_dir = os.path.join(written, "megatron") if save_format in ("megatron", "both") else None
    configs = {"student": result.export_config, "teacher": result.original_sizes}
    pruned_at = {"tensor_model_parallel_size": pruned_with.tp_size, "pipeline_model_parallel_size": pruned_with.pp_size}
    sizes = {name: layout.get(name) or fitting_size(name, size, configs) for name, size in pruned_at.items()}
    for name, size in pruned_at.items():
        if sizes[name] != size and not layout.get(name):
            bad = ", ".join(f"{model} {k}={v}" for model, k, v in misfits(name, size, configs))
            log(f"run card: {name} {sizes[name]}, not the prune's {size}: {size} does not divide {bad} (Megatron "
                f"splits them evenly); --distill-{name.replace('_', '-')} sets it")  # fmt: skip
    head_dim = {"kv_channels": result.config.kv_channels} if getattr(result.config, "kv_channels", None) else {}
    local = os.path.exists(os.path.expanduser(str(source)))
    where = str(Path(os.path.expanduser(str(source))).absolute()) if local else str(source)
    teacher = Checkpoint(hf_checkpoint=None if megatron_source else where, megatron_checkpoint=where if megatron_source else None,
                         config={**result.original_sizes, **head_dim}, params=int(result.params_before), dtype=dtypes[1])  # fmt: skip
    student = Checkpoint(hf_checkpoint=hf_dir, megatron_checkpoint=megatron_dir,
                         config={**result.export_config, **head_dim}, params=int(result.params_after), dtype=dtypes[0])  # fmt: skip
    tokenizer = Tokenizer(path=hf_dir or tokenizer or teacher.hf_checkpoint, vocab_size=int(vocab_size))
    pruning = Pruning(export_config={k: v for k, v in result.export_config.items() if result.original_sizes.get(k) != v},
                      params_before=int(result.params_before), params_after=int(result.params_after),
                      compression=round(1 - result.params_after / result.params_before, 4))  # fmt: skip
    card = build_run_card(student, teacher, tokenizer, pruning, Parallelism(**sizes), **recipe)
    old_root, new_root = str(Path(written).absolute()), str(Path(final).absolute())

    def moved(path: Optional[str]) -> Optional[str]:
        """`path`, under `final` instead if it lies under `written`."""
        if not path or os.path.commonpath([str(Path(path).absolute()), old_root]) != old_root:
            return path
        return new_root + str(Path(path).absolute())[len(old_root):]

    student.hf_checkpoint, student.megatron_checkpoint = moved(hf_dir), moved(megatron_dir)  # the card's own objects
    tokenizer.path = moved(tokenizer.path)
    return write_run_card(Path(written) / FILE_NAME, card)
