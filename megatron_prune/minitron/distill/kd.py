"""Logit knowledge distillation of a student from a teacher through Megatron-core's own training machinery.

    loss = T^2 * mean over tokens of KL(softmax(teacher / T) || softmax(student / T))      (logits [B, S, V])

One optimizer step (`train_step`) runs the global batch through `get_forward_backward_func()` (forward_only=False):
each micro-batch [B, S] goes through the frozen teacher (no grad) and the student, the schedule back-propagates
the KL and accumulates gradients in Megatron's DDP grad buffers; `finalize_model_grads` all-reduces them over
data-parallel replicas; Megatron's optimizer (`get_megatron_optimizer`: Adam, fp32, grad clipping) steps and
`OptimizerParamScheduler` sets the LR (linear warm-up from 0, then decay lr -> min_lr over the remaining steps).
On a machine without CUDA, `runtime.cpu.apply_training_cpu_support()` makes those run on the CPU.

Scope: TP = PP = 1 (the teacher runs inside the student's forward step), any data-parallel size under torchrun
(DP=2 reproduced DP=1's losses and grad norms to 1e-8 on a tiny model).
This loop exists to check recovery on small models; real recovery needs Megatron-Bridge / Megatron-LM
distillation at scale (launch/distill.sh reads the same run card).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F

from megatron_prune.errors import PruneConfigError
from megatron_prune.minitron.runtime.parallel import ParallelContext


@dataclass(frozen=True)
class Schedule:
    """What one distillation run does (the run card's recipe, possibly overridden on the command line)."""

    train_iters: int
    micro_batch_size: int
    global_batch_size: int
    lr: float
    min_lr: float
    lr_warmup_iters: int
    lr_decay_style: str = "linear"
    temperature: float = 1.0
    clip_grad: float = 1.0
    weight_decay: float = 0.0
    adam_beta2: float = 0.95


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(teacher || student) per token: logits [B, S, V] (same V) -> [B, S], computed in fp32."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1) * temperature**2


class Distiller:
    """The student (wrapped in Megatron's DDP), its optimizer and LR schedule, and the frozen teacher.

    `vocab_size`: logits beyond it (Megatron's vocabulary padding) are dropped before the KL.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, schedule: Schedule, vocab_size: int):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from megatron_prune.minitron.runtime.cpu import apply_training_cpu_support

        self.ctx = ParallelContext.from_megatron()
        if self.ctx.tp_size > 1 or self.ctx.pp_size > 1:
            raise PruneConfigError(
                f"the CPU distillation loop runs at tensor/pipeline-parallel size 1 (got TP={self.ctx.tp_size}, "
                f"PP={self.ctx.pp_size}); use launch/distill.sh (Megatron-Bridge) for model parallelism"
            )
        per_replica = schedule.micro_batch_size * self.ctx.dp_size
        if schedule.global_batch_size % per_replica:
            raise PruneConfigError(
                f"global batch size {schedule.global_batch_size} is not a multiple of micro batch size "
                f"{schedule.micro_batch_size} x data-parallel size {self.ctx.dp_size}"
            )
        apply_training_cpu_support()
        self.schedule, self.vocab_size = schedule, vocab_size
        self.num_microbatches = schedule.global_batch_size // per_replica
        self.teacher = teacher.eval().requires_grad_(False)
        config = student.config
        self.model = DistributedDataParallel(
            config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False), student.train()
        )
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=schedule.lr, min_lr=schedule.min_lr, weight_decay=schedule.weight_decay,
                            adam_beta2=schedule.adam_beta2, clip_grad=schedule.clip_grad, bf16=False, fp16=False,
                            params_dtype=config.params_dtype),
            [self.model],
        )  # fmt: skip
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=schedule.lr, min_lr=schedule.min_lr,
            lr_warmup_steps=schedule.lr_warmup_iters, lr_decay_steps=schedule.train_iters, lr_decay_style=schedule.lr_decay_style,
            start_wd=schedule.weight_decay, end_wd=schedule.weight_decay, wd_incr_steps=schedule.train_iters, wd_incr_style="constant",
        )  # fmt: skip
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        config.no_sync_func = self.model.no_sync

    @property
    def student(self) -> torch.nn.Module:
        """The unwrapped student (e.g. to export it)."""
        return self.model.module

    def train_step(self, micro_batches: List[torch.Tensor]) -> Dict[str, float]:
        """One optimizer step over this replica's micro-batches (token ids [B, S] each).

        Returns {kd_loss, lm_loss (student next-token CE), grad_norm, lr (of this step)}: losses averaged over the
        global batch, before the update."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if len(micro_batches) != self.num_microbatches:
            raise ValueError(f"expected {self.num_microbatches} micro-batches per replica, got {len(micro_batches)}")
        mbs, seq = micro_batches[0].shape
        device = next(self.student.parameters()).device

        def forward_step(data_iterator, model):
            tokens = next(data_iterator).to(device)  # [B, S]
            position_ids = torch.arange(seq, device=device).unsqueeze(0).expand_as(tokens)
            with torch.no_grad():
                teacher_logits = self.teacher(tokens, position_ids, attention_mask=None)[..., : self.vocab_size]
            student_logits = model(tokens, position_ids, attention_mask=None)
            return student_logits, partial(self._loss, teacher_logits, tokens)

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[self.model],
            num_microbatches=len(micro_batches), seq_length=seq, micro_batch_size=mbs, forward_only=False,
        )  # fmt: skip
        lr = float(self.optimizer.param_groups[0]["lr"])  # the LR of this step (the scheduler sets the next one below)
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise RuntimeError("the optimizer step failed (non-finite gradients)")
        self.scheduler.step(increment=1)
        sums = torch.tensor([[r["kd_loss"], r["lm_loss"]] for r in reduced], dtype=torch.float64).sum(0)
        kd, lm = (self.ctx.sum_over_dp(sums) / (len(reduced) * self.ctx.dp_size)).tolist()
        return {"kd_loss": kd, "lm_loss": lm, "grad_norm": float(grad_norm or 0.0), "lr": lr}

    def _loss(self, teacher_logits: torch.Tensor, tokens: torch.Tensor, student_logits: torch.Tensor):
        student_logits = student_logits[..., : self.vocab_size]
        if student_logits.shape != teacher_logits.shape:
            raise PruneConfigError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                                   f"{tuple(teacher_logits.shape)} differ: they must share one vocabulary")  # fmt: skip
        loss = kd_loss(student_logits, teacher_logits, self.schedule.temperature).mean()
        # the student's mean next-token cross-entropy (logged, not optimised)
        lm = F.cross_entropy(student_logits[:, :-1].detach().float().flatten(0, 1), tokens[:, 1:].flatten())
        return loss, {"kd_loss": loss.item(), "lm_loss": lm.item()}


