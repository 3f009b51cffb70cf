"""Test helpers (not tests): tiny randomly initialised Hugging Face models of every family GradNAS supports, and
batches for them (offline, deterministic)."""

import torch

VOCAB, SEQ = 96, 12

# family -> (config class, model class, config fields): 2-3 layers, 4 heads (2 KV groups for the decoders)
FAMILIES = {
    "bert": ("BertConfig", "BertForSequenceClassification",
             dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, num_labels=3)),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification",
                dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, num_labels=3,
                     max_position_embeddings=40, pad_token_id=1)),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   dict(dim=32, n_layers=2, n_heads=4, hidden_dim=96, num_labels=3)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_inner=96, n_positions=32)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=32, n_layer=2, n_head=4, n_inner=96, n_positions=32, rotary_dim=4)),
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   intermediate_size=96, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   intermediate_size=96)),
}
ENCODERS = ("bert", "roberta", "distilbert")


def build(family: str, seed: int = 0, **overrides):
    """A tiny `family` model in eval mode, seeded, with non-trivial biases and norms (so slicing mistakes show)."""
    import transformers

    config_name, model_name, fields = FAMILIES[family]
    size_keys = {"vocab_size": VOCAB}
    if family in ("bert", "distilbert"):
        size_keys["max_position_embeddings"] = 40
    config = getattr(transformers, config_name)(**size_keys, **{**fields, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(0.1 * torch.randn_like(p))
    return model


def input_ids(batch: int = 2, seed: int = 0, seq: int = SEQ) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def batches(family: str, n: int = 4, batch: int = 4, seed: int = 0):
    """`n` dict batches with labels (class labels for the encoders, next-token labels for the decoders)."""
    out = []
    for i in range(n):
        ids = input_ids(batch, seed=1000 * seed + i)
        labels = torch.randint(0, 3, (batch,), generator=torch.Generator().manual_seed(7 + i)) if family in ENCODERS else ids
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def rebatch(batches_, sizes):
    """The same samples, in batches of `sizes` (one size for all, or a list of sizes in turn)."""
    keys = batches_[0].keys()
    whole = {k: torch.cat([b[k] for b in batches_]) for k in keys}
    n = next(iter(whole.values())).shape[0]
    sizes = [sizes] * n if isinstance(sizes, int) else list(sizes)
    out, start = [], 0
    for size in sizes:
        if start >= n:
            break
        out.append({k: v[start:start + size] for k, v in whole.items()})
        start += size
    return out


def state_hash(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, saved) -> bool:
    state = model.state_dict()
    return state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits
