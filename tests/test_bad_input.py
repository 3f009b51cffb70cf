"""Every bad input fails with a clear error naming the field, before calibration, leaving nothing behind."""

import os

import pytest
import torch

import megatron_prune as mp
from megatron_prune.minitron.config import ModelShape, validate_export_config
from tests.tiny import build_tiny_gpt, random_tokens, tiny_gpt_config

SHAPE = ModelShape(hidden_size=64, ffn_hidden_size=128, num_attention_heads=8, num_query_groups=4, kv_channels=8,
                   num_layers=4, gated_linear_unit=True)  # fmt: skip


@pytest.mark.parametrize(
    "export_config, match",
    [
        ({}, "export_config is empty"),
        ([("hidden_size", 32)], "must be a dict"),
        ({"hidden_sizes": 32}, "unknown axis 'hidden_sizes'; supported axes are hidden_size, ffn_hidden_size"),
        ({"ffn_hidden_size": 256}, r"export_config\['ffn_hidden_size'\]=256 is larger than the model's ffn_hidden_size=128"),
        ({"hidden_size": 0}, r"export_config\['hidden_size'\]=0 must be at least 1"),
        ({"num_layers": -1}, r"export_config\['num_layers'\]=-1 must be at least 1"),
        ({"hidden_size": 32.0}, r"export_config\['hidden_size'\] must be an integer, got 32.0 \(float\)"),
        ({"hidden_size": "32"}, r"must be an integer, got '32' \(str\)"),
        ({"num_layers": True}, r"must be an integer, got True \(bool\)"),
        ({"num_attention_heads": 6}, r"num_attention_heads'\]=6 is not a multiple of num_query_groups=4"),
        ({"num_attention_heads": 6, "num_query_groups": 4}, "not a multiple of num_query_groups=4"),
        ({"num_query_groups": 2}, r"num_attention_heads'\]=8 with num_query_groups=2 needs 4 heads per group, but each group"),
    ],
)
def test_export_config_errors_name_the_field(export_config, match):
    with pytest.raises(mp.PruneConfigError, match=match):
        validate_export_config(export_config, SHAPE)


def test_num_layers_below_pipeline_size():
    with pytest.raises(mp.PruneConfigError, match=r"num_layers'\]=1 is smaller than the pipeline-parallel size 2"):
        validate_export_config({"num_layers": 1}, SHAPE, pp_size=2)
    assert validate_export_config({"num_layers": 2}, SHAPE, pp_size=2)["num_layers"] == 2


def test_tensor_parallel_divisibility():
    with pytest.raises(mp.PruneConfigError, match=r"ffn_hidden_size'\]=100 is not divisible by the tensor-parallel size 8"):
        validate_export_config({"ffn_hidden_size": 100}, SHAPE, tp_size=8)
    with pytest.raises(mp.PruneConfigError, match=r"num_attention_heads'\]=4 is not divisible by the tensor-parallel size 8"):
        validate_export_config({"num_attention_heads": 4}, SHAPE, tp_size=8)
    with pytest.raises(mp.PruneConfigError, match=r"num_query_groups'\]=3 must be a multiple or a divisor of the tensor-parallel size 2"):
        validate_export_config({"num_query_groups": 3, "num_attention_heads": 6}, SHAPE, tp_size=2)
    # fewer KV groups than TP ranks is Megatron-valid (a divisor), as are untouched original sizes
    assert validate_export_config({"num_query_groups": 1, "num_attention_heads": 2}, SHAPE, tp_size=2)["num_query_groups"] == 1
    assert validate_export_config({"hidden_size": 48}, SHAPE, tp_size=8)["ffn_hidden_size"] == 128


def test_valid_targets_complete_the_sizes():
    target = validate_export_config({"num_attention_heads": 2, "num_query_groups": 2}, SHAPE)
    assert target == dict(hidden_size=64, ffn_hidden_size=128, num_attention_heads=2, num_query_groups=2, num_layers=4)


