"""CPU support for megatron-core 0.16.1: GPT (dense and MoE), Mamba and the pipeline schedules, without a GPU.

Megatron-core assumes CUDA in a handful of places that a forward (and backward) pass reaches even when every
parameter lives on the CPU. `apply_cpu_support()` neutralises exactly those, and only when
`torch.cuda.is_available()` is False: a GPU run is never patched. The patches, and why each is needed:

1. `torch.cuda.current_device()` answers "cpu". 175 megatron sites allocate on it: the global memory buffer
   behind `DotProductAttention`, pipeline p2p receive buffers and shape tensors, TP gather/scatter buffers,
   RoPE frequencies. On a CPU-only torch the real function raises.
2. `torch.cuda.synchronize()` does nothing: batched p2p communication calls it after every exchange.
3. `CudaRNGStatesTracker.add` records its named states from a CPU generator instead of
   `torch.cuda.get_rng_state()`, and `CudaRNGStatesTracker.fork` is a no-op context manager (that still
   refuses a name never added). Attention enters `fork()` around its dropout on every forward; embeddings
   and the transformer block do under sequence parallelism. Without dropout (pruning) there is nothing for
   the forked state to do; any dropout would draw from the CPU generator.
4. `tensor_parallel.model_parallel_cuda_manual_seed` also seeds torch's CPU generator with the data-parallel
   seed, the CPU analogue of the CUDA default generator it seeds on a GPU: `use_cpu_initialization=True`
   draws weights from it. It then sets up the tracker as before (its `torch.cuda.manual_seed` is only
   queued by torch until CUDA initialises, which never happens). Code that imported the function by name
   before this call keeps the original: the tracker works (patch 3), the CPU generator is left unseeded.
5. The name `torch` inside `megatron.core.pipeline_parallel.schedules` (the token counter
   `torch.zeros(..., device="cuda")`, created even at PP=1) and `megatron.core.transformer.utils`
   (`get_default_causal_mask`, used when `attention_mask=None`) is rebound to a copy of the torch namespace
   whose tensor factories place device="cuda" tensors on the CPU. Nothing else changes for those modules,
   and every other module, including every op, runs at full speed: no TorchFunctionMode.
6. `LanguageModule.setup_embeddings_and_output_layer` runs with `Tensor.cuda` answering the tensor itself:
   with tied embeddings and PP>1 it moves the last stage's copy of the word embeddings with `.cuda()`
   before all-reducing it from the first stage. Only for the duration of that call, once per model build.
7. Mamba: `megatron.core.ssm.mamba_mixer` is imported with the pure-torch kernels of
   `megatron_prune.minitron.runtime.mamba_kernels` in the place of mamba-ssm's, and without Transformer Engine
   `MambaStack`'s final norm (hard-coded `TENorm`) is `WrappedTorchNorm` (`install_mamba_kernels()`).
8. Megatron-Bridge imports without Transformer Engine: its LoRA modules (`megatron.bridge.peft.lora`,
   `lora_layers`) import `transformer_engine.pytorch` unconditionally and subclass `te.Linear`. A meta-path
   finder gives exactly those two modules, while they execute, a stub whose `Linear`/`LayerNormLinear` are
   classes nothing is an instance of; the stub leaves `sys.modules` when they are done, so megatron-core
   keeps `HAVE_TE=False` everywhere. Installed always (cheap); it acts only if the bridge is imported.
9. `torch.cuda.get_rng_state()` returns the CPU generator's state: Megatron-Bridge's checkpoint writer records
   the CUDA RNG state even with `save_rng=False`.
10. Megatron-Bridge at TP>1 (`apply_bridge_cpu_support()`, called once the bridge is imported): its row-parallel
   mapping splits HF weights with `torch.chunk(dim=1)`, i.e. into non-contiguous views, and gloo's scatter
   sends the bytes of the underlying storage, not of the view: the shards are made contiguous first.
11. MoE router: `megatron.core.transformer.moe.moe_utils` binds `te_general_gemm` only when Transformer Engine
   imports, yet `router_gating_linear` tests `te_general_gemm is not None` on every call (a NameError in
   0.16.1). It is defined as None there, so the router takes its plain-torch matmul.
12. MoE all-to-all token dispatcher (`moe_token_dispatcher_type="alltoall"`, Megatron-Bridge's choice for
   Qwen3-MoE): the class creates a CUDA stream for its device-to-host copies of the split sizes, even at
   expert-parallel size 1. The name `torch` inside `megatron.core.transformer.moe.token_dispatcher` is
   rebound to a copy whose `cuda.Stream`, `cuda.current_stream` and `cuda.stream` are a CPU stand-in: one
   stream whose work is complete when issued (its events are already synchronised). At EP or expert-TP > 1 its
   split sizes go to gloo's `all_to_all_single`, which takes a sequence: `maybe_move_tensor_to_cpu(as_numpy=True)`
   converts only CUDA tensors, so the dispatcher's copy also turns CPU tensors into numpy.
13. Training (`apply_training_cpu_support()`, called by the distillation loop only): the literal "cuda" tensors
   of `megatron.core.utils`, the optimizers, gradient clipping and `param_and_grad_buffer` (see its docstring).
14. `FusedScaleMaskSoftmax.is_kernel_available` answers False: with bf16/fp16 activations and
   `masked_softmax_fusion` (on by default) it imports the CUDA extension `scaled_masked_softmax_cuda`, which
   does not exist without a GPU; attention then takes its plain torch softmax, as it does in fp32.
15. Multi-latent attention on the local spec (the only one without Transformer Engine): `MLASelfAttention` builds
   its core attention with `k_channels=qk_head_dim + qk_pos_emb_head_dim, v_channels=v_head_dim`, which 0.16.1's
   `DotProductAttention` does not take (a TypeError at build time). Its `__init__` accepts them: the output width
   per head becomes v_channels and every head has its own K/V (MLA has no query groups); the softmax scale is
   MLA's own (it passes one). Its forward already handles key/query dims other than the value dim. And
   `multi_latent_attention.HAVE_TE` is False when Transformer Engine is absent: that module takes the import of
   megatron-core's TE extension (which stands a MagicMock in for `transformer_engine`) as TE being present, then
   calls `isinstance(linear_proj, TELinear)` with the mock TELinear (a TypeError).

Not patched, because no run of this package reaches them: `tensor_parallel.broadcast_data` (Megatron-LM's
batch loader, `.cuda()`) and the distributed optimizer.
"""

