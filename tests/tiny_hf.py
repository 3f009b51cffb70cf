"""Test helpers (not tests): tiny Hugging Face causal LMs made locally from configs, with a tokenizer."""

from pathlib import Path

import torch

TOKENIZER_TEXT = [
    "the quick brown fox jumps over the lazy dog while pruning removes channels heads and layers",
    "calibration data flows through the pipeline schedule; importance ranks every width axis",
]
VOCAB = 288


def make_tokenizer():
    """A byte-level BPE tokenizer trained here on two sentences (offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])  # fmt: skip
    tok.train_from_iterator(TOKENIZER_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def make_hf_model(path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised tiny `family` ("llama", "qwen3", "mistral", "qwen3_moe": 4 experts of FFN 32,
    top-2, in every layer, or "deepseek_v3": multi-latent attention, a dense first layer, then MoE layers of 4
    routed experts of FFN 32, top-2, sigmoid routing with expert bias, and a shared expert) causal LM and a
    tokenizer to `path`."""
    from transformers import (DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)  # fmt: skip

    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True,
                  rope_theta=10000.0)  # fmt: skip
    if family == "qwen3_moe":
        fields.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
    if family == "deepseek_v3":  # the real config.json's scoring_func / topk_method (the bridge reads scoring_func)
        fields.update(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                      v_head_dim=12, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1,
                      num_experts_per_tok=2, moe_intermediate_size=32, n_group=1, topk_group=1, scoring_func="sigmoid",
                      topk_method="noaux_tc", rope_scaling=None, tie_word_embeddings=False)  # fmt: skip
        fields.pop("head_dim")
    fields.update(overrides)
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
                                 "mistral": (MistralConfig, MistralForCausalLM),
                                 "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
                                 "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM)}[family]  # fmt: skip
    torch.manual_seed(seed)
    model = model_class(config_class(**fields)).float()
    with torch.no_grad():  # norms away from 1, so that a wrong or missing norm shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        for name, buffer in model.named_buffers():  # DeepSeek's routing bias away from zero
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.05)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return Path(path)


def file_digests(folder) -> dict:
    """{relative path: sha256} of every file under `folder`: proof that a source was left untouched."""
    import hashlib

    root = Path(folder)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}
