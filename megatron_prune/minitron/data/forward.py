"""Forward passes through Megatron's pipeline schedule, for calibration and evaluation.

`run_forward` drives `get_forward_backward_func()` in forward-only mode over micro-batches of token ids
[B, S], so the same code runs at PP=1 and PP>1 (the schedule moves activations between stages). With
`backward=True` it also runs the backward pass of the next-token loss through the schedule (gradients for
Taylor importance criteria; no optimizer step). With
data parallelism each replica takes every dp_size-th micro-batch, so the replicas together see each
micro-batch exactly once and their summed statistics equal a single process's.

`make_forward_loop(batches)` is the calibration loop `prune()` runs: it records what it runs on (a hash of the
token rows, `calibration_record`) and can run any range of its micro-batches, so calibration can be
checkpointed and resumed (`importance/calibration.py`).
"""

from __future__ import annotations

import hashlib
from functools import partial
from typing import Any, Callable, List, Mapping, Optional, Sequence, Union

import torch

from megatron_prune.common.log import Progress
from megatron_prune.minitron.runtime.parallel import ParallelContext

Collect = Callable[[torch.Tensor, torch.Tensor], Any]  # (logits [B, S, V], tokens [B, S]) -> anything


def run_forward(
    model: torch.nn.Module,
    batches: Sequence[torch.Tensor],
    collect: Optional[Collect] = None,
    shard_over_dp: bool = True,
    progress: Union[str, Progress, None] = None,
    backward: bool = False,
) -> List[Any]:
    """Forward every micro-batch (token ids [B, S], all of one shape) through the pipeline schedule.

    Returns, on the last pipeline stage, ``[collect(logits, tokens) for each micro-batch]`` (logits
    [B, S, V] as the model returns them); an empty list on other stages or when `collect` is None.
    `progress`: a label to print samples/s and ETA on rank 0 while running (or a `Progress` the caller shares
    between calls and closes). `backward`: run the backward pass
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
    meter = Progress(progress, len(mine), scale=mbs) if isinstance(progress, str) else progress

    def forward_step(data_iterator, model):
        tokens = next(data_iterator).to(device)
        position_ids = torch.arange(seq, device=device).unsqueeze(0).expand_as(tokens)
        # backward: the model's own (vocabulary-parallel) cross-entropy of the next tokens, per-token losses [B, S]
        labels = torch.roll(tokens, -1, dims=1) if backward else None
        output = model(tokens, position_ids, attention_mask=None, labels=labels)
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
    if isinstance(progress, str):
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


def calibration_record(batches: Sequence[torch.Tensor], settings: Optional[Mapping[str, Any]] = None) -> dict:
    """What a calibration runs on: {tokens_sha256 (the token rows in order), samples, seq_length, **settings}.

    The micro-batch split is left out: it changes no importance order. `settings` name where the rows came from
    (the CLI's --calib-data, --seed, ...) so that a mismatch can say which one changed."""
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(batch.detach().to(torch.int64).cpu().contiguous().numpy().tobytes())
    rows = sum(int(b.shape[0]) for b in batches)
    return {"tokens_sha256": digest.hexdigest(), "samples": rows, "seq_length": int(batches[0].shape[-1]) if batches else 0,
            **dict(settings or {})}  # fmt: skip


class ForwardLoop:
    """`forward_loop(model)` for calibration: forwards `batches` (token ids [B, S]) through the schedule.

    `backward=True` also back-propagates the next-token loss (what Taylor criteria need); `runs_backward` is what
    `prune()` checks before it calibrates with such a criterion. `calibration` records the data
    (`calibration_record`); `run_range(model, start, stop)` runs micro-batches [start, stop) only (each
    data-parallel replica its share), which makes calibration resumable."""

    def __init__(self, batches: Sequence[torch.Tensor], progress: bool = True, backward: bool = False,
                 settings: Optional[Mapping[str, Any]] = None):  # fmt: skip
        self.batches = list(batches)
        self.num_micro_batches = len(self.batches)
        self.progress, self.runs_backward = progress, backward
        self.calibration = calibration_record(self.batches, settings)

    @property
    def label(self) -> Optional[str]:
        return ("calibration (forward + backward)" if self.runs_backward else "calibration") if self.progress else None

    def __call__(self, model: torch.nn.Module) -> None:
        run_forward(model, self.batches, collect=None, progress=self.label, backward=self.runs_backward)

    def run_range(self, model: torch.nn.Module, start: int, stop: int, meter: Optional[Progress] = None) -> None:
        run_forward(model, self.batches[start:stop], collect=None, progress=meter, backward=self.runs_backward)


def make_forward_loop(batches: Sequence[torch.Tensor], progress: bool = True, backward: bool = False,
                      settings: Optional[Mapping[str, Any]] = None) -> ForwardLoop:  # fmt: skip
    """A `forward_loop(model)` for calibration over `batches` (token ids [B, S]); see `ForwardLoop`."""
    return ForwardLoop(batches, progress, backward, settings)
