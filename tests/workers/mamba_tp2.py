"""torchrun worker: a tiny hybrid Mamba model at TP=2, forward and backward, against a TP=1 run of the same weights.

Usage: mamba_tp2.py CASE OUT, at TP=2. CASE is a torch file with "state_dict" (a TP=1 model's), "tokens"
[batch, seq], "chunk_size" and "grads" (the TP=1 gradients of `loss`). Rank 0 saves to OUT the gathered
"logits" [batch, seq, vocab] and "grad_error", the largest difference between a TP=2 gradient and the
matching shard of the TP=1 one, relative to the largest entry of that shard, over the parameters of both ranks.
"""

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_prune.minitron.runtime.distributed import destroy_distributed, init_distributed
from tests.tiny_mamba import build_tiny_mamba, tiny_mamba_config


def loss(logits: torch.Tensor) -> torch.Tensor:
    """The scalar both runs differentiate: weights each logit differently, so every gradient is exercised."""
    weights = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view_as(logits)
    return (logits * weights).sum()


def mixer_segments(name: str, config) -> list:
    """Sizes of the independently TP-split blocks along dim 0 of a Mamba mixer tensor (one block otherwise)."""
    d_inner = config.mamba_num_heads * config.mamba_head_dim
    groups = config.mamba_num_groups * config.mamba_state_dim
    if name.endswith("mixer.in_proj.weight"):
        return [d_inner, d_inner, groups, groups, config.mamba_num_heads]  # z, x, B, C, dt
    if ".mixer.conv1d." in name:
        return [d_inner, groups, groups]  # x, B, C
    return []


def tp_shard(name: str, full: torch.Tensor, local: torch.Tensor, config) -> torch.Tensor:
    """This rank's shard of the TP=1 tensor `full`, for the local parameter `local`."""
    if full.shape == local.shape:
        return full
    rank, size = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    dim = getattr(local, "partition_dim", 0)
    blocks = full.split(mixer_segments(name, config) or [full.shape[dim]], dim=dim)
    return torch.cat([block.chunk(size, dim=dim)[rank] for block in blocks], dim=dim)


def main(case_path: str, out_path: str) -> None:
    init_distributed(tensor_model_parallel_size=2)
    case = torch.load(case_path)
    config = tiny_mamba_config()
    model = build_tiny_mamba(config, chunk_size=case["chunk_size"])
    params = dict(model.named_parameters())
    full = case["state_dict"]
    model.load_state_dict(
        {name: tp_shard(name, value, params[name], config) if name in params else value for name, value in full.items()},
        strict=True,
    )

    tokens = case["tokens"]
    logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), attention_mask=None)
    logits = gather_from_tensor_model_parallel_region(logits)  # [batch, seq, vocab]
    loss(logits).backward()
    grad_error = torch.tensor(0.0, dtype=torch.float64)
    for name, param in params.items():
        expected = tp_shard(name, case["grads"][name], param, config)
        error = (param.grad - expected).abs().max() / expected.abs().max()
        grad_error = torch.maximum(grad_error, error.double())
    dist.all_reduce(grad_error, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        torch.save({"logits": logits.detach(), "grad_error": grad_error.item()}, out_path)
    destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
