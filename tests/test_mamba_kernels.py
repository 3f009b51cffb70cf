"""The pure-torch Mamba kernels (megatron_prune.minitron.runtime.mamba_kernels) against step-by-step recurrences and
direct formulas in float64, their installation into megatron-core, and a tiny hybrid MambaModel on CPU (TP=1
in process, TP=2 under torchrun)."""

import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_prune.minitron.runtime.distributed import init_distributed
from megatron_prune.minitron.runtime.mamba_kernels import (
    GatedRMSNorm,
    causal_conv1d_fn,
    install_mamba_kernels,
    mamba_chunk_scan_combined,
    mamba_split_conv1d_scan_combined,
    rmsnorm_gated,
)
from tests.tiny import random_tokens
from tests.tiny_mamba import HYBRID_PATTERN, build_tiny_mamba, tiny_mamba_config
from tests.torchrun import REPO_ROOT, run_torchrun
from tests.workers.mamba_tp2 import loss

F64 = torch.float64
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the reference kernels are installed only without a GPU")


def randn(*shape, seed):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def sequential_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                    dt_limit=(0.0, float("inf")), initial_states=None):
    """The Mamba-2 recurrence one step at a time: ([b, l, h, p], final state [b, h, p, n])."""
    batch, seqlen, nheads, headdim = x.shape
    B, C = (t.repeat_interleave(nheads // t.shape[2], dim=2) for t in (B, C))  # [b, l, h, n]
    dt = dt + (0 if dt_bias is None else dt_bias)
    dt = (F.softplus(dt) if dt_softplus else dt).clamp(*dt_limit)
    state = torch.zeros(batch, nheads, headdim, B.shape[-1], dtype=x.dtype) if initial_states is None else initial_states
    ys = []
    for t in range(seqlen):
        decay = torch.exp(dt[:, t] * A)[..., None, None]  # [b, h, 1, 1]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", state, C[:, t])
        if D is not None:
            y = y + x[:, t] * (D if D.dim() == 2 else D[:, None])
        if z is not None:
            y = y * F.silu(z[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), state


def direct_conv(x, weight, bias):
    """out[b, d, t] = bias[d] + sum_k weight[d, k] x[b, d, t - w + 1 + k], zeros before t = 0."""
    width = weight.shape[1]
    out = torch.zeros_like(x) + bias[:, None]
    for t in range(x.shape[-1]):
        for k in range(width):
            if t - width + 1 + k >= 0:
                out[:, :, t] += weight[:, k] * x[:, :, t - width + 1 + k]
    return out


def scan_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, seed=0):
    return dict(
        x=randn(batch, seqlen, nheads, headdim, seed=seed),
        dt=randn(batch, seqlen, nheads, seed=seed + 1),
        A=-torch.exp(randn(nheads, seed=seed + 2)),
        B=randn(batch, seqlen, ngroups, dstate, seed=seed + 3),
        C=randn(batch, seqlen, ngroups, dstate, seed=seed + 4),
    )


SCAN_CASES = {  # chunk sizes that do not divide the sequence, one longer than it; 1 and 3 groups; D as [h] and [h, p]
    "plain": dict(seqlen=11, chunk_size=4, ngroups=1, options={}),
    "softplus-bias-D-z": dict(seqlen=13, chunk_size=5, ngroups=3, options=dict(D="h", z=True, dt_bias=True, dt_softplus=True)),
    "D-per-channel-initial-state": dict(seqlen=9, chunk_size=4, ngroups=3, options=dict(D="hp", dt_softplus=True, initial_states=True)),
    "one-chunk-dt-limit": dict(seqlen=7, chunk_size=16, ngroups=1, options=dict(dt_bias=True, dt_softplus=True, dt_limit=(0.2, 0.9))),
}


def scan_case(seqlen, ngroups, options, nheads=6, headdim=3, dstate=4, batch=2):
    inputs = scan_inputs(batch, seqlen, nheads, headdim, ngroups, dstate)
    optional = {
        "D": {"h": randn(nheads, seed=10), "hp": randn(nheads, headdim, seed=10)}.get(options.get("D")),
        "z": randn(batch, seqlen, nheads, headdim, seed=11) if options.get("z") else None,
        "dt_bias": randn(nheads, seed=12) if options.get("dt_bias") else None,
        "initial_states": randn(batch, nheads, headdim, dstate, seed=13) if options.get("initial_states") else None,
        "dt_softplus": options.get("dt_softplus", False),
        "dt_limit": options.get("dt_limit", (0.0, float("inf"))),
    }
    return inputs, optional


@pytest.mark.parametrize("name", SCAN_CASES)
def test_chunked_scan_matches_sequential_recurrence(name):
    case = SCAN_CASES[name]
    inputs, optional = scan_case(case["seqlen"], case["ngroups"], case["options"])
    y, final = mamba_chunk_scan_combined(**inputs, chunk_size=case["chunk_size"], **optional, return_final_states=True)
    y_ref, final_ref = sequential_scan(**inputs, **optional)
    assert y.dtype == F64 and y.shape == y_ref.shape
    assert (y - y_ref).abs().max() < 1e-12
    assert (final - final_ref).abs().max() < 1e-12
    plain = mamba_chunk_scan_combined(**inputs, chunk_size=case["chunk_size"], **optional)
    assert torch.equal(plain, y)  # without return_final_states: y alone


def test_chunked_scan_gradients_match_sequential_recurrence():
    inputs, optional = scan_case(13, 3, SCAN_CASES["softplus-bias-D-z"]["options"] | {"initial_states": True})
    leaves = {name: t.requires_grad_() for name, t in {**inputs, **optional}.items() if isinstance(t, torch.Tensor)}
    weights = randn(2, 13, 6, 3, seed=20)

    def grads(scan, **kwargs):
        y, final = scan(**inputs, **optional, **kwargs)
        return torch.autograd.grad((y * weights).sum() + final.sum(), list(leaves.values()))

    chunked = grads(mamba_chunk_scan_combined, chunk_size=4, return_final_states=True)
    reference = grads(sequential_scan)
    for name, got, expected in zip(leaves, chunked, reference):
        assert (got - expected).abs().max() < 1e-11, name


def test_chunked_scan_keeps_low_precision_dtypes_and_refuses_packed_sequences():
    inputs, _ = scan_case(10, 1, {})
    low = {name: t.to(torch.bfloat16) if name != "A" else t.float() for name, t in inputs.items()}
    y = mamba_chunk_scan_combined(**low, chunk_size=4)
    assert y.dtype == torch.bfloat16
    expected, _ = sequential_scan(**{name: t.double() for name, t in low.items()})
    assert (y.double() - expected).abs().max() < 0.05 * expected.abs().max()  # bf16 rounding of the output
    with pytest.raises(NotImplementedError, match="packed sequences"):
        mamba_chunk_scan_combined(**inputs, chunk_size=4, seq_idx=torch.zeros(2, 10, dtype=torch.int32))


@pytest.mark.parametrize("seqlen", [3, 10])  # shorter and longer than the kernel
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_matches_direct_formula(seqlen, activation):
    x, weight, bias = randn(2, 5, seqlen, seed=0), randn(5, 4, seed=1), randn(5, seed=2)
    out = causal_conv1d_fn(x, weight, bias, activation=activation)
    expected = direct_conv(x, weight, bias)
    expected = F.silu(expected) if activation else expected
    assert (out - expected).abs().max() < 1e-14


@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_rmsnorm_matches_formula(group_size, norm_before_gate):
    x, z, weight, bias = randn(3, 5, 12, seed=0), randn(3, 5, 12, seed=1), randn(12, seed=2), randn(12, seed=3)
    eps = 1e-5
    gated = x if norm_before_gate else x * F.silu(z)
    size = group_size or 12
    normed = torch.cat(
        [g / torch.sqrt(g.square().mean(-1, keepdim=True) + eps) for g in gated.split(size, dim=-1)], dim=-1
    )
    expected = normed * weight + bias
    expected = expected * F.silu(z) if norm_before_gate else expected
    got = rmsnorm_gated(x, weight, bias, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)
    assert (got - expected).abs().max() < 1e-14

    module = GatedRMSNorm(12, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate, dtype=F64)
    assert module.bias is None and torch.equal(module.weight, torch.ones(12, dtype=F64))
    with torch.no_grad():
        module.weight.copy_(weight)
    assert torch.equal(module(x, z), rmsnorm_gated(x, weight, None, z, eps, group_size, norm_before_gate))
    assert torch.equal(module(x), rmsnorm_gated(x, weight, eps=eps, group_size=group_size))  # no gate
    assert module(x.float()).dtype == torch.float32


@pytest.mark.parametrize("fused_norm", [False, True])
def test_split_conv_scan_matches_conv_and_sequential_scan(fused_norm):
    batch, seqlen, nheads, headdim, ngroups, dstate, width = 2, 11, 4, 3, 2, 5, 4
    dim, conv_dim = nheads * headdim, nheads * headdim + 2 * ngroups * dstate
    zxbcdt = randn(batch, seqlen, dim + conv_dim + nheads, seed=0)
    conv_weight, conv_bias = randn(conv_dim, width, seed=1), randn(conv_dim, seed=2)
    dt_bias, A, D = randn(nheads, seed=3), -torch.exp(randn(nheads, seed=4)), randn(nheads, seed=5)
    norm_weight, outproj = (randn(dim, seed=6), randn(7, dim, seed=7)) if fused_norm else (None, None)

    out, final = mamba_split_conv1d_scan_combined(
        zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size=4, headdim=headdim, ngroups=ngroups,
        return_final_states=True, rmsnorm_weight=norm_weight, rmsnorm_eps=1e-5, outproj_weight=outproj,
        norm_before_gate=False,
    )

    z, xBC, dt = zxbcdt.split([dim, conv_dim, nheads], dim=-1)
    xBC = F.silu(direct_conv(xBC.transpose(1, 2), conv_weight, conv_bias)).transpose(1, 2)
    x, B, C = xBC.split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
    y, final_ref = sequential_scan(
        x.unflatten(-1, (nheads, headdim)), dt, A, B.unflatten(-1, (ngroups, dstate)),
        C.unflatten(-1, (ngroups, dstate)), D=D, z=None if fused_norm else z.unflatten(-1, (nheads, headdim)),
        dt_bias=dt_bias, dt_softplus=True,
    )
    expected = y.flatten(-2)
    if fused_norm:
        expected = rmsnorm_gated(expected, norm_weight, z=z, eps=1e-5, group_size=dim // ngroups, norm_before_gate=False)
        expected = expected @ outproj.T
    assert (out - expected).abs().max() < 1e-12
    assert (final - final_ref).abs().max() < 1e-12


# --- installation into megatron-core, and a tiny hybrid MambaModel on CPU ---


def _logits(model, tokens):
    return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), attention_mask=None)


@cpu_only
def test_install_binds_the_reference_kernels_and_leaves_no_stub():
    from megatron.core.ssm import mamba_block, mamba_mixer
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    install_mamba_kernels()  # idempotent
    assert mamba_mixer.HAVE_MAMBA_SSM
    assert mamba_mixer.mamba_chunk_scan_combined is mamba_chunk_scan_combined
    assert mamba_mixer.mamba_split_conv1d_scan_combined is mamba_split_conv1d_scan_combined
    assert issubclass(mamba_mixer.ExtendedRMSNorm, GatedRMSNorm)
    assert mamba_mixer.causal_conv1d_fn is None and mamba_mixer.selective_state_update is None  # torch fallbacks
    assert mamba_block.TENorm is WrappedTorchNorm
    assert not any(name == "mamba_ssm" or name.startswith("mamba_ssm.") for name in sys.modules)
    triton = sys.modules.get("triton")
    assert triton is None or triton.__spec__ is not None  # never the stub: a lasting one breaks torch._inductor


@cpu_only
def test_tiny_hybrid_model_runs_forward_and_backward(mcore):
    model = build_tiny_mamba(tiny_mamba_config(), chunk_size=8)
    assert model.decoder.layer_type_list == list(HYBRID_PATTERN)
    tokens = random_tokens(2, 12, 128, seed=0)  # 12 tokens: a whole chunk of 8 and a partial one
    logits = _logits(model, tokens)
    assert logits.shape == (2, 12, 128) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@cpu_only
def test_memory_efficient_and_prefill_paths_agree(mcore):
    """Megatron's two Mamba code paths: the fused split-conv-scan wrapper then a plain RMSNorm, and its own
    nn.Conv1d, the chunked scan and the gated RMSNorm."""
    fused = build_tiny_mamba(tiny_mamba_config(), chunk_size=8)
    unfused = build_tiny_mamba(tiny_mamba_config(use_mamba_mem_eff_path=False), chunk_size=8)
    unfused.load_state_dict(fused.state_dict())
    tokens = random_tokens(2, 12, 128, seed=1)
    with torch.no_grad():
        assert (_logits(fused, tokens) - _logits(unfused, tokens)).abs().max() < 1e-5


@cpu_only
def test_static_inference_prefill_then_decode_matches_full_forward(mcore):
    """Prefill returns the scan's final states (mamba_chunk_scan_combined), decode steps run megatron's torch
    fallbacks for causal_conv1d_update and selective_state_update."""
    from megatron.core.inference.contexts import StaticInferenceContext

    model = build_tiny_mamba(tiny_mamba_config(), chunk_size=8)
    tokens = random_tokens(2, 12, 128, seed=4)
    positions = torch.arange(12).expand_as(tokens)
    context = StaticInferenceContext(max_batch_size=2, max_sequence_length=32)

    def infer(start, end):  # logits of the last token, [b, vocab]
        context.sequence_len_offset = start
        out = model(tokens[:, start:end], positions[:, start:end], attention_mask=None,
                    inference_context=context, runtime_gather_output=True)
        return out[:, -1]

    with torch.no_grad():
        full = _logits(model, tokens)
        assert (infer(0, 10) - full[:, 9]).abs().max() < 1e-5  # prefill of 10 tokens: a chunk of 8 and 2
        for t in (10, 11):
            assert (infer(t, t + 1) - full[:, t]).abs().max() < 1e-5


@cpu_only
def test_tiny_hybrid_model_is_deterministic(mcore):
    def run():
        init_distributed(seed=1234)  # re-seeds: same weights
        model = build_tiny_mamba(tiny_mamba_config(), chunk_size=8)
        logits = _logits(model, random_tokens(2, 12, 128, seed=2))
        logits.square().mean().backward()
        return logits.detach(), [param.grad for param in model.parameters()]

    (logits, grads), (again, grads_again) = run(), run()
    assert torch.equal(logits, again)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_again))


@pytest.mark.heavy
@cpu_only
def test_tensor_parallel_2_matches_tp1(mcore, tmp_path):
    """TP=2 under torchrun (gloo) gives the TP=1 logits and, shard by shard, the TP=1 gradients."""
    model = build_tiny_mamba(tiny_mamba_config(), chunk_size=8)
    tokens = random_tokens(2, 12, 128, seed=3)
    logits = _logits(model, tokens)
    loss(logits).backward()
    torch.save(
        {
            "state_dict": model.state_dict(),
            "tokens": tokens,
            "chunk_size": 8,
            "grads": {name: param.grad for name, param in model.named_parameters()},
        },
        tmp_path / "case.pt",
    )
    run_torchrun(REPO_ROOT / "tests/workers/mamba_tp2.py", 2, tmp_path / "case.pt", tmp_path / "out.pt")
    result = torch.load(tmp_path / "out.pt")
    assert (result["logits"] - logits.detach()).abs().max() < 1e-5
    assert result["grad_error"] < 1e-5
