"""The scores file: calibration statistics cached on disk, independent of the parallel layout.

One file (written by global rank 0, atomically) holds the raw sums of *all* layers keyed by global layer
number, so a model loaded at any TP/PP/DP size can reuse it. A fingerprint of the model (architecture and a
sample of every weight, keyed by global names) guards against reusing scores from a different model.
The optional `search` section caches NAS candidates and their scores per budget (plain dicts, lists and
numbers); files written before it existed read as having an empty one. The optional `calibration` section
records what the statistics were computed on (`data.forward.calibration_record`: a hash of the token rows and
the settings behind them); `calibration_mismatch` says how another calibration differs. A file is also the
format of a calibration's checkpoint (`<scores_path>.partial`, with `meta["partial"]`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from megatron_prune.common.checkpoint import atomic_save
from megatron_prune.errors import ScoresFileError  # noqa: F401  (raised here; importable from here too)
from megatron_prune.minitron.axes import default_kv_channels
from megatron_prune.minitron.importance.statistics import StatStore
from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.slicing.model import hybrid_pattern_of
from megatron_prune.minitron.slicing.table import (
    expert_name, is_tied_output_copy, layer_name, split_expert_name, split_layer_name,
)
from megatron_prune.minitron.slicing.tensor_parallel import logical, partitions

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


# Settings of a calibration record that users set, with the command-line flag that sets each
CALIBRATION_FLAGS = {"data": "--calib-data", "samples": "--calib-samples", "seq_length": "--seq-length", "seed": "--seed",
                     "text_field": "--calib-text-field", "split": "--calib-split"}  # fmt: skip


@dataclass
class ScoresFile:
    """The contents of a scores file."""

    stats: StatStore
    fingerprint: Optional[Dict[str, object]]
    meta: dict = field(default_factory=dict)  # layout it was written at; "partial" for a calibration checkpoint
    search: dict = field(default_factory=dict)  # the NAS cache
    calibration: Optional[dict] = None  # what the statistics were computed on; None when unknown (older files)

    def to_payload(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "statistics": self.stats.state_dict(),
                "meta": self.meta or {}, "search": self.search or {}, "calibration": self.calibration}  # fmt: skip

    @classmethod
    def from_payload(cls, payload: dict) -> "ScoresFile":
        return cls(StatStore.from_state_dict(payload["statistics"]), payload["fingerprint"], payload.get("meta") or {},
                   payload.get("search") or {}, payload.get("calibration"))  # fmt: skip


def calibration_mismatch(recorded: Optional[dict], wanted: Optional[dict]) -> Optional[str]:
    """How the calibration `wanted` differs from the one a file `recorded` (None: the same, or unknown because a
    side records nothing or the file extended several calibrations). Names the settings that changed."""
    if not recorded or not wanted or "extended" in recorded or recorded.get("tokens_sha256") == wanted.get("tokens_sha256"):
        return None
    changed = [f"{CALIBRATION_FLAGS.get(k, k)} {recorded.get(k)!r} in the file, {wanted.get(k)!r} now"
               for k in sorted(set(recorded) | set(wanted), key=str) if k != "tokens_sha256" and recorded.get(k) != wanted.get(k)]  # fmt: skip
    return "; ".join(changed) or "the calibration tokens differ with the same settings (the data files or the tokenizer changed)"


def config_architecture(cfg, pattern: Optional[str] = None) -> Dict[str, object]:
    """The part of the architecture fingerprint a config alone gives (so a file of another model is refused
    before that model's weights are read); `pattern`: a hybrid model's layer pattern."""
    fields = _FINGERPRINT_FIELDS + (_MOE_FINGERPRINT_FIELDS if cfg.num_moe_experts else ()) + (_MAMBA_FINGERPRINT_FIELDS if pattern else ())
    arch = {f: getattr(cfg, f, None) for f in fields}
    if pattern:
        arch["hybrid_pattern"] = pattern
    arch["num_query_groups"] = arch["num_query_groups"] or cfg.num_attention_heads
    arch["kv_channels"] = default_kv_channels(cfg)
    arch["activation_func"] = getattr(cfg.activation_func, "__name__", repr(cfg.activation_func))
    return arch


def model_fingerprint(model: torch.nn.Module, ctx: ParallelContext) -> Dict[str, object]:
    """{architecture and activation-relevant config fields, weights digest}; identical at every TP/PP/DP
    layout of one model (vocabulary padding, which depends on TP, is left out).

    TP shards are digested in their logical full form (one gather per partitioned tensor when TP > 1).
    """
    cfg = model.config
    arch = config_architecture(cfg, hybrid_pattern_of(model))  # hybrid models: which layer is which, Mamba sizes
    arch["share_embeddings_and_output_weights"] = bool(model.share_embeddings_and_output_weights)
    arch["position_embedding_type"] = model.position_embedding_type
    rope = getattr(model, "rotary_pos_emb", None)
    arch["rotary_frequencies"] = _tensor_digest(rope.inv_freq) if rope is not None and hasattr(rope, "inv_freq") else None
    local = {}
    numbers = [int(layer.layer_number) for layer in model.decoder.layers]
    parts = partitions(model)
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor) or name.endswith("._extra_state") or is_tied_output_copy(model, name):
            continue
        full = logical(t, parts.get(name), ctx)
        if name in _VOCAB_TENSORS:  # Megatron pads the vocabulary to a multiple of TP: skip the padding
            full = full[:_VOCAB_ROWS]
        index, inner = split_layer_name(name)
        if index is not None:
            expert, role = split_expert_name(inner)
            if expert is not None and ctx.ep_size > 1:  # this rank's experts, named by their global number
                inner = expert_name(ctx.ep_rank * cfg.num_moe_experts // ctx.ep_size + expert, role)
            name = layer_name(numbers[index], inner)
        local[name] = _tensor_digest(full)
    over_ep = {k: v for ep_part in ctx.gather_objects_over_ep(local) for k, v in ep_part.items()}
    merged = {k: v for part in ctx.gather_over_pp(over_ep) for k, v in part.items()}
    weights = "".join(f"{name}:{merged[name]};" for name in sorted(merged))
    return {"architecture": arch, "weights": hashlib.sha256(weights.encode()).hexdigest()}


def _tensor_digest(t: torch.Tensor, samples: int = 4096) -> str:
    """Hash of the shape and an evenly strided sample of at most `samples` values (cheap for multi-GB
    tensors; a change confined to unsampled values would go unnoticed)."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // samples)
    sample = flat[::step][:samples].float().cpu().contiguous()
    return f"{tuple(t.shape)}:" + hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]


