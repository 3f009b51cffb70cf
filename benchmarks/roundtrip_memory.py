"""Benchmark: peak host memory of the HF side of the round-trip checks, streamed (layer by layer) vs whole model.

The CLI's round-trip checks forward 2 x 64 tokens through the HF folder on one rank (`bridge/roundtrip.py`).
Each variant runs in its own process, so each peak is its own: the peak RSS increase over the process after its
imports, for
    streamed   `hf_logits` (meta-device model, embeddings once, one decoder layer at a time)
    whole      `AutoModelForCausalLM.from_pretrained` of the folder in its dtype, then the same forward
on SmolLM2-135M (the offline default, a float32 folder of 517 MB, tied embeddings) and on a random Llama in
bf16 with untied embeddings (the 8B layout, narrowed: 16 layers, hidden 2048, vocabulary 64k).

    .venv/bin/python benchmarks/roundtrip_memory.py     # writes benchmarks/results/roundtrip_memory.json
"""

import json
import os
import subprocess
import sys
import tempfile

MB = 1024**2


def peak_rss_mb() -> float:
    """This process' peak RSS (VmHWM: ru_maxrss would carry over the parent's peak across fork and exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB


def child(variant: str, folder: str) -> None:
    """Measure one variant in this process and print its numbers as JSON."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_prune.minitron.bridge.roundtrip import folder_dtype, hf_logits

    tokens = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    before = peak_rss_mb()
    if variant == "streamed":
        logits = hf_logits(folder, tokens)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=folder_dtype(AutoConfig.from_pretrained(folder))).eval()
        with torch.no_grad():
            logits = model(tokens).logits.float()
    print(json.dumps({"peak_increase_mb": peak_rss_mb() - before, "logits_sum": float(logits.double().sum())}))


def random_llama(folder: str) -> None:
    """A random bf16 Llama with untied embeddings saved as safetensors (never loaded whole in this process)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=65536, tie_word_embeddings=False, dtype="bfloat16")  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)


def folder_mb(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors")) / MB


def main():
    if len(sys.argv) == 3:
        return child(*sys.argv[1:])
    from megatron_prune.minitron.bridge.offline_model import smollm2_folder

    folders = {"smollm2_fp32_tied": smollm2_folder()}
    tmp = tempfile.mkdtemp()
    folders["llama_bf16_untied"] = os.path.join(tmp, "llama")
    random_llama(folders["llama_bf16_untied"])
    result = {}
    for name, folder in folders.items():
        runs = {}
        for variant in ("streamed", "whole"):
            out = subprocess.run([sys.executable, __file__, variant, folder], capture_output=True, text=True, check=True)
            runs[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        assert abs(runs["streamed"]["logits_sum"] - runs["whole"]["logits_sum"]) <= 1e-3 * abs(runs["whole"]["logits_sum"]) + 1e-3
        result[name] = {"safetensors_mb": folder_mb(folder), **{v: runs[v]["peak_increase_mb"] for v in runs}}
        print(name, json.dumps(result[name]), flush=True)
    out = os.path.join(os.path.dirname(__file__), "results", "roundtrip_memory.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
