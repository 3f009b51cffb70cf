"""Baseline importance at identical shapes, for the quality benchmark: random selection and weight magnitude.

Both return a `megatron_prune.minitron.ranking.Importance` (higher = more important), so `prune(..., importance=...)`
slices exactly as it does with Minitron's activation-based importance; only the ranking differs.

    weight magnitude   hidden channel: L2 norm of its embedding column and of every linear_qkv/linear_fc1 column
                       FFN channel: L2 norm of its linear_fc1 rows (gate and up) and its linear_fc2 column
                       head: Frobenius norm of its linear_proj columns and its query rows of linear_qkv
                       layer: Frobenius norm of all the layer's weights
"""

from __future__ import annotations

import torch

from megatron_prune.minitron.config import ModelShape
from megatron_prune.minitron.ranking import Importance


def random_importance(shape: ModelShape, seed: int) -> Importance:
    g = torch.Generator().manual_seed(seed)
    layers = range(1, shape.num_layers + 1)
    return Importance.of(
        hidden=torch.rand(shape.hidden_size, generator=g),
        ffn={n: torch.rand(shape.ffn_hidden_size, generator=g) for n in layers},
        heads={n: torch.rand(shape.num_attention_heads, generator=g) for n in layers},
        layers={n: float(torch.rand(1, generator=g)) for n in layers},
    )


def magnitude_importance(model, shape: ModelShape) -> Importance:
    """From an unsharded (TP=1, PP=1) GPTModel built from the local layer spec."""
    sd = {k: v.float() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    N, G, d, F = shape.num_attention_heads, shape.num_query_groups, shape.kv_channels, shape.ffn_hidden_size
    q = N // G
    hidden = sd["embedding.word_embeddings.weight"].pow(2).sum(0)
    ffn, heads, layers = {}, {}, {}
    for i in range(shape.num_layers):
        p = f"decoder.layers.{i}."
        qkv, proj = sd[p + "self_attention.linear_qkv.weight"], sd[p + "self_attention.linear_proj.weight"]
        fc1, fc2 = sd[p + "mlp.linear_fc1.weight"], sd[p + "mlp.linear_fc2.weight"]
        hidden += qkv.pow(2).sum(0) + fc1.pow(2).sum(0)
        rows = fc1.pow(2).sum(1)
        ffn[i + 1] = (rows.view(-1, F).sum(0) + fc2.pow(2).sum(0)).sqrt()  # gate and up rows of channel f
        per_group = qkv.view(G, q + 2, d, -1)[:, :q]  # [G, q, d, H]: query rows, group-major like the heads
        query = per_group.pow(2).sum((2, 3)).flatten()  # [N]
        out = proj.view(proj.shape[0], N, d).pow(2).sum((0, 2))  # [N]
        heads[i + 1] = (query + out).sqrt()
        layers[i + 1] = float(sum(v.pow(2).sum() for k, v in sd.items() if k.startswith(p)).sqrt())
    return Importance.of(hidden=hidden.sqrt(), ffn=ffn, heads=heads, layers=layers)
