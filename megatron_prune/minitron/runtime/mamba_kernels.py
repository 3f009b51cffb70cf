"""Pure-torch references for the Mamba-2 kernels that megatron-core's `MambaMixer` calls, for a machine without CUDA.

`megatron.core.ssm.mamba_mixer` imports its kernels from mamba-ssm and causal-conv1d (Triton and CUDA, GPU only)
inside try/except, and the inference package it imports needs `triton` unconditionally. This module owns:

- the kernels, as plain differentiable torch (the backward pass is autograd's), computed in at least float32
  and returned in the input's dtype: the chunked SSD scan `mamba_chunk_scan_combined`, the depthwise causal
  convolution `causal_conv1d_fn`, the gated RMSNorm `rmsnorm_gated` / `GatedRMSNorm` (the base class of
  megatron's `ExtendedRMSNorm`) and the training path's fused wrapper `mamba_split_conv1d_scan_combined`;
- `install_mamba_kernels()`, which imports `mamba_mixer` with these kernels in the place of mamba-ssm's
  (see its docstring). `megatron_prune.minitron.runtime.cpu.apply_cpu_support()` calls it; nothing else should.

Names and signatures follow mamba-ssm's, restricted to what megatron-core 0.16.1 uses: packed sequences
(`seq_idx`, `cu_seqlens`) are refused. Not provided, because megatron falls back to torch when they are
missing: causal-conv1d's kernels in the mixer (prefill convolution, decode step) and `selective_state_update`.
Notation: b batch, l sequence, h heads, p head dim, g groups, n state dim, d channels, w conv width.
"""

import contextlib
import importlib
import importlib.util
import sys
import types
import warnings

import torch
import torch.nn.functional as F

_MIXER = "megatron.core.ssm.mamba_mixer"
_TRITON_USER = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"