def save_scores(path: str, contents: ScoresFile, ctx: ParallelContext) -> None:
    """Write the file atomically on global rank 0 (temp file + rename); every rank returns, or raises the same
    error, once it is written (global rank 0's contents are written)."""
    problem = None
    if ctx.is_main:
        try:
            atomic_save(contents.to_payload(), path)
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            problem = (ScoresFileError, f"could not write scores_path={path!r}: {type(e).__name__}: {e}")
    ctx.raise_first(problem)


def read_scores_file(path: str) -> dict:
    """The payload of a scores file, format and version checked (nothing compared with a model yet)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ScoresFileError(f"scores_path={path!r} is not a readable megatron-prune scores file: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or not isinstance(payload.get("fingerprint"), dict):
        raise ScoresFileError(f"scores_path={path!r} is not a megatron-prune scores file")
    if payload.get("version") != VERSION:
        raise ScoresFileError(f"scores_path={path!r} has version {payload.get('version')}, this megatron-prune reads {VERSION}")
    return payload


def check_architecture(path: str, theirs: Dict[str, object], ours: Dict[str, object], subset: bool = False) -> None:
    """Refuse a file whose architecture fingerprint differs from `ours` (naming the fields); with `subset`, only
    in the fields `ours` has (a check from the config alone, before the model exists)."""
    keys = list(ours) if subset else sorted(set(ours) | set(theirs), key=str)
    diff = [f"{k}: file {theirs.get(k)!r} vs model {ours.get(k)!r}" for k in keys if theirs.get(k) != ours.get(k)]
    if diff:
        raise ScoresFileError(f"scores_path={path!r} was computed for a different model ({'; '.join(diff)}); "
                              "delete it or choose another scores_path to recalibrate")  # fmt: skip


def load_scores(path: str, fingerprint: Dict[str, object]) -> ScoresFile:
    """Load and check a scores file against this model's fingerprint; raises ScoresFileError on mismatch."""
    payload = read_scores_file(path)
    theirs, ours = payload["fingerprint"], fingerprint
    check_architecture(path, theirs["architecture"], ours["architecture"])
    if theirs["weights"] != ours["weights"]:
        raise ScoresFileError(f"scores_path={path!r} was computed for a model with the same architecture but different "
                              "weights; delete it or choose another scores_path to recalibrate")  # fmt: skip
    try:
        if not isinstance(payload.get("search") or {}, dict):
            raise TypeError(f"search section is a {type(payload.get('search')).__name__}")
        return ScoresFile.from_payload(payload)
    except (KeyError, TypeError, AttributeError) as e:
        raise ScoresFileError(f"scores_path={path!r} is damaged: {type(e).__name__}: {e}") from e
