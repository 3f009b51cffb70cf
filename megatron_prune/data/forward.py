"""Forward passes through Megatron's pipeline schedule, for calibration and evaluation.

`run_forward` drives `get_forward_backward_func()` in forward-only mode over micro-batches of token ids
[B, S], so the same code runs at PP=1 and PP>1 (the schedule moves activations between stages). With
`backward=True` it also runs the backward pass of the next-token loss through the schedule (gradients for
Taylor importance criteria; no optimizer step). With
data parallelism each replica takes every dp_size-th micro-batch, so the replicas together see each
micro-batch exactly once and their summed statistics equal a single process's.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable, List, Optional, Sequence

import torch

from megatron_prune.log import log
from megatron_prune.runtime.parallel import ParallelContext

Collect = Callable[[torch.Tensor, torch.Tensor], Any]  # (logits [B, S, V], tokens [B, S]) -> anything


def run_forward(
    model: torch.nn.Module,
    batches: Sequence[torch.Tensor],
    collect: Optional[Collect] = None,
    shard_over_dp: bool = True,
    progress: str | None = None,
    backward: bool = False,
) -> List[Any]:
    """Forward every micro-batch (token ids [B, S], all of one shape) through the pipeline schedule.

    Returns, on the last pipeline stage, ``[collect(logits, tokens) for each micro-batch]`` (logits
    [B, S, V] as the model returns them); an empty list on other stages or when `collect` is None.
    `progress`: a label to print batches/s and ETA on rank 0 while running. `backward`: run the backward pass
    of the mean next-token cross-entropy of each micro-batch (unscaled by the number of micro-batches;
    gradients accumulate in `.grad`); `collect` is then not called.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ctx = ParallelContext.from_megatron()
    mine = list(batches[ctx.dp_rank :: ctx.dp_size]) if shard_over_dp else list(batches)
    if not mine:
        return []
    shapes = {tuple(b.shape) for b in mine}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"micro-batches must be token-id tensors [B, S] of one shape, got shapes {sorted(shapes)}")
    mbs, seq = next(iter(shapes))
    device = next(model.parameters()).device
    meter = _Progress(progress, len(mine), mbs) if progress else None

    def forward_step(data_iterator, model):
        tokens = next(data_iterator).to(device)
        position_ids = torch.arange(seq, device=device).unsqueeze(0).expand_as(tokens)
        if backward:  # the model's own (vocabulary-parallel) cross-entropy: per-token losses [B, S]
            output = model(tokens, position_ids, attention_mask=None, labels=torch.roll(tokens, -1, dims=1))
        else:
            output = model(tokens, position_ids, attention_mask=None)
        if meter:
            meter.step()
        return output, (partial(_next_token_loss, len(mine)) if backward else partial(_collect_output, collect, tokens))

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(mine),
        model=[model],
        num_microbatches=len(mine),
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=not backward,
        collect_non_loss_data=not backward,
    )
    if meter:
        meter.done()
    return list(outputs) if collect is not None and outputs and not backward else []


def _next_token_loss(num_microbatches: int, losses: torch.Tensor):
    """Mean over [B, S-1] of per-token losses [B, S] (the last position has no next token), times this rank's
    micro-batch count, which the schedule divides by: each micro-batch's gradient is then that of its own mean
    loss, whatever the data-parallel split or the number of batches (so gradient statistics add up exactly)."""
    loss = losses[:, :-1].float().mean()
    return loss * num_microbatches, {"lm loss": loss.detach()}


def _collect_output(collect: Optional[Collect], tokens, output_tensor, non_loss_data=False):
    return None if collect is None else collect(output_tensor, tokens)


def make_forward_loop(batches: Sequence[torch.Tensor], progress: bool = True, backward: bool = False) -> Callable[[torch.nn.Module], None]:
    """A `forward_loop(model)` for calibration: forwards `batches` (token ids [B, S]) through the schedule.

    `backward=True` also back-propagates the next-token loss (what Taylor criteria need) and marks the loop
    `runs_backward`, the attribute `prune()` checks before it calibrates with such a criterion."""

    def forward_loop(model: torch.nn.Module) -> None:
        label = ("calibration (forward + backward)" if backward else "calibration") if progress else None
        run_forward(model, batches, collect=None, progress=label, backward=backward)

    forward_loop.runs_backward = backward
    return forward_loop


class _Progress:
    """Prints `label: i/n micro-batches, x samples/s, ETA` at most every 10% and every 2 s (or after 30 s).

    Counts this rank's micro-batches; every data-parallel replica processes as many (rank 0 prints)."""

    def __init__(self, label: str, total: int, micro_batch_size: int = 1):
        self.label, self.total, self.done_n, self.mbs = label, total, 0, micro_batch_size
        self.start = self.last = time.perf_counter()
        self.every = max(1, total // 10)

    def step(self) -> None:
        self.done_n += 1
        now = time.perf_counter()
        if (self.done_n % self.every == 0 and now - self.last >= 2) or now - self.last > 30:
            self.last = now
            rate = self.done_n / max(now - self.start, 1e-9)
            eta = (self.total - self.done_n) / max(rate, 1e-9)
            log(f"{self.label}: {self.done_n}/{self.total} micro-batches, {rate * self.mbs:.2f} samples/s, ETA {eta:.0f}s")

    def done(self) -> None:
        seconds = time.perf_counter() - self.start
        log(f"{self.label}: {self.total} micro-batches in {seconds:.1f}s ({self.total * self.mbs / max(seconds, 1e-9):.2f} samples/s)")
