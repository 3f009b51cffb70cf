"""Distributed start-up and tear-down: the process group, megatron-core's model parallel state, the seeds.

Works under torchrun (env:// rendezvous) and as a plain single process (a world of size 1). On a machine
without a GPU it uses gloo and applies `megatron_prune.minitron.runtime.cpu`'s support; with a GPU, nccl and nothing
patched. It does not describe the parallel layout to the rest of the library: that is the parallel context.
"""

import os
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_prune.minitron.runtime.cpu import apply_cpu_support

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_distributed(
    tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1, seed: int = 1234,
    expert_model_parallel_size: int = 1, expert_tensor_parallel_size: Optional[int] = None,
) -> None:
    """Initialise torch.distributed (if needed), megatron-core's model parallel groups and the RNG seeds.

    Without the torchrun environment variables the process is a world of size 1. Calling it again with
    the same sizes only re-seeds; other sizes need `destroy_distributed()` first. `expert_tensor_parallel_size`:
    how many ranks split each routed expert's linears (megatron-core's default, None: the TP size).
    """
    use_cuda = torch.cuda.is_available()
    under_torchrun = all(name in os.environ for name in _TORCHRUN_ENV)
    if dist.is_initialized():
        world_size = dist.get_world_size()
    else:
        world_size = int(os.environ["WORLD_SIZE"]) if under_torchrun else 1
    model_parallel_size = tensor_model_parallel_size * pipeline_model_parallel_size
    if world_size % model_parallel_size != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size "
            f"{tensor_model_parallel_size} x pipeline_model_parallel_size {pipeline_model_parallel_size} "
            f"= {model_parallel_size}"
        )

    if not use_cuda:
        apply_cpu_support()
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if under_torchrun:
            if use_cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)

    if parallel_state.model_parallel_is_initialized():
        current = (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size(),
                   parallel_state.get_expert_model_parallel_world_size(), parallel_state.get_expert_tensor_parallel_world_size())
        if current != (tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size,
                       expert_tensor_parallel_size or tensor_model_parallel_size):
            raise RuntimeError(
                f"model parallel state is already initialised with tensor_model_parallel_size "
                f"{current[0]}, pipeline_model_parallel_size {current[1]}; call destroy_distributed() "
                f"before initialising {tensor_model_parallel_size}, {pipeline_model_parallel_size}"
            )
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            expert_model_parallel_size=expert_model_parallel_size,
            expert_tensor_parallel_size=expert_tensor_parallel_size,
        )

    # The CPU generator too: `use_cpu_initialization=True` draws weights from it, on a GPU run as well.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    """Tear down megatron-core's model parallel state and the default process group."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