import contextlib
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Callable

import torch
from megatron.core import tensor_parallel
from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.pipeline_parallel import schedules
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer import utils as transformer_utils
from megatron.core.extensions import transformer_engine as te_extension
from megatron.core.transformer import multi_latent_attention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.moe import moe_utils, token_dispatcher

from megatron_prune.minitron.runtime.mamba_kernels import install_mamba_kernels, modules_in_place

_TENSOR_FACTORIES = ("arange", "empty", "full", "ones", "tensor", "zeros")
_applied = False


def apply_cpu_support() -> bool:
    """Make megatron-core run on the CPU when no GPU is present. Idempotent.

    Returns True when CPU support is active (applied now or before), False on a machine with CUDA, where
    nothing is touched.
    """
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True

    torch.cuda.current_device = lambda: "cpu"  # megatron passes the answer as `device=`
    torch.cuda.synchronize = lambda device=None: None  # CPU collectives are complete when they return

    mcore_random.CudaRNGStatesTracker.add = _add_rng_state_without_cuda
    mcore_random.CudaRNGStatesTracker.fork = _fork_without_cuda
    seed_on_cpu = _seeding_cpu_generator(mcore_random.model_parallel_cuda_manual_seed)
    mcore_random.model_parallel_cuda_manual_seed = seed_on_cpu
    tensor_parallel.model_parallel_cuda_manual_seed = seed_on_cpu

    torch_on_cpu = _torch_with_cpu_factories()
    schedules.torch = torch_on_cpu
    transformer_utils.torch = torch_on_cpu

    LanguageModule.setup_embeddings_and_output_layer = _with_tensor_cuda_as_identity(
        LanguageModule.setup_embeddings_and_output_layer
    )
    install_mamba_kernels()
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    token_dispatcher.torch = _torch_with_cpu_streams()
    token_dispatcher.maybe_move_tensor_to_cpu = _splits_as_numpy(moe_utils.maybe_move_tensor_to_cpu)
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # the CPU generator's state
    FusedScaleMaskSoftmax.is_kernel_available = lambda self, mask, b, np, sq, sk: False  # the fused softmax is a CUDA kernel
    DotProductAttention.__init__ = _with_mla_channels(DotProductAttention.__init__)
    multi_latent_attention.HAVE_TE = te_extension.HAVE_TE
    if not any(isinstance(f, _BridgeWithoutTransformerEngine) for f in sys.meta_path):
        sys.meta_path.insert(0, _BridgeWithoutTransformerEngine())

    _applied = True
    return True


