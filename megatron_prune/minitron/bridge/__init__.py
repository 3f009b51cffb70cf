"""Hugging Face in, pruned Hugging Face and Megatron checkpoints out, through Megatron-Bridge.

    hf_import.py   a local HF folder (or hub name) -> this rank's MCore GPTModel stage at TP/PP
    hf_config.py   the pruned sizes written into a copy of the HF config
    export.py      pruned model -> HF folder (transformers loads it) and Megatron-Bridge checkpoint
    roundtrip.py   logits checks: HF vs imported MCore, pruned MCore vs exported HF
"""

from megatron_prune.minitron.bridge.export import load_megatron_checkpoint, save_hf, save_megatron
from megatron_prune.minitron.bridge.hf_config import pruned_hf_config
from megatron_prune.minitron.bridge.hf_import import ImportedModel, check_hf_source, import_hf_model
from megatron_prune.minitron.bridge.roundtrip import RoundTrip, compare_with_hf

__all__ = [
    "ImportedModel", "RoundTrip", "check_hf_source", "compare_with_hf", "import_hf_model",
    "load_megatron_checkpoint", "pruned_hf_config", "save_hf", "save_megatron",
]  # fmt: skip
