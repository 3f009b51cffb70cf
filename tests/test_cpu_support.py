"""CPU support for megatron-core: the patches themselves, a tiny GPT through the pipeline schedule in one
process, and pipeline parallel (PP=2, even and uneven stages) under torchrun against a single-process model."""

import subprocess
import sys

import pytest
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.pipeline_parallel import get_forward_backward_func, schedules
from megatron.core.transformer import utils as transformer_utils

from megatron_prune.minitron.runtime.cpu import apply_cpu_support
from megatron_prune.minitron.runtime.distributed import destroy_distributed, init_distributed
from tests.tiny import build_tiny_gpt, random_tokens, tiny_gpt_config
from tests.torchrun import REPO_ROOT, run_torchrun

VOCAB, SEQ = 128, 16
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU support applies only without a GPU")


@pytest.fixture(scope="module")
def single_process():
    """A single-process world (TP=PP=DP=1), left initialised like the suite's other fixtures."""
    init_distributed(seed=1234)


def _forward_through_schedule(model, tokens, forward_only=True, loss_func=None):
    """Run `tokens` as one microbatch through megatron's schedule; what the last stage collected."""
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)

    def forward_step(data_iterator, model):
        logits = model(next(data_iterator), position_ids, attention_mask=None)
        return logits, loss_func or (lambda output, non_loss_data=True: output)

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([tokens]),
        model=[model],
        num_microbatches=1,
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=forward_only,
        collect_non_loss_data=loss_func is None,
    )