class Recorder:
    """A forward_loop that records whether calibration started."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model):
        self.calls += 1


@pytest.fixture()
def model(mcore):
    torch.manual_seed(0)
    return build_tiny_gpt(tiny_gpt_config())


def test_bad_target_fails_before_calibration_and_writes_nothing(model, tmp_path):
    loop, path = Recorder(), tmp_path / "scores.pt"
    with pytest.raises(mp.PruneConfigError, match="unknown axis"):
        mp.prune(model, {"num_heads": 4}, forward_loop=loop, scores_path=str(path))
    assert loop.calls == 0 and not os.listdir(tmp_path)


def test_missing_forward_loop_without_scores(model, tmp_path):
    with pytest.raises(mp.PruneConfigError, match="forward_loop is required: no scores file exists at scores_path="):
        mp.prune(model, {"ffn_hidden_size": 64}, scores_path=str(tmp_path / "missing.pt"))
    with pytest.raises(mp.PruneConfigError, match="forward_loop is required: no scores_path was given"):
        mp.prune(model, {"ffn_hidden_size": 64})


def test_failed_calibration_leaves_no_scores_file(model, tmp_path):
    def broken(model):
        model(random_tokens(1, 8, 128, seed=0), torch.arange(8)[None], attention_mask=None)
        raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="data loader died"):
        mp.prune(model, {"ffn_hidden_size": 64}, forward_loop=broken, scores_path=str(tmp_path / "scores.pt"))
    assert not os.listdir(tmp_path)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules()), "hooks left behind"


def test_forward_loop_that_runs_nothing_writes_no_scores_file(model, tmp_path):
    path = tmp_path / "scores.pt"
    with pytest.raises(mp.PruneConfigError, match="forward_loop ran no forward pass"):
        mp.prune(model, {"ffn_hidden_size": 64}, forward_loop=lambda m: None, scores_path=str(path))
    assert not path.exists()  # an empty file would shadow the next, real calibration


def test_unsupported_module_type_is_named(model):
    model.decoder.layers[2].mlp.adapter = torch.nn.Linear(64, 64)  # a module the axis table does not describe
    loop = Recorder()
    with pytest.raises(mp.UnsupportedModelError, match=r"unsupported module type Linear at 'decoder.layers.2.mlp.adapter', layer 3"):
        mp.prune(model, {"ffn_hidden_size": 64}, forward_loop=loop)
    assert loop.calls == 0


def test_wrapped_model_is_refused(model):
    with pytest.raises(mp.PruneConfigError, match="unwrapped megatron.core GPTModel or MambaModel, got Sequential"):
        mp.prune(torch.nn.Sequential(model), {"ffn_hidden_size": 64}, forward_loop=Recorder())


def test_unwritable_scores_path_fails_cleanly(model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(mp.ScoresFileError, match="could not write scores_path="):
        mp.prune(model, {"ffn_hidden_size": 64}, forward_loop=mp.make_forward_loop([random_tokens(1, 8, 128, seed=0)], progress=False),
                 scores_path=str(blocker / "scores.pt"))  # fmt: skip


def test_damaged_scores_file_is_refused(model, tmp_path):
    from megatron_prune.minitron.importance.scores_file import FORMAT, VERSION, model_fingerprint
    from megatron_prune.minitron.runtime.parallel import ParallelContext

    path = tmp_path / "scores.pt"
    fingerprint = model_fingerprint(model, ParallelContext.from_megatron())
    torch.save({"format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "statistics": {"calls": 1}}, path)
    with pytest.raises(mp.ScoresFileError, match="is damaged: KeyError"):
        mp.prune(model, {"ffn_hidden_size": 64}, scores_path=str(path))


def test_block_spec_that_does_not_describe_the_layers_needs_a_builder(mcore):
    """A block spec is rebuilt layer by layer from its specs: one whose layers were edited by hand is refused."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    specs = [get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=i % 2 == 0) for i in range(4)]
    model = GPTModel(tiny_gpt_config(), TransformerBlockSubmodules(layer_specs=specs), vocab_size=128, max_sequence_length=32)
    model.decoder.layers = torch.nn.ModuleList(list(model.decoder.layers)[:3])
    loop = Recorder()
    with pytest.raises(mp.PruneConfigError, match="block spec has 4 layer specs for the 3 layers of this stage: pass model_builder="):
        mp.prune(model, {"ffn_hidden_size": 64}, forward_loop=loop)
    assert loop.calls == 0
