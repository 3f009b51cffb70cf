"""torchrun worker: forward-only through megatron's pipeline schedule, each rank holding one stage of a tiny GPT.

Usage: pp_forward.py CASES OUT, at PP=2. CASES is a torch file with a list of cases, each with "state_dict"
(a PP=1 model's full state dict), "tokens" [batch, seq] and "config" (tiny_gpt_config overrides). For each
case the last stage appends to the list saved in OUT its "logits" [batch, seq, vocab] and the global
"layer_numbers" of its decoder layers.
"""

import sys

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_prune.minitron.runtime.distributed import destroy_distributed, init_distributed
from tests.stages import stage_state_dict
from tests.tiny import build_tiny_gpt, tiny_gpt_config

MICRO_BATCH_SIZE = 2


def run_case(case: dict) -> dict:
    """Build this stage from the case's full weights and run its tokens through the schedule."""
    tokens = case["tokens"]
    batch, seq = tokens.shape
    model = build_tiny_gpt(tiny_gpt_config(**case["config"]))
    model.load_state_dict(stage_state_dict(case["state_dict"], model), strict=True)
    position_ids = torch.arange(seq).expand(MICRO_BATCH_SIZE, seq)

    def forward_step(data_iterator, model):
        output = model(next(data_iterator), position_ids, attention_mask=None)
        return output, lambda output, non_loss_data=True: output

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(tokens.split(MICRO_BATCH_SIZE)),
            model=[model],
            num_microbatches=batch // MICRO_BATCH_SIZE,
            seq_length=seq,
            micro_batch_size=MICRO_BATCH_SIZE,
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        assert outputs == [], outputs
        return {}
    return {"logits": torch.cat(outputs), "layer_numbers": [layer.layer_number for layer in model.decoder.layers]}


def main(cases_path: str, out_path: str) -> None:
    init_distributed(pipeline_model_parallel_size=2)
    results = [run_case(case) for case in torch.load(cases_path)]
    if parallel_state.is_pipeline_last_stage():
        torch.save(results, out_path)
    destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