def replica_batches(rows: torch.Tensor, schedule: Schedule, ctx: ParallelContext, seed: int) -> Iterator[List[torch.Tensor]]:
    """Endless per-step micro-batch lists for this data-parallel replica from rows [N, S]: each step takes the
    next global batch of rows (reshuffled every epoch with `seed`), and replica r its r-th share."""
    gbs, mbs = schedule.global_batch_size, schedule.micro_batch_size
    if rows.shape[0] < gbs:
        raise PruneConfigError(f"the training data holds {rows.shape[0]} sequences, fewer than one global batch ({gbs})")
    share = gbs // ctx.dp_size
    for epoch in itertools.count():
        order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, rows.shape[0] - gbs + 1, gbs):
            mine = rows[order[start + ctx.dp_rank * share : start + (ctx.dp_rank + 1) * share]]
            yield list(mine.split(mbs))


def run(distiller: Distiller, batches: Iterator[List[torch.Tensor]], log_interval: int = 10,
        on_step: Optional[Callable[[int, Dict[str, float]], None]] = None) -> List[Dict[str, float]]:  # fmt: skip
    """`schedule.train_iters` steps; returns one record per step ({iteration, kd_loss, lm_loss, grad_norm, lr,
    tokens, elapsed_s}). Logs every `log_interval` steps (and the first and last); `on_step(iteration, record)`
    runs after each step (e.g. to save a checkpoint)."""
    from megatron_prune.common.log import log

    s = distiller.schedule
    tokens_per_step, history, start = None, [], time.perf_counter()
    for iteration in range(1, s.train_iters + 1):
        step = next(batches)
        tokens_per_step = tokens_per_step or sum(b.numel() for b in step) * distiller.ctx.dp_size
        record = {"iteration": iteration, **distiller.train_step(step), "tokens": iteration * tokens_per_step,
                  "elapsed_s": round(time.perf_counter() - start, 2)}  # fmt: skip
        history.append(record)
        if iteration == 1 or iteration % log_interval == 0 or iteration == s.train_iters:
            log(f"iteration {iteration}/{s.train_iters}: kd loss {record['kd_loss']:.4f}, student lm loss "
                f"{record['lm_loss']:.4f}, grad norm {record['grad_norm']:.3f}, lr {record['lr']:.2e}, "
                f"{record['tokens']:,} tokens, {record['elapsed_s']:.0f}s")  # fmt: skip
        if on_step is not None:
            on_step(iteration, record)
    return history
