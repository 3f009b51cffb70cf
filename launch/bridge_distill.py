"""Distil a pruned student from its teacher with Megatron-Bridge, driven by the run card megatron-prune wrote.

    torchrun --nproc-per-node 8 launch/bridge_distill.py --run-card OUT/distillation_run_card.yaml --output-dir KD
    launch/distill.sh OUT/distillation_run_card.yaml --output-dir KD        # the same (CPU loop without a GPU)

Layers, so that all but the last run (and are tested) on a CPU:
    card_with_overrides(card, args)  the card with the command-line overrides applied, validated again
    bridge_settings(card, ...)       a plain dict of every value the Bridge config receives, keyed by
                                     ConfigContainer section and field name (--print-settings prints it)
    build_config(settings)           Megatron-Bridge's ConfigContainer: teacher and student providers from the HF
                                     checkpoints (AutoBridge; the student's sizes come from its own config, never
                                     from the command line), DistillationProvider with ModelOpt's logit-KL config,
                                     Adam with linear decay, the GPT dataset blend, checkpointing
    main()                           megatron.bridge.training.distill.distill(config): needs GPUs and the NeMo
                                     container (Transformer Engine, nvidia-resiliency-ext, megatron-energon)

Writes KD/checkpoints (Megatron torch_dist, iter_*), KD/tb_logs, KD/bridge_settings.json and, unless
--no-hf-export, KD/hf: the distilled student as an HF folder (the next prune's --hf-model).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from megatron_prune.minitron.distill.run_card import (
    RunCard, RunCardError, data_paths, has_placeholder_data, override_recipe, validate_run_card,
)  # fmt: skip

# recipe fields a flag may override (flag: --seq-length etc.), and the card's parallel sizes
_RECIPE = ("seq_length", "micro_batch_size", "global_batch_size", "train_iters", "train_tokens", "lr", "min_lr",
           "lr_warmup_iters", "lr_decay_style", "temperature", "seed")  # fmt: skip
_PARALLEL = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
             "expert_model_parallel_size")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bridge_distill.py",
        description="Megatron-Bridge knowledge distillation of a pruned student from its teacher, from a "
        "distillation run card (run under torchrun; the card's parallel sizes must divide the world size).",
    )
    p.add_argument("--run-card", required=True, help="distillation_run_card.yaml written by megatron-prune")
    p.add_argument("--output-dir", required=True, help="checkpoints, logs, settings and the HF export go here")
    r = p.add_argument_group("recipe overrides (default: the card's values)")
    for name in _RECIPE:
        kind = float if name in ("lr", "min_lr", "temperature") else str if name == "lr_decay_style" else int
        r.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    for name in _PARALLEL:
        r.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    d = p.add_argument_group("data (the card's data_blend unless given)")
    d.add_argument("--data-paths", nargs="+", default=None, metavar="W_OR_PATH",
                   help="Megatron-tokenized prefixes, optionally weighted: 0.7 /data/a_text_document 0.3 /data/b")  # fmt: skip
    d.add_argument("--mock-data", action="store_true", help="random tokens (a smoke test of the launch)")
    d.add_argument("--split", default="99,1,0", help="train,valid,test shares of the blend")
    d.add_argument("--data-cache", default=None, help="directory for the dataset index cache")
    t = p.add_argument_group("run")
    t.add_argument("--eval-interval", type=int, default=100, help="validate (and save) every N iterations")
    t.add_argument("--eval-iters", type=int, default=32)
    t.add_argument("--save-interval", type=int, default=None, help="default: --eval-interval")
    t.add_argument("--log-interval", type=int, default=10)
    t.add_argument("--precision", default="bf16_mixed", help="Megatron-Bridge mixed-precision recipe")
    t.add_argument("--no-hf-export", action="store_true", help="skip exporting the last checkpoint to OUT/hf")
    t.add_argument("--print-settings", action="store_true", help="print the settings as JSON and exit (runs anywhere)")
    return p


def card_with_overrides(card: RunCard, args: argparse.Namespace) -> RunCard:
    """A copy of `card` with the flags of `args` applied, validated again (RunCardError names the field).

    The recipe flags are those of `python -m megatron_prune.minitron.distill` (`override_recipe`): --train-iters sets the
    length (train_tokens follows); a new batch size or sequence length keeps the token budget (train_iters follows)."""
    card = copy.deepcopy(card)
    card.recipe = override_recipe(card.recipe, **{k: getattr(args, k, None) for k in _RECIPE})
    for name in _PARALLEL:
        if getattr(args, name, None) is not None:
            setattr(card.parallelism, name, getattr(args, name))
    return validate_run_card(card)


def bridge_settings(card: RunCard, output_dir: str, data: Optional[List[str]] = None, mock_data: bool = False,
                    split: str = "99,1,0", data_cache: Optional[str] = None, eval_interval: int = 100,
                    eval_iters: int = 32, save_interval: Optional[int] = None, log_interval: int = 10,
                    precision: str = "bf16_mixed", allow_placeholder: bool = False) -> Dict[str, Dict[str, Any]]:  # fmt: skip
    """Every value the Megatron-Bridge config receives, as {section: {field: value}} (sections are the
    ConfigContainer's, plus `student`, `teacher`, `kd` and `hf_export`). Pure: no Megatron import.
    `allow_placeholder`: accept the card's data placeholder (to print the settings before the data exists)."""
    if not card.teacher.hf_checkpoint:
        raise RunCardError("teacher.hf_checkpoint: Megatron-Bridge distillation builds the teacher from its HF checkpoint")
    r, par = card.recipe, card.parallelism
    if not mock_data and not data and has_placeholder_data(r) and not allow_placeholder:
        raise RunCardError("recipe.data_blend still holds the placeholder: put Megatron-tokenized data prefixes in the "
                           "card, or pass --data-paths (weight prefix ...), or --mock-data for a smoke test")  # fmt: skip
    out = Path(output_dir).absolute()
    model = {name: getattr(par, name) for name in _PARALLEL}
    model.update(sequence_parallel=par.tensor_model_parallel_size > 1, seq_length=r.seq_length)
    return {
        "student": {"hf_checkpoint": card.student.hf_checkpoint, "megatron_checkpoint": card.student.megatron_checkpoint,
                    "config": dict(card.student.config)},
        "teacher": {"hf_checkpoint": card.teacher.hf_checkpoint, "config": dict(card.teacher.config)},
        "model": model,  # applied to the student and the teacher provider alike (Bridge requires them equal)
        "kd": {"logit_kl_temperature": r.kd.temperature, "kd_loss_scale": r.kd.kd_loss_scale,
               "skip_lm_loss": r.kd.skip_lm_loss},
        "train": {"train_iters": r.train_iters, "global_batch_size": r.global_batch_size,
                  "micro_batch_size": r.micro_batch_size, "eval_interval": eval_interval, "eval_iters": eval_iters},
        "optimizer": {"lr": r.lr, "min_lr": r.min_lr, "precision": precision},
        "scheduler": {"lr_decay_style": r.lr_decay_style, "lr_warmup_iters": r.lr_warmup_iters,
                      "lr_decay_iters": r.train_iters},
        "dataset": {"seq_length": r.seq_length, "mock": mock_data,
                    "data_paths": None if mock_data else list(data or data_paths(r)), "split": split,
                    "path_to_cache": data_cache, "random_seed": r.seed},
        "tokenizer": {"tokenizer_type": "NullTokenizer", "vocab_size": card.tokenizer.vocab_size},
        "checkpoint": {"save": str(out / "checkpoints"), "load": str(out / "checkpoints"),
                       "save_interval": save_interval or eval_interval,
                       "pretrained_checkpoint": None if card.student.hf_checkpoint else card.student.megatron_checkpoint},
        "logger": {"log_interval": log_interval, "tensorboard_dir": str(out / "tb_logs")},
        "rng": {"seed": r.seed},
        "hf_export": {"path": str(out / "hf")},
    }  # fmt: skip


def build_config(settings: Dict[str, Dict[str, Any]]):
    """Megatron-Bridge's ConfigContainer for `settings` (see `bridge_settings`). Builds the providers from the
    checkpoints' configs; weights load when the training loop builds the models."""
    import torch
    from megatron.bridge.models.distillation_provider import convert_to_distillation_provider
    from megatron.bridge.training.config import (
        CheckpointConfig, ConfigContainer, DistributedDataParallelConfig, GPTDatasetConfig, LoggerConfig,
        MockGPTDatasetConfig, OptimizerConfig, RNGConfig, SchedulerConfig, TokenizerConfig, TrainingConfig,
    )  # fmt: skip
    from megatron.bridge.training.post_training.distillation import ModelOptDistillConfig

    s = settings
    student = _provider(s["student"])
    teacher = _provider({"hf_checkpoint": s["teacher"]["hf_checkpoint"]})
    for provider in (student, teacher):
        for name, value in s["model"].items():
            setattr(provider, name, value)
        provider.pipeline_dtype = torch.bfloat16
    _check_student_shape(student, s["student"]["config"])
    model = convert_to_distillation_provider(student, teacher, ModelOptDistillConfig(**s["kd"]))

    # Adam as in Megatron-Bridge's recipes (distributed_fused_adam_with_cosine_annealing), with the card's decay style
    bf16 = s["optimizer"]["precision"].startswith("bf16")
    optimizer = OptimizerConfig(optimizer="adam", lr=s["optimizer"]["lr"], min_lr=s["optimizer"]["min_lr"],
                                weight_decay=0.1, bf16=bf16, fp16=s["optimizer"]["precision"].startswith("fp16"),
                                adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, use_distributed_optimizer=True,
                                clip_grad=1.0)  # fmt: skip
    scheduler = SchedulerConfig(**s["scheduler"], lr_warmup_init=0.0, start_weight_decay=0.033, end_weight_decay=0.033,
                                weight_decay_incr_style="constant", override_opt_param_scheduler=True)  # fmt: skip
    d = s["dataset"]
    dataset_kwargs = dict(seq_length=d["seq_length"], random_seed=d["random_seed"], path_to_cache=d["path_to_cache"],
                          reset_attention_mask=False, reset_position_ids=False, eod_mask_loss=False,
                          num_dataset_builder_threads=1, data_sharding=True, dataloader_type="single",
                          skip_getting_attention_mask_from_dataset=True)  # fmt: skip
    if d["mock"]:
        dataset = MockGPTDatasetConfig(**dataset_kwargs)
    else:
        from megatron.core.datasets.utils import get_blend_from_list

        dataset = GPTDatasetConfig(blend=get_blend_from_list(d["data_paths"]), split=d["split"], **dataset_kwargs)
    return ConfigContainer(
        model=model,
        train=TrainingConfig(**s["train"], manual_gc=True, manual_gc_interval=100),
        optimizer=optimizer,
        scheduler=scheduler,
        ddp=DistributedDataParallelConfig(check_for_nan_in_grad=True, grad_reduce_in_fp32=True, overlap_grad_reduce=True,
                                          overlap_param_gather=True, average_in_collective=True,
                                          use_distributed_optimizer=True),  # fmt: skip
        dataset=dataset,
        logger=LoggerConfig(**s["logger"]),
        tokenizer=TokenizerConfig(**s["tokenizer"]),
        checkpoint=CheckpointConfig(**s["checkpoint"], most_recent_k=3, ckpt_format="torch_dist", async_save=False,
                                    fully_parallel_save=True),  # fmt: skip
        rng=RNGConfig(**s["rng"]),
        mixed_precision=s["optimizer"]["precision"],
    )


def _provider(model: Dict[str, Any]):
    """A Bridge model provider: from an HF checkpoint (its weights load when the model is built), else from a
    Megatron-Bridge checkpoint's run_config.yaml (its weights come in through checkpoint.pretrained_checkpoint)."""
    if model.get("hf_checkpoint"):
        from megatron.bridge import AutoBridge

        return AutoBridge.from_hf_pretrained(model["hf_checkpoint"]).to_megatron_provider(load_weights=True)
    from megatron.bridge.training.model_load_save import load_model_config

    iters = sorted(Path(model["megatron_checkpoint"]).glob("iter_*"))
    provider, _ = load_model_config(str(iters[-1] if iters else model["megatron_checkpoint"]))
    return provider


def _check_student_shape(provider, sizes: Dict[str, int]) -> None:
    """The provider built from the student's checkpoint must have the sizes the card records."""
    wrong = {k: (getattr(provider, k), v) for k, v in sizes.items() if getattr(provider, k, v) != v}
    if wrong:
        raise RunCardError("the student checkpoint's config disagrees with student.config in the card: "
                           + ", ".join(f"{k}: checkpoint {a}, card {b}" for k, (a, b) in wrong.items()))  # fmt: skip


def _last_checkpoint(checkpoints: str) -> Optional[str]:
    iters = sorted(p for p in Path(checkpoints).glob("iter_*") if p.is_dir())
    return str(iters[-1]) if iters else None


def export_hf(settings: Dict[str, Dict[str, Any]]) -> Optional[str]:
    """Rank 0, after training, with the process group destroyed: the last checkpoint -> OUT/hf (HF folder)."""
    student_hf = settings["student"]["hf_checkpoint"]
    last = _last_checkpoint(settings["checkpoint"]["save"])
    if not student_hf or not last:
        print(f"bridge_distill: no HF export ({'no checkpoint was saved' if not last else 'the card has no student.hf_checkpoint'})")
        return None
    from megatron.bridge import AutoBridge
    from transformers import AutoConfig

    out = settings["hf_export"]["path"]
    AutoBridge.from_hf_pretrained(student_hf).export_ckpt(megatron_path=last, hf_path=out, strict=True)
    AutoConfig.from_pretrained(student_hf).save_pretrained(out)  # the pruned config (explicit head_dim) as exported
    return out


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from megatron_prune.minitron.distill.run_card import load_run_card

        card = card_with_overrides(load_run_card(args.run_card), args)
        settings = bridge_settings(card, args.output_dir, args.data_paths, args.mock_data, args.split, args.data_cache,
                                   args.eval_interval, args.eval_iters, args.save_interval, args.log_interval,
                                   args.precision, allow_placeholder=args.print_settings)  # fmt: skip
    except RunCardError as e:
        print(f"bridge_distill: error: {e}", file=sys.stderr)
        return 2
    if args.print_settings:
        print(json.dumps(settings, indent=2))
        return 0

    import torch

    if not torch.cuda.is_available():
        print("bridge_distill: error: Megatron-Bridge distillation needs CUDA GPUs; without one use launch/distill.sh "
              "(it falls back to `python -m megatron_prune.minitron.distill`, the CPU loop)", file=sys.stderr)  # fmt: skip
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    par = card.parallelism
    model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size * par.context_parallel_size
    if world % model_parallel:
        print(f"bridge_distill: error: world size {world} is not a multiple of TP x PP x CP = {model_parallel}", file=sys.stderr)
        return 2

    from megatron.bridge.training.distill import distill

    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        Path(args.output_dir, "bridge_settings.json").write_text(json.dumps(settings, indent=2))
    distill(build_config(settings))
    if not args.no_hf_export:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()  # export_ckpt makes its own temporary group
        if rank == 0:
            out = export_hf(settings)
            if out:
                print(f"bridge_distill: distilled student exported to {out} (the next prune's --hf-model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