def mamba_chunk_scan_combined(
    x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
    cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
    return_varlen_states=False,
):
    """Mamba-2 selective scan, computed chunk by chunk (state space duality).

    Per head, with dt <- clamp(softplus(dt + dt_bias)): state_t = exp(dt_t A) state_{t-1} + dt_t x_t B_t^T and
    y_t = state_t C_t + D x_t, then y_t *= silu(z_t).
    x: [b, l, h, p]; dt: [b, l, h]; A: [h]; B, C: [b, l, g, n], h % g == 0; D: [h] or [h, p]; z: [b, l, h, p];
    dt_bias: [h]; initial_states: [b, h, p, n]. Returns y [b, l, h, p] in x's dtype, and with
    return_final_states also the last state [b, h, p, n].
    """
    if seq_idx is not None or cu_seqlens is not None or return_varlen_states:
        raise NotImplementedError("the reference scan does not support packed sequences (seq_idx, cu_seqlens)")
    batch, seqlen, nheads, headdim = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    dt = dt.to(dtype) + (0 if dt_bias is None else dt_bias.to(dtype))
    if dt_softplus:
        dt = F.softplus(dt)  # identity above 20, as in the kernel
    dt = dt.clamp(*dt_limit)  # [b, l, h]; the kernel clamps to the default (0, inf) too

    # Whole chunks; a padded step has dt = 0: no decay, no input. Chunking changes rounding only.
    chunk = min(chunk_size, seqlen)
    pad = -seqlen % chunk
    nchunks = (seqlen + pad) // chunk

    def chunked(t):  # [b, l, h|g, k] -> [b, c, s, h, k], groups repeated over their heads
        t = t.to(dtype).repeat_interleave(nheads // t.shape[2], dim=2)
        return F.pad(t, (0, 0, 0, 0, 0, pad)).view(batch, nchunks, chunk, nheads, -1)

    xdt, B, C = chunked(x * dt[..., None]), chunked(B), chunked(C)  # [b, c, s, h, p|n]
    dA = F.pad(dt * A.to(dtype), (0, 0, 0, pad)).view(batch, nchunks, chunk, nheads).permute(0, 3, 1, 2)
    dA_cumsum = dA.cumsum(-1)  # [b, h, c, s]

    # Within each chunk: y_t = sum_{s <= t} C_t.B_s exp(dA_{s+1} + ... + dA_t) dt_s x_s.
    decay = torch.exp(_segment_sums(dA))  # [b, h, c, t, s]
    y = torch.einsum("bcthn,bcshn,bhcts,bcshp->bcthp", C, B, decay, xdt)
    # The state each chunk adds by its end, then the state entering each chunk (chunk 0: the initial one).
    states = torch.einsum("bcshn,bhcs,bcshp->bchpn", B, torch.exp(dA_cumsum[..., -1:] - dA_cumsum), xdt)
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, 0])
    states = torch.cat([initial_states.to(dtype)[:, None], states], dim=1)  # [b, c+1, h, p, n]
    chunk_decay = torch.exp(_segment_sums(F.pad(dA_cumsum[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    y = y + torch.einsum("bcthn,bchpn,bhct->bcthp", C, states[:, :-1], torch.exp(dA_cumsum))
    y = y.reshape(batch, -1, nheads, headdim)[:, :seqlen]  # [b, l, h, p]

    if D is not None:
        D = D.to(dtype)
        y = y + x.to(dtype) * (D if D.dim() == 2 else D[:, None])  # D: [h, p] or [h, 1]
    if z is not None:
        y = y * F.silu(z.to(dtype))
    y = y.to(x.dtype)
    return (y, states[:, -1]) if return_final_states else y


def _segment_sums(a):
    """[..., T] -> [..., T, T]: entry [i, j] is a[j+1] + ... + a[i] for j <= i (0 on the diagonal), -inf above.

    Built by a masked cumulative sum, not as a difference of cumulative sums, so exp() of it stays accurate.
    """
    T = a.shape[-1]
    lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    sums = a[..., :, None].expand(*a.shape, T).masked_fill(~lower.tril(-1), 0).cumsum(-2)  # [..., i, j]
    return sums.masked_fill(~lower, -torch.inf)


def causal_conv1d_fn(x, weight, bias=None, activation=None):
    """Depthwise causal convolution: out[b, d, t] = bias[d] + sum_k weight[d, k] x[b, d, t - w + 1 + k].

    x: [b, d, l]; weight: [d, w]; bias: [d]; activation None, "silu" or "swish". Returns [b, d, l] in x's
    dtype; inputs before t = 0 are zeros.
    """
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError(f"activation {activation!r}")
    out = F.conv1d(F.pad(x.to(weight.dtype), (weight.shape[1] - 1, 0)), weight[:, None], bias, groups=x.shape[1])
    return (out if activation is None else F.silu(out)).to(x.dtype)


def rmsnorm_gated(x, weight, bias=None, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """RMSNorm over each group of `group_size` channels (all of them if None), gated by silu(z).

    norm_before_gate: norm(x) * silu(z); otherwise norm(x * silu(z)). x, z: [..., d]; weight, bias: [d];
    d % group_size == 0. Returns x's dtype.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    out = x.to(dtype)
    if z is not None and not norm_before_gate:
        out = out * F.silu(z.to(dtype))
    groups = out.unflatten(-1, (-1, group_size or out.shape[-1]))  # [..., d/group_size, group_size]
    out = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + eps)).flatten(-2) * weight.to(dtype)
    if bias is not None:
        out = out + bias.to(dtype)
    if z is not None and norm_before_gate:
        out = out * F.silu(z.to(dtype))
    return out.to(x.dtype)


class GatedRMSNorm(torch.nn.Module):
    """mamba-ssm's gated `RMSNorm` module (weight ones, no bias) over `rmsnorm_gated`; forward(x [..., d], z=None)."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x, z=None):
        return rmsnorm_gated(x, self.weight, self.bias, z, self.eps, self.group_size, self.norm_before_gate)


def mamba_split_conv1d_scan_combined(
    zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None, seq_idx=None,
    dt_limit=(0.0, float("inf")), return_final_states=False, activation="silu", rmsnorm_weight=None,
    rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None, ngroups=1, norm_before_gate=True,
):
    """A Mamba-2 mixer after its input projection: split, causal conv of x|B|C, scan gated by z (or gated norm).

    zxbcdt: [b, l, 2 h p + 2 g n + h], laid out [z, x, B, C, dt]; conv1d_weight: [h p + 2 g n, w];
    conv1d_bias: [h p + 2 g n]; dt_bias, A: [h]; D: [h] (then headdim is required) or [h, p];
    rmsnorm_weight: [h p] (normalised per group); outproj_weight: [o, h p]. Returns [b, l, h p] (or [b, l, o]),
    and with return_final_states also the last state [b, h, p, n].
    """
    nheads, headdim = (D.shape[0], headdim) if D.dim() == 1 else D.shape
    dim = nheads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    if zxbcdt.shape[-1] != 2 * dim + 2 * ngroups * dstate + nheads:
        raise ValueError(f"zxbcdt has {zxbcdt.shape[-1]} channels, expected [z, x, B, C, dt] for "
                         f"{nheads} heads of {headdim}, {ngroups} groups of state {dstate}")
    z, xBC, dt = zxbcdt.split([dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xBC = causal_conv1d_fn(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, activation).transpose(1, 2)
    x, B, C = xBC.split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
    out = mamba_chunk_scan_combined(
        x.unflatten(-1, (nheads, headdim)), dt, A, B.unflatten(-1, (ngroups, dstate)),
        C.unflatten(-1, (ngroups, dstate)), chunk_size, D=D,
        z=z.unflatten(-1, (nheads, headdim)) if rmsnorm_weight is None else None, dt_bias=dt_bias,
        initial_states=initial_states, seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit,
        return_final_states=return_final_states,
    )
    out, final_states = out if return_final_states else (out, None)
    out = out.flatten(-2)  # [b, l, h p]
    if rmsnorm_weight is not None:
        out = rmsnorm_gated(out, rmsnorm_weight, z=z, eps=rmsnorm_eps, group_size=dim // ngroups,
                            norm_before_gate=norm_before_gate)
    if outproj_weight is not None:
        out = F.linear(out, outproj_weight, outproj_bias)
    return (out, final_states) if return_final_states else out


def install_mamba_kernels() -> None:
    """Import megatron-core's `mamba_mixer` with this module's kernels standing in for mamba-ssm's. Idempotent.

    The mixer binds its kernels at import time, and `ExtendedRMSNorm` subclasses the gated RMSNorm there, so
    the kernels cannot be patched in afterwards: the mixer is imported here, while `sys.modules` holds
    stand-in `mamba_ssm.ops.triton.{layernorm_gated, ssd_combined}` modules (`HAVE_MAMBA_SSM` becomes True).
    Megatron's triton-only inference tensor ops are imported before that, with a `triton` stub (their kernels
    raise if launched) if triton is missing. Both stand-ins leave `sys.modules` as soon as their import is
    done: a lasting fake `triton` breaks `torch._inductor`. Without Transformer Engine, `MambaStack`'s
    final norm (hard-coded `TENorm`) becomes megatron's `WrappedTorchNorm`.

    If the mixer was imported before without mamba-ssm (possible only where triton is installed), its
    `ExtendedRMSNorm` is a MagicMock: it is left as it is, with a warning, and building a `MambaMixer` raises
    megatron's ImportError, while everything else keeps working.
    """
    mixer = sys.modules.get(_MIXER)
    if mixer is None:
        importlib.import_module(_TRITON_USER.rpartition(".")[0])  # parent packages, outside the stub's reach
        triton_stub = {} if importlib.util.find_spec("triton") else _triton_stub()
        with modules_in_place(triton_stub):
            importlib.import_module(_TRITON_USER)
        with modules_in_place(_mamba_ssm_stub()):
            mixer = importlib.import_module(_MIXER)
    if mixer.RMSNormGated is not GatedRMSNorm:
        warnings.warn(
            f"{_MIXER} was imported before megatron_prune's CPU support and without mamba-ssm: Mamba layers "
            "cannot be built in this process; call megatron_prune.minitron.runtime.cpu.apply_cpu_support() first",
            stacklevel=3,
        )
        return

    from megatron.core.extensions import transformer_engine
    from megatron.core.ssm import mamba_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if not transformer_engine.HAVE_TE:
        mamba_block.TENorm = WrappedTorchNorm


class _TritonKernelUnavailable:
    """What the stub's `triton.jit` makes of a kernel: launching it (`kernel[grid](...)`) raises."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        raise RuntimeError(f"triton kernel {self.fn.__qualname__} needs triton and a GPU")


def _triton_stub() -> dict:
    """`triton` and `triton.language` modules with what importing megatron's tensor ops touches."""
    triton, language = types.ModuleType("triton"), types.ModuleType("triton.language")
    triton.jit, triton.language, language.constexpr = _TritonKernelUnavailable, language, object
    return {"triton": triton, "triton.language": language}


def _mamba_ssm_stub() -> dict:
    """The mamba-ssm modules `mamba_mixer` imports its Mamba-2 kernels from, holding this module's kernels."""
    names = ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.ops.triton.layernorm_gated",
             "mamba_ssm.ops.triton.ssd_combined")
    stub = {name: types.ModuleType(name) for name in names}
    stub["mamba_ssm.ops.triton.layernorm_gated"].RMSNorm = GatedRMSNorm
    ssd = stub["mamba_ssm.ops.triton.ssd_combined"]
    ssd.mamba_chunk_scan_combined = mamba_chunk_scan_combined
    ssd.mamba_split_conv1d_scan_combined = mamba_split_conv1d_scan_combined
    return stub


@contextlib.contextmanager
def modules_in_place(modules: dict):
    """Put `modules` (name -> module) in `sys.modules` for the duration; then restore what was there."""
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