def _add_rng_state_without_cuda(self, name: str, seed: int) -> None:
    """`CudaRNGStatesTracker.add` with the state of a CPU generator seeded with `seed` in place of a CUDA one."""
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    self._is_initialized = True
    self.seeds_.add(seed)
    self.states_[name] = torch.Generator().manual_seed(seed).get_state()


def _fork_without_cuda(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
    """`CudaRNGStatesTracker.fork` as a no-op context manager; it still refuses a state never added."""
    if name not in self.states_:
        raise Exception(f"rng state {name} is not added")
    return contextlib.nullcontext()


def _seeding_cpu_generator(model_parallel_cuda_manual_seed):
    """Wrap megatron's seeding so that it also seeds the CPU generator, which CPU initialisation draws from."""

    @functools.wraps(model_parallel_cuda_manual_seed)
    def seed_model_parallel_rng(seed: int, *args, **kwargs):
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed, *args, **kwargs)

    return seed_model_parallel_rng


def _on_cpu(factory):
    """Wrap a torch tensor factory so that device="cuda" (or "cuda:N", or a cuda `torch.device`) means CPU."""

    @functools.wraps(factory)
    def make(*args, device=None, **kwargs):
        if str(device).startswith("cuda"):
            device = "cpu"
        return factory(*args, device=device, **kwargs)

    return make


def _torch_with_cpu_factories() -> types.ModuleType:
    """A copy of the `torch` namespace for one megatron module to see, with CPU-redirecting tensor factories.

    The attributes are copied, not looked up through a proxy, so every other `torch.X` costs what it did.
    torch's own module `__getattr__` comes along and keeps serving its lazily imported submodules.
    """
    namespace = _copy_of(torch)
    namespace.__dict__.update({name: _on_cpu(getattr(torch, name)) for name in _TENSOR_FACTORIES})
    return namespace


def _copy_of(module: types.ModuleType) -> types.ModuleType:
    """A new module object holding the attributes of `module` (the same objects, not copies of them)."""
    namespace = types.ModuleType(module.__name__, module.__doc__)
    namespace.__dict__.update(vars(module))
    return namespace


class _CpuStream:
    """Stands in for a CUDA stream (and its events) on the CPU: work is complete when it is issued."""

    def wait_stream(self, stream) -> None:
        pass

    def record_event(self, event=None) -> "_CpuStream":
        return self

    def synchronize(self) -> None:
        pass


_CPU_STREAM = _CpuStream()


def _splits_as_numpy(move: Callable) -> Callable:
    """`maybe_move_tensor_to_cpu` that also turns a CPU tensor into numpy when asked (`as_numpy=True`): megatron-core
    converts only CUDA tensors, and gloo's `all_to_all_single` takes the split sizes as a sequence, not a tensor."""

    def move_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    return move_to_cpu


def _torch_with_cpu_streams() -> types.ModuleType:
    """A copy of the `torch` namespace whose `torch.cuda` has CPU stand-ins for streams (patch 12)."""
    namespace = _copy_of(torch)
    namespace.cuda = cuda = _copy_of(torch.cuda)
    cuda.Stream = lambda *args, **kwargs: _CPU_STREAM
    cuda.current_stream = lambda device=None: _CPU_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    return namespace


