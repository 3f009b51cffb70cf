"""The scores file: calibration statistics cached on disk, independent of the parallel layout.

One file (written by global rank 0, atomically) holds the raw sums of *all* layers keyed by global layer
number, so a model loaded at any TP/PP/DP size can reuse it. A fingerprint of the model (architecture and a
sample of every weight, keyed by global names) guards against reusing scores from a different model.
The optional `search` section caches NAS candidates and their scores per budget (plain dicts, lists and
numbers); files written before it existed read as having an empty one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Dict, Optional, Tuple

import torch

from megatron_prune.importance.statistics import StatStore
from megatron_prune.runtime.parallel import ParallelContext
from megatron_prune.slicing.model import hybrid_pattern_of
from megatron_prune.slicing.table import is_tied_output_copy, layer_name, split_layer_name
from megatron_prune.slicing.tensor_parallel import logical, partitions

FORMAT = "megatron-prune/scores"
VERSION = 1
# Config fields that change what a layer computes (and so its activations), besides the weights.
_FINGERPRINT_FIELDS = (
    "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "num_layers",
    "gated_linear_unit", "normalization", "layernorm_epsilon", "layernorm_zero_centered_gamma",
    "add_bias_linear", "add_qkv_bias", "qk_layernorm", "qk_l2_norm", "softmax_scale", "window_size",
    "apply_residual_connection_post_layernorm", "rotary_interleaved", "no_rope_freq", "window_attn_skip_freq",
)  # fmt: skip
# The same for MoE models only (so that files of dense models keep their fingerprint).
_MOE_FINGERPRINT_FIELDS = (
    "num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_layer_freq",
    "moe_router_topk", "moe_router_score_function", "moe_router_pre_softmax", "moe_router_topk_scaling_factor",
    "moe_router_num_groups", "moe_router_group_topk", "moe_router_enable_expert_bias", "moe_shared_expert_gate",
    "moe_expert_capacity_factor", "moe_router_dtype",
)  # fmt: skip
_MAMBA_FINGERPRINT_FIELDS = ("mamba_num_heads", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim")
_VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")
_VOCAB_ROWS = 1024  # rows of vocabulary-indexed tensors digested: real tokens under any vocabulary padding


class ScoresFileError(ValueError):
    """The scores file cannot be used for this model (or is not a scores file)."""


def model_fingerprint(model: torch.nn.Module, ctx: ParallelContext) -> Dict[str, object]:
    """{architecture and activation-relevant config fields, weights digest}; identical at every TP/PP/DP
    layout of one model (vocabulary padding, which depends on TP, is left out).

    TP shards are digested in their logical full form (one gather per partitioned tensor when TP > 1).
    """
    cfg = model.config
    pattern = hybrid_pattern_of(model)  # hybrid models: which layer is which, and the Mamba sizes
    fields = _FINGERPRINT_FIELDS + (_MOE_FINGERPRINT_FIELDS if cfg.num_moe_experts else ()) + (_MAMBA_FINGERPRINT_FIELDS if pattern else ())
    arch = {f: getattr(cfg, f, None) for f in fields}
    if pattern:
        arch["hybrid_pattern"] = pattern
    arch["num_query_groups"] = arch["num_query_groups"] or cfg.num_attention_heads
    arch["kv_channels"] = arch["kv_channels"] or cfg.hidden_size // cfg.num_attention_heads
    arch["activation_func"] = getattr(cfg.activation_func, "__name__", repr(cfg.activation_func))
    arch["share_embeddings_and_output_weights"] = bool(model.share_embeddings_and_output_weights)
    arch["position_embedding_type"] = model.position_embedding_type
    rope = getattr(model, "rotary_pos_emb", None)
    arch["rotary_frequencies"] = _tensor_digest(rope.inv_freq) if rope is not None and hasattr(rope, "inv_freq") else None
    local = {}
    numbers = [int(layer.layer_number) for layer in model.decoder.layers]
    parts = partitions(model)
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor) or name.endswith("._extra_state"):
            continue
        if is_tied_output_copy(model, name):
            continue
        full = logical(t, parts.get(name), ctx)
        if name in _VOCAB_TENSORS:  # Megatron pads the vocabulary to a multiple of TP: skip the padding
            full = full[:_VOCAB_ROWS]
        index, inner = split_layer_name(name)
        if index is not None:
            name = layer_name(numbers[index], inner)
        local[name] = _tensor_digest(full)
    merged = {}
    for part in ctx.gather_over_pp(local):
        merged.update(part)
    h = hashlib.sha256()
    for name in sorted(merged):
        h.update(f"{name}:{merged[name]};".encode())
    return {"architecture": arch, "weights": h.hexdigest()}


def _tensor_digest(t: torch.Tensor, samples: int = 4096) -> str:
    """Hash of the shape and an evenly strided sample of at most `samples` values (cheap for multi-GB
    tensors; a change confined to unsampled values would go unnoticed)."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // samples)
    sample = flat[::step][:samples].float().cpu().contiguous()
    return f"{tuple(t.shape)}:" + hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]


def save_scores(path: str, stats: StatStore, fingerprint: Dict[str, object], ctx: ParallelContext,
                meta: Optional[dict] = None, search: Optional[dict] = None) -> None:  # fmt: skip
    """Write the file atomically on global rank 0 (temp file + rename); every rank returns, or raises
    the same error, once it is written. `search`: the NAS cache (global rank 0's is written)."""
    problem = None
    if ctx.is_main:
        payload = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint,
                   "statistics": stats.state_dict(), "meta": meta or {}, "search": search or {}}  # fmt: skip
        try:
            _write_atomically(path, payload)
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            problem = (ScoresFileError, f"could not write scores_path={path!r}: {type(e).__name__}: {e}")
    ctx.raise_first(problem)


def _write_atomically(path: str, payload: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".scores-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_scores(path: str, fingerprint: Dict[str, object]) -> Tuple[StatStore, dict]:
    """Load and check a scores file against this model's fingerprint; raises ScoresFileError on mismatch.
    Returns the statistics and the NAS cache (empty for files without one)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ScoresFileError(f"scores_path={path!r} is not a readable megatron-prune scores file: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or not isinstance(payload.get("fingerprint"), dict):
        raise ScoresFileError(f"scores_path={path!r} is not a megatron-prune scores file")
    if payload.get("version") != VERSION:
        raise ScoresFileError(f"scores_path={path!r} has version {payload.get('version')}, this megatron-prune reads {VERSION}")
    theirs, ours = payload["fingerprint"], fingerprint
    if theirs["architecture"] != ours["architecture"]:
        diff = [f"{k}: file {theirs['architecture'].get(k)!r} vs model {v!r}"
                for k, v in ours["architecture"].items() if theirs["architecture"].get(k) != v]  # fmt: skip
        raise ScoresFileError(f"scores_path={path!r} was computed for a different model ({'; '.join(diff)}); "
                              "delete it or choose another scores_path to recalibrate")  # fmt: skip
    if theirs["weights"] != ours["weights"]:
        raise ScoresFileError(f"scores_path={path!r} was computed for a model with the same architecture but different "
                              "weights; delete it or choose another scores_path to recalibrate")  # fmt: skip
    search = payload.get("search") or {}
    try:
        if not isinstance(search, dict):
            raise TypeError(f"search section is a {type(search).__name__}")
        return StatStore.from_state_dict(payload["statistics"]), search
    except (KeyError, TypeError, AttributeError) as e:
        raise ScoresFileError(f"scores_path={path!r} is damaged: {type(e).__name__}: {e}") from e