@pytest.mark.heavy
def test_apply_cpu_support_is_a_no_op_when_cuda_is_available():
    check = """
import torch
torch.cuda.is_available = lambda: True
current_device, synchronize = torch.cuda.current_device, torch.cuda.synchronize
from megatron.core.pipeline_parallel import schedules
from megatron.core.tensor_parallel import random
from megatron.core.transformer import utils
from megatron.core.models.common.language_module.language_module import LanguageModule
tracker, seed = dict(vars(random.CudaRNGStatesTracker)), random.model_parallel_cuda_manual_seed
setup_embeddings = LanguageModule.setup_embeddings_and_output_layer
from megatron_prune.minitron.runtime.cpu import apply_cpu_support
assert apply_cpu_support() is False
assert torch.cuda.current_device is current_device and torch.cuda.synchronize is synchronize
assert dict(vars(random.CudaRNGStatesTracker)) == tracker and random.model_parallel_cuda_manual_seed is seed
assert LanguageModule.setup_embeddings_and_output_layer is setup_embeddings
assert schedules.torch is torch and utils.torch is torch
"""
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@cpu_only
def test_apply_cpu_support_is_idempotent_and_targeted():
    def patched():
        return (
            torch.cuda.current_device,
            tensor_parallel.model_parallel_cuda_manual_seed,
            schedules.torch,
            LanguageModule.setup_embeddings_and_output_layer,
        )

    assert apply_cpu_support() is True
    first = patched()
    assert apply_cpu_support() is True
    assert patched() == first  # nothing wrapped twice

    assert torch.cuda.current_device() == "cpu"
    torch.cuda.synchronize()
    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert transformer_utils.get_default_causal_mask(3).tolist() == [[0, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert schedules.torch.matmul is torch.matmul  # everything but the factories is torch itself
    with pytest.raises((AssertionError, RuntimeError)):  # torch's own factories are untouched
        torch.zeros(1, device="cuda")


@cpu_only
def test_init_distributed_is_reentrant_and_checks_divisibility(single_process):
    init_distributed(seed=1234)  # already initialised with these sizes: only re-seeds
    assert torch.distributed.get_world_size() == 1
    with pytest.raises(ValueError, match="world size 1 is not divisible by .* 2 x .* 1 = 2"):
        init_distributed(tensor_model_parallel_size=2)


@cpu_only
def test_destroy_distributed_tears_down_and_init_comes_back(single_process):
    destroy_distributed()
    assert not torch.distributed.is_initialized()
    assert not parallel_state.model_parallel_is_initialized()
    init_distributed(seed=1234)
    assert torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized()


@cpu_only
def test_model_parallel_seed_seeds_the_cpu_generator_and_the_tracker(single_process):
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    drawn = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(drawn, torch.rand(4))
    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert tensor_parallel.get_data_parallel_rng_tracker_name() in tracker.get_states()
    with tracker.fork(), tracker.fork(tensor_parallel.get_expert_parallel_rng_tracker_name()):
        pass
    with pytest.raises(Exception, match="not added"), tracker.fork("never-added"):
        pass


@cpu_only
def test_forward_through_schedule_equals_direct_forward(single_process):
    model = build_tiny_gpt(tiny_gpt_config())
    tokens = random_tokens(2, SEQ, VOCAB, seed=0)
    position_ids = torch.arange(SEQ).expand_as(tokens)
    with torch.no_grad():
        (scheduled,) = _forward_through_schedule(model, tokens)
        direct = model(tokens, position_ids, attention_mask=None)
        explicit_mask = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(diagonal=1)[None, None]
        masked = model(tokens, position_ids, attention_mask=explicit_mask)
        changed_last = tokens.clone()
        changed_last[:, -1] = (changed_last[:, -1] + 1) % VOCAB
        causal = model(changed_last, position_ids, attention_mask=None)

    assert scheduled.shape == (2, SEQ, VOCAB)
    assert torch.equal(scheduled, direct)
    assert torch.equal(direct, masked)  # attention_mask=None took the default causal mask
    assert torch.equal(causal[:, :-1], direct[:, :-1]) and not torch.equal(causal[:, -1], direct[:, -1])


@cpu_only
def test_backward_through_schedule_matches_autograd(single_process):
    model = build_tiny_gpt(tiny_gpt_config())
    tokens = random_tokens(2, SEQ, VOCAB, seed=1)
    labels = tokens.roll(-1, dims=1)

    def loss_func(logits):
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        return loss, {"lm loss": loss.detach()}

    (reported,) = _forward_through_schedule(model, tokens, forward_only=False, loss_func=loss_func)
    scheduled = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss_func(model(tokens, torch.arange(SEQ).expand_as(tokens), attention_mask=None))[0].backward()

    assert torch.isfinite(reported["lm loss"])
    for name, p in model.named_parameters():
        assert scheduled[name].abs().sum() > 0, name
        torch.testing.assert_close(scheduled[name], p.grad, rtol=0, atol=1e-7, msg=name)


PIPELINE_LAYOUTS = {  # name: (num_layers, num_layers_in_first_pipeline_stage, global layers of the last stage)
    "even": (4, None, [3, 4]),
    "uneven-1+2": (3, 1, [2, 3]),
    "uneven-2+1": (3, 2, [3]),
}


@pytest.fixture(scope="module")
def pipeline_runs(single_process, tmp_path_factory):
    """Per layout: single-process logits, and what the last stage of a PP=2 torchrun run of the same weights
    produced. One torchrun launch for all layouts (each launch costs ~8 s here)."""
    cases, expected = [], {}
    for name, (num_layers, first_stage_layers, _) in PIPELINE_LAYOUTS.items():
        reference = build_tiny_gpt(tiny_gpt_config(num_layers=num_layers))
        with torch.no_grad():
            for p in reference.parameters():  # make norms differ per layer, so a misplaced layer shows
                p.add_(torch.randn_like(p) * 0.1)
            tokens = random_tokens(4, SEQ, VOCAB, seed=2)
            expected[name] = reference(tokens, torch.arange(SEQ).expand_as(tokens), attention_mask=None)
        config = {"num_layers": num_layers}
        if first_stage_layers is not None:
            config["num_layers_in_first_pipeline_stage"] = first_stage_layers
        cases.append({"state_dict": reference.state_dict(), "tokens": tokens, "config": config})

    folder = tmp_path_factory.mktemp("pipeline")
    torch.save(cases, folder / "cases.pt")
    run_torchrun(REPO_ROOT / "tests" / "workers" / "pp_forward.py", 2, folder / "cases.pt", folder / "out.pt")
    return {name: (expected[name], last) for name, last in zip(PIPELINE_LAYOUTS, torch.load(folder / "out.pt"))}


@pytest.mark.heavy
@cpu_only
@pytest.mark.parametrize("layout", PIPELINE_LAYOUTS)
def test_pipeline_parallel_forward_equals_single_process(pipeline_runs, layout):
    expected, last_stage = pipeline_runs[layout]
    assert last_stage["layer_numbers"] == PIPELINE_LAYOUTS[layout][2]
    torch.testing.assert_close(last_stage["logits"], expected, rtol=0, atol=1e-6)


@cpu_only
def test_bf16_attention_takes_the_torch_softmax_on_cpu(single_process):
    """A bf16 model with `masked_softmax_fusion` (Megatron-Bridge's providers turn it on) would import the CUDA softmax extension for
    these shapes (16 < sk <= 4096, multiples of 4); on CPU it runs torch's softmax and matches the fp32 model."""
    torch.manual_seed(0)
    fp32 = build_tiny_gpt(tiny_gpt_config(), max_seq_length=32)
    torch.manual_seed(0)
    bf16 = build_tiny_gpt(tiny_gpt_config(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
                                          masked_softmax_fusion=True), max_seq_length=32)  # fmt: skip
    bf16.load_state_dict({k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                          for k, v in fp32.state_dict().items()})  # fmt: skip
    tokens = random_tokens(4, 32, VOCAB, seed=0)
    with torch.no_grad():
        (low,) = _forward_through_schedule(bf16, tokens)
        (high,) = _forward_through_schedule(fp32, tokens)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), high, atol=0.1, rtol=0.05)