def _with_tensor_cuda_as_identity(function):
    """Wrap `function` so that, while it runs, `tensor.cuda()` returns the tensor itself."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *_, **__: tensor
        try:
            return function(*args, **kwargs)
        finally:
            torch.Tensor.cuda = cuda

    return run


def apply_bridge_cpu_support() -> bool:
    """Patch 10 (see the module docstring), on a machine without CUDA. Idempotent; imports the bridge."""
    if not apply_cpu_support():  # a machine with CUDA: nothing to patch
        return False
    from megatron.bridge.models.conversion.param_mapping import MegatronParamMapping

    scatter = MegatronParamMapping.scatter_to_tp_ranks
    if not getattr(scatter, "_contiguous_splits", False):

        @functools.wraps(scatter)
        def scatter_contiguous(self, splits, *args, **kwargs):
            splits = [s.contiguous() for s in splits] if splits else splits
            return scatter(self, splits, *args, **kwargs)

        scatter_contiguous._contiguous_splits = True
        MegatronParamMapping.scatter_to_tp_ranks = scatter_contiguous
    return True


def apply_training_cpu_support() -> bool:
    """Patch 13, for training loops (`megatron_prune.minitron.distill`), on a machine without CUDA. Idempotent.

    Megatron-core's DDP grad buffers, FP32 optimizer, grad-norm helpers (`megatron.core.utils`' local
    multi-tensor fallbacks) create `device="cuda"` tensors: the name `torch` in those modules becomes the
    CPU-factory copy of patch 5. Grad clipping asserts `torch.cuda.FloatTensor` grads: the optimizer's
    `clip_grad_by_total_norm_fp32` is replaced by the same scaling, written for any device.
    """
    if not apply_cpu_support():  # a machine with CUDA: nothing to patch
        return False
    import megatron.core.utils as mcore_utils
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.optimizer import clip_grads, optimizer

    torch_on_cpu = _torch_with_cpu_factories()
    for module in (mcore_utils, param_and_grad_buffer, clip_grads, optimizer):
        module.torch = torch_on_cpu
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    return True


def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False) -> None:
    """megatron's `clip_grad_by_total_norm_fp32` without its CUDA assertion: grads *= max_norm / total_norm if < 1."""
    name = "decoupled_grad" if use_decoupled_grad else "grad"
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        for p in parameters:
            grad = getattr(p, name, None)
            if grad is not None:
                grad.detach().mul_(coeff)


def _with_mla_channels(init):
    """`DotProductAttention.__init__` that also takes MLA's `k_channels` / `v_channels` (patch 15)."""

    @functools.wraps(init)
    def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
        init(self, *args, **kwargs)
        if v_channels is not None:  # [sq, b, np, v] -> [sq, b, np * v]; K and V per head
            self.hidden_size_per_attention_head = k_channels
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition
            self.num_query_groups_per_partition = self.num_attention_heads_per_partition

    return __init__


class _BridgeWithoutTransformerEngine(importlib.abc.MetaPathFinder):
    """Finds Megatron-Bridge's LoRA modules as usual, but executes them with a Transformer Engine stub."""

    MODULES = ("megatron.bridge.peft.lora", "megatron.bridge.peft.lora_layers")

    def find_spec(self, name, path, target=None):
        if name not in self.MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and importlib.util.find_spec("transformer_engine") is None:
            spec.loader = _ExecutingWithStub(spec.loader)
        return spec


class _ExecutingWithStub(importlib.abc.Loader):
    """Wraps a module loader: `transformer_engine` is in `sys.modules` only while the module executes."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with modules_in_place(_transformer_engine_stub()):
            self.loader.exec_module(module)


def _transformer_engine_stub() -> dict:
    """`transformer_engine` and `transformer_engine.pytorch` with the names the bridge's LoRA modules bind."""
    te, te_torch = types.ModuleType("transformer_engine"), types.ModuleType("transformer_engine.pytorch")
    te.__path__, te.pytorch = [], te_torch
    te_torch.Linear = type("Linear", (torch.nn.Module,), {"__doc__": "Transformer Engine stub: never built."})
    te_torch.LayerNormLinear = type("LayerNormLinear", (torch.nn.Module,), {"__doc__": "Transformer Engine stub."})
    te_torch.ops = types.SimpleNamespace(Sequential=type("Sequential", (torch.nn.Module,), {}))  # annotations
    return {"transformer_engine": te, "transformer_engine.pytorch": te_torch}
