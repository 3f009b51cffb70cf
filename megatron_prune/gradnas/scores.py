"""Gradient scores of every attention head and MLP channel, from the user's loss on the data loader.

    sums = collect_gradients(model, space.sites, batches, loss_func, max_batches, checkpoint)
    scores = normalise(sums)   # {"layers.0.heads": tensor [12], "layers.0.ffn": tensor [1536], ...}; sum of all = 1

A mask of ones `m` of shape [B, 1, U] (one gate per sample and unit) multiplies the input of each layer's output
projection, seen as [B, S, heads, head_dim] (gating a head there equals gating its attention probabilities), and
the input of the MLP's down projection (post-activation and post-gating channels, so gated and plain MLPs alike).
`torch.autograd.grad(loss, masks)` gives dL/dm per sample; no parameter gradient is computed or stored, so
frozen parameters are fine and `.grad` is never touched.

Score of a unit = sum over samples of (B * dL/dm_i)^2: B undoes the batch mean of the loss, which makes each
term sample i's own squared gradient, independent of how samples are batched (the diagonal of the empirical
Fisher information of the masks). `normalise` divides by the total over every unit of the model, so the scores
do not depend on the loss scale, on the number of batches, or on the batch size.

While scoring, the model is in eval mode (dropout off) with `requires_grad` off on its parameters; both, and
the hooks, are restored afterwards, also on error. Progress (the sums, the batches done and a digest of those
batches) is checkpointed after every batch; a resumed run checks that the loader yields the same batches.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from megatron_prune.common.checkpoint import SearchCheckpoint
from megatron_prune.errors import PruneConfigError
from megatron_prune.fastnas.trace import run_model
from megatron_prune.common.log import Progress

Sites = Mapping[str, Tuple[str, int]]  # site -> (module whose input is gated, units)


class MaskHooks:
    """Forward pre-hooks that gate each site's input with a fresh mask of ones per batch (`reset()` between
    batches); `masks` holds this batch's masks. Use as a context manager: the hooks go away on exit."""

    def __init__(self, model: nn.Module, sites: Sites):
        self.model, self.sites = model, sites
        self.masks: Dict[str, torch.Tensor] = {}
        self.handles = []

    def __enter__(self) -> "MaskHooks":
        for site, (module, units) in self.sites.items():
            self.handles.append(self.model.get_submodule(module).register_forward_pre_hook(self._gate(site, units)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.masks = [], {}

    def reset(self) -> None:
        self.masks = {}

    def _gate(self, site: str, units: int):
        def hook(module, args):
            x = args[0]                                                  # [B, S, units * width]
            m = self.masks.get(site)
            if m is None or m.shape[0] != x.shape[0]:
                m = self.masks[site] = torch.ones(x.shape[0], 1, units, dtype=x.dtype, device=x.device, requires_grad=True)
            gate = m.reshape(x.shape[0], *([1] * (x.dim() - 2)), units, 1)  # [B, 1, units, 1]
            gated = x.reshape(*x.shape[:-1], units, x.shape[-1] // units) * gate
            return (gated.reshape(x.shape), *args[1:])
        return hook


@contextlib.contextmanager
def scoring_mode(model: nn.Module):
    """Eval mode, no parameter gradients, autograd on; every module's mode and every `requires_grad` restored."""
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in flags.items():
            p.requires_grad_(flag)


def default_loss(outputs, batch) -> torch.Tensor:
    """`outputs.loss` (HF models return it when the batch has labels)."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise PruneConfigError("the model returned no loss (outputs.loss is missing or None): put labels in the batches "
                               "(e.g. {'input_ids': ..., 'labels': ...}) or pass config['loss_func'] = f(outputs, batch) -> scalar")
    return loss


def check_loss(loss, batch_index: int) -> torch.Tensor:
    where = f"on batch {batch_index}"
    if not isinstance(loss, torch.Tensor):
        raise PruneConfigError(f"loss_func returned {type(loss).__name__} {where}: it must return a scalar tensor")
    if loss.numel() != 1:
        raise PruneConfigError(f"loss_func returned a tensor of shape {tuple(loss.shape)} {where}: it must be a scalar "
                               "(reduce it, e.g. with .mean())")
    if not loss.requires_grad:
        raise PruneConfigError(f"the loss has no gradient {where}: it does not depend on the model's outputs, or it was "
                               "computed under torch.no_grad() or detached")
    if not torch.isfinite(loss.detach()).all():
        raise PruneConfigError(f"the loss is {loss.item()} {where}: it must be finite")
    return loss.reshape(())


def batch_digest(previous: str, batch) -> str:
    """A running digest of the batches consumed (their tensors' shapes, dtypes and values)."""
    h = hashlib.sha256(previous.encode())

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, Mapping):
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        else:
            h.update(repr(x).encode())

    walk(batch)
    return h.hexdigest()


def collect_gradients(model: nn.Module, sites: Sites, batches: Iterable, collect: Callable, loss_func: Callable,
                      max_batches: int, checkpoint: SearchCheckpoint, total: Optional[int] = None,
                      log: Callable[[str], None] = lambda s: None) -> Tuple[Dict[str, object], int]:
    """Sum of squared per-sample mask gradients per site over the first `max_batches` batches, and how many of
    them came from the checkpoint: ({"sums": {site: float64 tensor [units]}, "samples": n, "batches": n, ...}, n)."""
    layout = {site: units for site, (_, units) in sites.items()}
    state = _resume(checkpoint.state, layout, max_batches, log)
    done, digest = state["batches"], ""
    progress = Progress("gradnas gradients", max(1, (min(total, max_batches) if total else max_batches) - done), unit="batches")
    with scoring_mode(model), MaskHooks(model, sites) as hooks:
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            digest = batch_digest(digest, batch)
            if i < done:  # already in the checkpoint's sums
                if i + 1 == done and digest != state["digest"]:
                    raise PruneConfigError(f"checkpoint {str(checkpoint.path)!r} holds gradients of other batches than this "
                                           "data loader's: pass the same data (in the same order) or another checkpoint path")
                continue
            hooks.reset()
            outputs = run_model(model, collect(batch))
            loss = check_loss(loss_func(outputs, batch), i)
            names = list(hooks.masks)
            grads = torch.autograd.grad(loss, [hooks.masks[n] for n in names], allow_unused=True)
            if all(g is None for g in grads):
                raise PruneConfigError(f"the loss does not depend on any attention head or MLP channel (batch {i})")
            for name, g in zip(names, grads):
                if g is None:
                    continue
                g = g.detach().double().reshape(g.shape[0], -1) * g.shape[0]  # [B, units]: B undoes the batch mean
                if not torch.isfinite(g).all():
                    raise PruneConfigError(f"non-finite gradients at {name} on batch {i}: check the loss and the model's dtype")
                state["sums"][name] = state["sums"][name] + g.pow(2).sum(0).cpu()
            state["samples"] += next(iter(hooks.masks.values())).shape[0]
            state["batches"], state["digest"] = i + 1, digest
            checkpoint.save_state(state)
            progress.step()
    if state["batches"] == 0:
        raise PruneConfigError("data_loader is empty: it must yield at least one batch")
    if state["batches"] < done:
        raise PruneConfigError(f"the data loader yields {state['batches']} batches, fewer than the {done} already in checkpoint "
                               f"{str(checkpoint.path)!r}: pass the same data or another checkpoint path")
    if done:
        log(f"gradnas: {done} batches of gradients taken from the checkpoint")
    if state["batches"] > done:
        progress.done()
    return state, done


def _resume(saved: Mapping[str, object], layout: Mapping[str, int], max_batches: int, log) -> Dict[str, object]:
    fresh = {"sums": {s: torch.zeros(u, dtype=torch.float64) for s, u in layout.items()}, "samples": 0, "batches": 0,
             "digest": "", "layout": dict(layout)}
    if not saved:
        return fresh
    if saved.get("layout") != dict(layout):
        log("gradnas: the checkpoint's gradients are for other sites; starting over")
        return fresh
    if saved["batches"] > max_batches:
        log(f"gradnas: the checkpoint has {saved['batches']} batches, more than max_batches={max_batches}; starting over")
        return fresh
    return {**fresh, **saved, "sums": {s: t.clone() for s, t in saved["sums"].items()}}


def normalise(state: Mapping[str, object]) -> Dict[str, torch.Tensor]:
    """Each unit's share of the total score of the model (float64; all shares sum to 1)."""
    sums = state["sums"]
    total = float(sum(t.sum() for t in sums.values()))
    if total <= 0:
        raise PruneConfigError("every gradient score is zero: the loss does not change with any head or MLP channel")
    return {s: t / total for s, t in sums.items()}
