"""Test helper (not a test): Megatron-LM-style models and checkpoints without Megatron-LM's training package.

`mlm_args()` is an argparse namespace holding what Megatron-LM's parser produces for a tiny GPT (the fields
Megatron-Bridge's `mlm_compat` reads to rebuild the model), `build_mlm_model(args)` builds this rank's stage
through that same `mlm_compat` code path, and `write_mlm_checkpoint` saves it as Megatron-LM's `save_checkpoint`
does: a torch_dist checkpoint of `model.*` with `args`, `iteration`, `checkpoint_version` and the RNG state in its
common state, in `iter_NNNNNNN/`, and `latest_checkpointed_iteration.txt`.
"""

import argparse
import hashlib
from pathlib import Path

import torch


def mlm_args(tokenizer: str, tp: int = 1, pp: int = 1, **overrides) -> argparse.Namespace:
    fields = dict(
        num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8, num_query_groups=4,
        group_query_attention=True, kv_channels=8, max_position_embeddings=128, seq_length=64,
        make_vocab_size_divisible_by=128, padded_vocab_size=128, tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=str(tokenizer), vocab_size=None, normalization="RMSNorm", norm_epsilon=1e-5,
        apply_layernorm_1p=False, no_persist_layer_norm=True, swiglu=True, bias_swiglu_fusion=False,
        bias_gelu_fusion=False, squared_relu=False, add_bias_linear=False, add_qkv_bias=False,
        init_method_xavier_uniform=False, init_method_std=0.02, params_dtype=torch.float32, bf16=False, fp16=False,
        overlap_p2p_comm=False, num_experts=None, rotary_interleaved=False, decoder_first_pipeline_num_layers=None,
        decoder_last_pipeline_num_layers=None, fp8_param_gather=False, config_logger_dir="", cp_comm_type=["p2p"],
        is_hybrid_model=False, hybrid_override_pattern=None, multi_latent_attention=False,
        heterogeneous_layers_config_path=None, transformer_impl="local", mtp_num_layers=None,
        fp16_lm_cross_entropy=False, untie_embeddings_and_output_weights=False, position_embedding_type="rope",
        rotary_percent=1.0, rotary_base=10000, use_rope_scaling=False, moe_grouped_gemm=False, qk_layernorm=False,
        moe_use_legacy_grouped_gemm=False, qk_l2_norm=False, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, init_model_with_meta_device=False,
        masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, sequence_parallel=False, iteration=10, train_iters=100,
        consumed_train_samples=640, consumed_valid_samples=0, micro_batch_size=2, global_batch_size=8, lr=1e-4,
    )  # fmt: skip
    fields.update(overrides)
    if fields["tokenizer_type"] == "HuggingFaceTokenizer":  # as Megatron-LM pads it: a multiple of divisor x TP
        from transformers import AutoTokenizer

        multiple = fields["make_vocab_size_divisible_by"] * tp
        fields["padded_vocab_size"] = -(-len(AutoTokenizer.from_pretrained(str(tokenizer))) // multiple) * multiple
    return argparse.Namespace(**fields)


def build_mlm_model(args: argparse.Namespace, seed: int = 0) -> torch.nn.Module:
    """This rank's stage, built as Megatron-LM builds it (mlm_compat's `_get_model` with `_gpt_provider`)."""
    from megatron.bridge.training.mlm_compat.arguments import _transformer_config_from_args
    from megatron.bridge.training.mlm_compat.model import _get_model, _gpt_provider

    from megatron_prune.minitron.bridge.checkpoint import _module_cuda_is_a_no_op
    from megatron_prune.minitron.runtime.cpu import apply_bridge_cpu_support

    apply_bridge_cpu_support()
    torch.manual_seed(seed)
    with _module_cuda_is_a_no_op(not torch.cuda.is_available()):
        return _get_model(args, _gpt_provider, _transformer_config_from_args(args))[0].eval()


def write_mlm_checkpoint(model: torch.nn.Module, args: argparse.Namespace, root, iteration: int) -> Path:
    """Save as Megatron-LM's save_checkpoint does (without optimizer state). Collective."""
    from megatron.core import dist_checkpointing

    from megatron_prune.minitron.runtime.parallel import ParallelContext

    ctx = ParallelContext.from_megatron()
    path = Path(root) / f"iter_{iteration:07d}"
    ctx.on_main(lambda: path.mkdir(parents=True, exist_ok=True))
    ctx.barrier()
    state = {"model": model.sharded_state_dict(), "args": args, "iteration": iteration, "checkpoint_version": 3.0,
             "num_floating_point_operations_so_far": 0, "rng_state": [{"random_rng_state": None}]}  # fmt: skip
    dist_checkpointing.save(state, str(path))
    ctx.on_main(lambda: (Path(root) / "latest_checkpointed_iteration.txt").write_text(str(iteration)))
    ctx.barrier()
    return path


def tree_digest(root) -> str:
    """A hash of every file under `root` (names and bytes): the source checkpoint must not change."""
    h = hashlib.sha256()
    for f in sorted(Path(root).rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()
