"""Minitron: pruning of Megatron-core GPT, MoE, Mamba and hybrid models (width by activation statistics, depth
by block influence; manual targets or NAS under budgets). Entry points: `megatron_prune.prune` (api.py), the
CLI (`python -m megatron_prune`, cli.py), `megatron_prune.minitron.megatron_lm` for Megatron-LM scripts."""
