"""CPU support for megatron-core 0.16.1: dense GPT models and the pipeline schedules, on a machine without a GPU.

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

Not patched, because a pruning forward/backward never reaches them: the literal "cuda" tensors in
`megatron.core.utils` (grad-norm helper, hybrid context parallel packing), `tensor_parallel.broadcast_data`
(Megatron-LM's batch loader, `.cuda()`), gradient clipping, the optimizers and `param_and_grad_buffer`
(training only), MoE and Mamba (handled elsewhere).
"""

import contextlib
import functools
import types

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.pipeline_parallel import schedules
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer import utils as transformer_utils

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

    torch.cuda.current_device = _current_device
    torch.cuda.synchronize = _synchronize

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

    _applied = True
    return True


def _current_device() -> str:
    """Stands in for `torch.cuda.current_device()`: megatron passes the answer as `device=`."""
    return "cpu"


def _synchronize(device=None) -> None:
    """Stands in for `torch.cuda.synchronize()`: CPU collectives are complete when they return."""


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
    namespace = types.ModuleType(torch.__name__, torch.__doc__)
    namespace.__dict__.update(vars(torch))
    namespace.__dict__.update({name: _on_cpu(getattr(torch, name)) for name in _TENSOR_FACTORIES})
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
