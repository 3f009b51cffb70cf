"""Importance statistics as pure tensor math (no Megatron import).

Owns: the per-call contributions of each statistic and `StatStore`, the float32 accumulator table that
hooks add into. Does not own: where tensors are observed (hooks.py) or how sums cross ranks (reduce.py).

Every statistic is a *raw sum over forward calls*, never a mean, so calibration can be resumed and
partial sums from pipeline stages or data-parallel replicas add up to the single-process value.

Notation (MCore is sequence-first): X is [S, B, C] = [sequence, micro-batch, channels].
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Mapping, Tuple

import torch

Tensor = torch.Tensor


def channel_sum_sq(x: Tensor) -> Tensor:
    """Contribution of one call to the Minitron channel statistic ("L2 of mean-abs").

    x: [S, B, C] (or [T, C], treated as [T, 1, C]). Returns [C] float32:
        sum_b ( (1/S) * sum_s |x[s, b, c]| )^2
    The importance of channel c after calibration is sqrt(accumulated value): the L2 norm, over all
    calibration samples, of each sample's mean absolute activation.
    """
    x = x.detach().float()
    if x.dim() == 2:
        x = x.unsqueeze(1)
    if x.dim() != 3:
        raise ValueError(f"channel statistic expects [S, B, C] or [T, C], got shape {tuple(x.shape)}")
    return x.abs().mean(dim=0).square().sum(dim=0)


def rms_normed_channel_sum_sq(x: Tensor, weight: Tensor, eps: float, zero_centered_gamma: bool = False) -> Tensor:
    """`channel_sum_sq(rms_norm(x, weight, eps))` without materialising the normalised activations (for a norm
    fused into the next linear): |x r w| = |x| r |w| with r [S, B] the per-token scale, so the statistic is
    w_c^2 * sum_b ((1/S) sum_s |x[s, b, c]| r[s, b])^2: one pass for r, one weighted reduction. x: [S, B, C]."""
    x = x.detach().float()
    if x.dim() == 2:
        x = x.unsqueeze(1)
    S_, _, C = x.shape
    r = torch.rsqrt(torch.linalg.vecdot(x, x) / C + eps)  # [S, B]
    mean_abs = torch.bmm(r.t().unsqueeze(1), x.abs().transpose(0, 1)).squeeze(1) / S_  # [B, C]
    w = weight.detach().float() + (1.0 if zero_centered_gamma else 0.0)
    return mean_abs.square().sum(0) * w.square()


def block_influence(x_in: Tensor, x_out: Tensor) -> Tensor:
    """Contribution of one call to a layer's block-influence score: 1 - mean_{s,b} cos(x_in, x_out).

    x_in, x_out: [S, B, H] (the layer's input and output hidden states). Returns a float32 scalar.
    High values mean the layer changes its input a lot (important); near 0 means it is nearly an identity.
    """
    x, y = x_in.detach().float(), x_out.detach().float()
    norms = torch.linalg.vector_norm(x, dim=-1) * torch.linalg.vector_norm(y, dim=-1)
    cos = torch.linalg.vecdot(x, y) / norms.clamp_min(1e-8)  # [S, B]; ~5x cheaper than F.cosine_similarity on CPU
    return (1.0 - cos.mean()).reshape(())


def group_output_norms(x: Tensor, gram: Tensor) -> Tensor:
    """Contribution of one call to the output-contribution statistic of channel groups of a linear's input.

    x: [S, B, C] or [T, C], the input of a linear y = W x with W [H, C]; gram: [G, d, d] with C = G*d, the
    Gram matrices W_g^T W_g of each group's block of columns W_g [H, d]. Returns [G] float32:
        sum over tokens t of || W_g x_g(t) ||_2 = sqrt(x_g^T (W_g^T W_g) x_g),
    the size of what group g alone adds to the output (for attention heads: to the residual stream), summed
    over tokens. d = 1 is a channel: |x_c| * ||W[:, c]||. Cost per token G*d*d, not G*d*H.
    """
    G, d, _ = gram.shape
    x = x.detach().float().reshape(-1, G, d)  # [T, G, d]
    if d == 1:
        return x.abs().sum(0).squeeze(-1) * gram.reshape(G).clamp_min(0).sqrt()
    xg = x.transpose(0, 1)  # [G, T, d]
    quad = (torch.bmm(xg, gram.float()) * xg).sum(-1)  # [G, T]: x_g^T M_g x_g >= 0 up to rounding
    return quad.clamp_min(0).sqrt().sum(1)


def gram_blocks(weight: Tensor, heads_per_group: int, d: int) -> Tuple[Tensor, List[Tensor]]:
    """What `head_and_group_output_norms` multiplies by, from the weight [H, N*d] of `linear_proj` (N = G*q heads
    of width d, q = `heads_per_group`): each head's Gram block W_h^T W_h [G*q, d, d] and, for heads h < q-1, its
    blocks with the later heads of its group W_h^T W_h' [G, d, (q-1-h)*d]. Only these q(q+1)/2 of a group's q^2
    blocks are computed (a third less than the whole Gram matrix at q = 3: it is paid once per layer and
    calibration, as much as one micro-batch's statistics on a short calibration)."""
    q, H = heads_per_group, weight.shape[0]
    w = weight.detach().float().reshape(H, -1, q, d)  # [H, G, q, d]
    heads = w.reshape(H, -1, d).permute(1, 2, 0)  # [G*q, d, H]
    diagonal = torch.bmm(heads, heads.transpose(1, 2))
    rows = [torch.bmm(w[:, :, h].permute(1, 2, 0), w[:, :, h + 1 :].flatten(2).transpose(0, 1)) for h in range(q - 1)]
    return diagonal, rows


def head_and_group_output_norms(x: Tensor, blocks: Tuple[Tensor, List[Tensor]]) -> Tuple[Tensor, Tensor]:
    """`group_output_norms` for heads and for their query groups at once, about half the arithmetic of the two.

    x: [S, B, N*d] or [T, N*d]; blocks: `gram_blocks` of the query groups' column Gram matrices (N = G*q heads).
    A group's quadratic form is its heads' own (the diagonal d x d blocks) plus twice the cross terms
    x_h^T M_hh' x_h' (h < h'): G*q*(q+1)/2 products of d x d blocks per token instead of G*q + G*q^2.
    Returns ([N] head statistics, [G] group statistics)."""
    diagonal, rows = blocks
    Gq, d, _ = diagonal.shape
    G = Gq // (len(rows) + 1)
    xv = x.detach().float().reshape(-1, G, Gq // G * d)  # [T, G, q*d]
    heads = xv.view(xv.shape[0], Gq, d).transpose(0, 1)  # [G*q, T, d]
    own = torch.linalg.vecdot(torch.bmm(heads, diagonal), heads)  # [G*q, T]: x_h^T M_hh x_h
    quad = own.view(G, Gq // G, -1).sum(1)  # [G, T]
    for h, row in enumerate(rows):  # cross terms of head h with the heads after it
        left = xv[:, :, h * d : (h + 1) * d].transpose(0, 1)  # [G, T, d]
        right = xv[:, :, (h + 1) * d :].transpose(0, 1)  # [G, T, (q-1-h)*d]
        quad.add_(torch.linalg.vecdot(torch.bmm(left, row), right), alpha=2)
    return own.clamp_min(0).sqrt().sum(1), quad.clamp_min(0).sqrt().sum(1)


def column_gram(weight: Tensor, d: int) -> Tensor:
    """[G, d, d]: W_g^T W_g for the groups of d consecutive input columns of weight [H, C] (C = G*d), float32."""
    w = weight.detach().float()
    H, C = w.shape
    if C % d:
        raise ValueError(f"{C} input columns do not split into groups of {d}")
    if d == 1:  # squared column norms (a batched matmul of 1-wide blocks is pathologically slow on CPU)
        return w.square().sum(0).view(C, 1, 1)
    blocks = w.reshape(H, C // d, d).permute(1, 2, 0)  # [G, d, H]
    return torch.bmm(blocks, blocks.transpose(1, 2))


def taylor_groups(x: Tensor, grad: Tensor, d: int) -> Tensor:
    """Contribution of one call to the first-order Taylor statistic of channel groups (a mask m_g on them).

    x, grad: [S, B, C] (C = G*d), an activation and the loss gradient with respect to it. Multiplying group g
    by a mask m_g gives dL/dm_g = sum over the sample's tokens and the group's channels of x * grad. Returns
    [G] float32: sum over samples b of |dL/dm_g| (the importance is its mean over samples; a sum keeps it
    additive over calls, stages and replicas).
    """
    prod = (x.detach().float() * grad.detach().float())  # [S, B, C]
    if prod.dim() == 2:
        prod = prod.unsqueeze(1)
    S_, B, C = prod.shape
    return prod.sum(0).reshape(B, C // d, d).sum(-1).abs().sum(0)


def expert_output_norms(outputs: Tensor, tokens_per_expert: Tensor) -> Tensor:
    """Contribution of one call to the routed-expert statistic.

    outputs: [T, H], the experts' outputs for their tokens, grouped by expert in expert order (expert e
    owns the next tokens_per_expert[e] rows). Returns [2, E] float32: row 0 the sum over each expert's
    tokens of the output's L2 norm (over H), row 1 the number of those tokens. An expert's importance
    after calibration is row 0 / row 1: its mean per-token output norm (0 for an expert that got no token).
    """
    counts = tokens_per_expert.detach().long().cpu()
    norms = torch.linalg.vector_norm(outputs.detach().float(), dim=-1)  # [T]
    owner = torch.repeat_interleave(torch.arange(len(counts)), counts).to(norms.device)  # [T]
    sums = torch.zeros(len(counts), device=norms.device).index_add_(0, owner, norms)
    return torch.stack([sums, counts.to(sums)])


def rms_norm(x: Tensor, weight: Tensor, eps: float, zero_centered_gamma: bool = False) -> Tensor:
    """RMSNorm over the last dim in float32 (used to recompute a norm fused into a linear)."""
    x = x.float()
    w = weight.float() + (1.0 if zero_centered_gamma else 0.0)
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, zero_centered_gamma: bool = False) -> Tensor:
    """LayerNorm over the last dim in float32 (used to recompute a norm fused into a linear)."""
    w = weight.float() + (1.0 if zero_centered_gamma else 0.0)
    b = bias.float() if bias is not None else None
    return torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), w, b, eps)


class StatStore:
    """Float32 accumulators keyed by name (e.g. ``"layer3/fc2_in"``), plus a count of calibration calls.

    Keys carry global layer numbers, so stores from different pipeline stages merge by key union and
    stores from data-parallel replicas merge by addition.
    """

    def __init__(self, sums: Mapping[str, Tensor] | None = None, calls: int = 0):
        self.sums: Dict[str, Tensor] = {k: v.detach().float().cpu().clone() for k, v in (sums or {}).items()}
        self.calls = calls

    def add(self, key: str, value: Tensor) -> None:
        value = value.detach().float()
        if key in self.sums:
            self.sums[key] += value.to(self.sums[key].device)
        else:
            self.sums[key] = value.clone()

    def add_row(self, key: str, row: int, value: Tensor) -> None:
        """Add `value` to row `row` of an existing accumulator (one routed expert of a [E, C] statistic)."""
        self.sums[key][row] += value.detach().float().to(self.sums[key].device)

    def keys(self) -> Iterable[str]:
        return self.sums.keys()

    def __getitem__(self, key: str) -> Tensor:
        return self.sums[key]

    def to_cpu(self) -> "StatStore":
        return StatStore(self.sums, self.calls)

    def merge(self, other: "StatStore") -> "StatStore":
        """Sum of two stores: shared keys add, others are copied (the union)."""
        out = StatStore(self.sums, self.calls + other.calls)
        for k, v in other.sums.items():
            out.add(k, v.cpu())
        return out

    def reduce(self, all_reduce_sum: Callable[[Tensor], Tensor]) -> "StatStore":
        """Apply a sum-reduction (e.g. over data-parallel replicas) to every accumulator.

        All participants must hold the same keys; the values are flattened into one buffer so there is
        exactly one collective call per reduction.
        """
        keys = sorted(self.sums)
        flat = torch.cat([self.sums[k].reshape(-1) for k in keys] + [torch.tensor([float(self.calls)])])
        flat = all_reduce_sum(flat)
        out, offset = StatStore(), 0
        for k in keys:
            n = self.sums[k].numel()
            out.sums[k] = flat[offset : offset + n].reshape(self.sums[k].shape).clone()
            offset += n
        out.calls = int(round(flat[offset].item()))
        return out

    def state_dict(self) -> dict:
        return {"sums": {k: v.clone() for k, v in sorted(self.sums.items())}, "calls": self.calls}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> "StatStore":
        return cls(state["sums"], int(state["calls"]))
