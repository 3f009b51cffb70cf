"""Hugging Face -> MCore -> prune -> HF and Megatron checkpoints, through the real Megatron-Bridge, at PP=1.

Tiny Llama, Qwen3, Mistral and Qwen3-MoE (SequentialMLP experts) models are made locally from configs. The invariants: the imported model computes
the HF model's logits; the exported HF folder, loaded by plain transformers, computes the pruned MCore
model's logits; the Megatron checkpoint rebuilds the pruned model from the config it carries, exactly;
the source folder is left byte-for-byte unchanged.
"""

import pytest
import torch
import yaml

from megatron_prune import make_forward_loop, prune
from megatron_prune.minitron.config import ModelShape
from megatron_prune.minitron.bridge import compare_with_hf, import_hf_model, load_megatron_checkpoint, save_hf, save_megatron
from tests.tiny import random_tokens
from tests.tiny_hf import VOCAB, file_digests, make_hf_model

pytestmark = pytest.mark.heavy  # processes (torchrun / CLI / NeMo-Run) or Megatron-Bridge round trips

CASES = {
    # family, HF overrides, export_config, expected HF sizes after pruning
    "llama-width-heads-depth": ("llama", {}, {"hidden_size": 48, "ffn_hidden_size": 96, "num_attention_heads": 2, "num_layers": 3},
                                dict(hidden_size=48, intermediate_size=96, num_attention_heads=2, num_key_value_heads=2, head_dim=16, num_hidden_layers=3)),
    "llama-untied-mha-kv-groups": ("llama", {"tie_word_embeddings": False, "num_key_value_heads": 4},
                                   {"num_query_groups": 2, "num_attention_heads": 2, "ffn_hidden_size": 64},
                                   dict(hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=16, num_hidden_layers=4)),
    "qwen3-groups-depth": ("qwen3", {}, {"num_query_groups": 1, "num_attention_heads": 2, "num_layers": 2, "hidden_size": 40},
                           dict(hidden_size=40, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_hidden_layers=2)),
    "mistral-untied-ffn-depth": ("mistral", {"tie_word_embeddings": False}, {"ffn_hidden_size": 64, "num_layers": 3},
                                 dict(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=3)),
    "qwen3_moe-experts-hidden-depth": ("qwen3_moe", {}, {"num_moe_experts": 3, "moe_ffn_hidden_size": 16, "hidden_size": 48, "num_layers": 3},
                                       dict(hidden_size=48, num_experts=3, moe_intermediate_size=16, num_experts_per_tok=2, intermediate_size=128,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=3)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_prune_export_round_trips(tmp_path, mcore, case):
    family, overrides, export_config, expected = CASES[case]
    source = make_hf_model(tmp_path / "source", family, **overrides)
    untouched = file_digests(source)
    tokens = random_tokens(2, 16, VOCAB, seed=7)

    imported = import_hf_model(str(source))
    check = compare_with_hf(imported.model, str(source), tokens, "import")
    assert check.ok and check.relative_diff < 1e-5, check

    batches = [random_tokens(2, 16, VOCAB, seed=s) for s in range(4)]
    pruned, result = prune(imported.model, export_config, make_forward_loop(batches, progress=False))

    hf_dir = tmp_path / "hf"
    save_hf(imported, pruned, result.plan.kept_layers, str(hf_dir))
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(hf_dir)
    assert {k: getattr(config, k) for k in expected} == expected
    if family == "qwen3":  # per-layer list follows the surviving layers
        assert len(config.layer_types) == expected["num_hidden_layers"]
    assert AutoTokenizer.from_pretrained(hf_dir)("the quick fox").input_ids == AutoTokenizer.from_pretrained(source)("the quick fox").input_ids
    check = compare_with_hf(pruned, str(hf_dir), tokens, "export")
    assert check.ok and check.relative_diff < 1e-5, check

    save_megatron(imported, pruned, str(tmp_path / "megatron"), tokenizer_path=str(hf_dir))
    recorded = yaml.safe_load(next((tmp_path / "megatron").glob("iter_*/run_config.yaml")).read_text())["model"]
    assert recorded["hidden_size"] == pruned.config.hidden_size and recorded["num_layers"] == pruned.config.num_layers
    assert recorded["pipeline_model_parallel_layout"] is None and recorded["use_cpu_initialization"] is False
    assert recorded["transformer_layer_spec"]["_target_"].endswith("gpt_provider.default_layer_spec")  # the GPU spec
    reloaded = load_megatron_checkpoint(str(tmp_path / "megatron"))
    for field in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "num_layers"):
        assert getattr(reloaded.config, field) == getattr(pruned.config, field), field
    assert reloaded.state_dict().keys() == pruned.state_dict().keys()
    for name, tensor in pruned.state_dict().items():
        if not name.endswith("_extra_state"):
            assert torch.equal(reloaded.state_dict()[name], tensor), name

    assert file_digests(source) == untouched


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_sort_only_export_reproduces_the_source_logits(tmp_path, mcore, family):
    """Every axis named at full size: weights are permuted, not cut, so the exported HF model computes the
    source model's logits (the export is correct for any permutation, not only for the identity)."""
    source = make_hf_model(tmp_path / "source", family)
    imported = import_hf_model(str(source))
    full = ModelShape.from_config(imported.model.config).sizes()  # every axis, at its size
    full.pop("num_layers")
    batches = [random_tokens(2, 16, VOCAB, seed=s) for s in range(2)]
    pruned, result = prune(imported.model, full, make_forward_loop(batches, progress=False))
    assert not torch.equal(result.plan.hidden, torch.arange(64))  # a real permutation
    if family == "qwen3_moe":  # experts renumbered: HF expert j of the export is source expert experts[j]
        assert any(not torch.equal(k.experts, torch.arange(4)) for k in result.plan.layers.values())
    save_hf(imported, pruned, result.plan.kept_layers, str(tmp_path / "hf"))
    check = compare_with_hf(imported.model, str(tmp_path / "hf"), random_tokens(2, 16, VOCAB, seed=3), "source vs sorted export")
    assert check.relative_diff < 1e-5, check


@pytest.mark.parametrize("family, overrides", [("llama", {}), ("mistral", {"tie_word_embeddings": False}), ("qwen3_moe", {})])
def test_round_trip_reference_streams_one_decoder_layer_at_a_time(tmp_path, family, overrides):
    """The HF side of a round trip holds the embeddings and output layer plus one decoder layer (not the whole model,
    ~32 GB for an 8B model in fp32) and computes exactly the logits of the model loaded whole, in its own dtype."""
    from transformers import AutoModelForCausalLM

    from megatron_prune.minitron.bridge.roundtrip import StreamedCausalLM, hf_logits

    source = make_hf_model(tmp_path / family, family, **overrides)
    tokens = random_tokens(2, 16, VOCAB, seed=7)
    streamed = StreamedCausalLM.open(str(source))
    seen = []
    for layer in streamed.layers:  # registered after the loading hooks: runs with this layer loaded
        layer.register_forward_pre_hook(lambda module, args: seen.append(streamed.materialised_layers()))
    logits = streamed.logits(tokens)
    assert seen == [[i] for i in range(4)] and streamed.materialised_layers() == []
    whole = AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.no_grad():
        assert torch.equal(logits, whole(tokens).logits.float())
    assert torch.equal(hf_logits(str(source), tokens), logits)


def test_round_trip_of_a_bf16_folder_is_exact_in_float32_and_bounded_by_rounding_in_bf16(tmp_path, mcore):
    """A bf16 HF folder: the HF side of the check runs in float32 (bf16 weights widen exactly), so a float32 import
    matches it to float32 precision (it ran in bf16 before: ~5e-3, and a real 30-layer model failed the check); a
    bf16 import is allowed twice the HF model's own bf16 rounding, yet a corrupted layer still fails."""
    from transformers import AutoModelForCausalLM

    source = make_hf_model(tmp_path / "bf16", "llama")
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(torch.bfloat16).save_pretrained(source)
    tokens = random_tokens(2, 16, VOCAB, seed=7)
    for dtype in (torch.float32, torch.bfloat16):
        model = import_hf_model(str(source), dtype=dtype).model
        check = compare_with_hf(model, str(source), tokens, "import", tolerance=1e-6)
        assert check.ok, check
        assert (check.floor == 0 and check.relative_diff < 1e-5) if dtype == torch.float32 else 0 < check.floor < 0.05, check
        with torch.no_grad():
            model.decoder.layers[1].mlp.linear_fc2.weight.mul_(1.3)
        assert not compare_with_hf(model, str(source), tokens, "import", tolerance=1e-6).ok


def test_deepseek_v3_mla_round_trips(tmp_path, mcore):
    """DeepSeek-V3 (multi-latent attention, a dense first layer, MoE layers with a shared expert and expert bias):
    import, prune heads, hidden size, dense and expert widths, experts and a layer (the dense first layer protected:
    a DeepSeek HF config lists its dense layers first), export to HF and to a Megatron checkpoint, logits both ways."""
    source = make_hf_model(tmp_path / "source", "deepseek_v3", num_hidden_layers=3)
    tokens = random_tokens(2, 16, VOCAB, seed=7)
    imported = import_hf_model(str(source))
    assert type(imported.model.decoder.layers[0].self_attention).__name__ == "MLASelfAttention"
    check = compare_with_hf(imported.model, str(source), tokens, "import")
    assert check.ok and check.relative_diff < 1e-5, check

    export_config = {"hidden_size": 48, "num_attention_heads": 2, "ffn_hidden_size": 96, "num_moe_experts": 2,
                     "moe_ffn_hidden_size": 16, "num_layers": 2}  # fmt: skip
    batches = [random_tokens(2, 16, VOCAB, seed=s) for s in range(3)]
    pruned, result = prune(imported.model, export_config, make_forward_loop(batches, progress=False),
                           depth={"protected_layers": [1]})  # fmt: skip
    assert result.plan.kept_layers[0] == 1

    save_hf(imported, pruned, result.plan.kept_layers, str(tmp_path / "hf"))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tmp_path / "hf")
    expected = dict(hidden_size=48, num_attention_heads=2, num_key_value_heads=2, intermediate_size=96, n_routed_experts=2,
                    moe_intermediate_size=16, n_shared_experts=2, first_k_dense_replace=1, num_hidden_layers=2,
                    q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, head_dim=8)  # fmt: skip
    assert {k: getattr(config, k) for k in expected} == expected  # shared expert 32 = 2 x 16; the MLA dims kept
    check = compare_with_hf(pruned, str(tmp_path / "hf"), tokens, "export")
    assert check.ok and check.relative_diff < 1e-5, check

    save_megatron(imported, pruned, str(tmp_path / "megatron"), tokenizer_path=str(tmp_path / "hf"))
    reloaded = load_megatron_checkpoint(str(tmp_path / "megatron"))
    assert reloaded.config.multi_latent_attention and reloaded.config.num_attention_heads == 2
    assert reloaded.state_dict().keys() == pruned.state_dict().keys()
    for name, tensor in pruned.state_dict().items():
        if not name.endswith("_extra_state"):
            assert torch.equal(reloaded.state_dict()[name], tensor), name
