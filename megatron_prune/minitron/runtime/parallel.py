"""The parallel context: ranks and process groups, built once at the boundary.

Owns: reading megatron-core's parallel state *once* (`ParallelContext.from_megatron`) and the collectives
the pruning flow needs (gathers over tensor-parallel ranks and pipeline stages, sums over data-parallel
replicas, a broadcast from global rank 0). Nothing else in the package reads Megatron's global state.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

# each group's field prefix here and its name in megatron-core's parallel_state (get_<name>_world_size, _rank, _group)
_MEGATRON_NAMES = {"tp": "tensor_model_parallel", "pp": "pipeline_model_parallel", "dp": "data_parallel",
                   "ep": "expert_model_parallel", "etp": "expert_tensor_parallel", "expert_dp": "expert_data_parallel"}


@dataclass(frozen=True)
class ParallelContext:
    """Where this rank sits. Groups are None when the world is a single process."""

    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    global_rank: int = 0
    ep_size: int = 1  # expert-parallel size (MoE experts split over ranks)
    ep_rank: int = 0
    expert_dp_size: int = 1  # replicas of each expert (data parallelism of the expert weights)
    etp_size: int = 1  # expert tensor-parallel size: routed experts' linears are split over this many ranks
    etp_rank: int = 0
    tp_group: Optional[Any] = field(default=None, compare=False, repr=False)
    pp_group: Optional[Any] = field(default=None, compare=False, repr=False)
    dp_group: Optional[Any] = field(default=None, compare=False, repr=False)
    ep_group: Optional[Any] = field(default=None, compare=False, repr=False)
    expert_dp_group: Optional[Any] = field(default=None, compare=False, repr=False)
    etp_group: Optional[Any] = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        for name in ("tp_size", "pp_size", "dp_size", "ep_size", "etp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for axis, name in (("tp", "tensor-parallel"), ("pp", "pipeline"), ("dp", "data-parallel")):
            rank, size = getattr(self, f"{axis}_rank"), getattr(self, f"{axis}_size")
            if not 0 <= rank < size:
                raise ValueError(f"{axis}_rank={rank} outside {name} size {size}")

    @classmethod
    def given(cls, ctx: Optional["ParallelContext"]) -> "ParallelContext":
        """`ctx` if a caller passed one, else megatron-core's current layout (`from_megatron`): what a public
        function does with its optional `ctx` argument."""
        return ctx if ctx is not None else cls.from_megatron()

    @classmethod
    def from_megatron(cls) -> "ParallelContext":
        """Read megatron-core's parallel state (single process if torch.distributed is not initialised)."""
        if not dist.is_available() or not dist.is_initialized():
            return cls()
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            raise RuntimeError(
                "torch.distributed is initialised but megatron-core model parallelism is not: call "
                "megatron_prune.minitron.runtime.distributed.init_distributed(...) or "
                "parallel_state.initialize_model_parallel(...) before pruning"
            )
        state = {"global_rank": dist.get_rank()}
        for prefix, name in _MEGATRON_NAMES.items():
            state[f"{prefix}_size"] = getattr(ps, f"get_{name}_world_size")()
            state[f"{prefix}_group"] = getattr(ps, f"get_{name}_group")()
            if prefix != "expert_dp":  # (this context has no rank among an expert's replicas)
                state[f"{prefix}_rank"] = getattr(ps, f"get_{name}_rank")()
        return cls(**state)

    def for_routed_experts(self) -> "ParallelContext":
        """The context routed-expert tensors are split in: tensor parallelism over the expert tensor-parallel group
        (`expert_tensor_parallel_size`, megatron-core's default: the TP size)."""
        return replace(self, tp_size=self.etp_size, tp_rank=self.etp_rank, tp_group=self.etp_group)

    def sizes(self) -> Dict[str, int]:
        """The parallel sizes a pruned size must split over, as `config.validate_export_config` takes them."""
        return {"tp_size": self.tp_size, "pp_size": self.pp_size, "ep_size": self.ep_size, "etp_size": self.etp_size}

    @property
    def is_main(self) -> bool:
        return self.global_rank == 0

    def sum_over_dp(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a CPU float tensor over data-parallel replicas (identity when dp_size == 1)."""
        return _sum(t, self.dp_size, self.dp_group)

    def sum_over_expert_dp(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a CPU float tensor over the replicas of this rank's experts (identity when there is one)."""
        return _sum(t, self.expert_dp_size, self.expert_dp_group)

    def sum_over_etp(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over expert tensor-parallel ranks of a tensor (routed experts' partial outputs), on its device."""
        if self.etp_size == 1:
            return t
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.etp_group)
        return t

    def gather_over_tp(self, t: torch.Tensor) -> List[torch.Tensor]:
        """All-gather a tensor (same shape on every rank) over tensor-parallel ranks, in rank order."""
        return _gather(t, self.tp_size, self.tp_group)

    def gather_over_ep(self, t: torch.Tensor) -> List[torch.Tensor]:
        """All-gather a tensor (same shape on every rank) over expert-parallel ranks, in rank order."""
        return _gather(t, self.ep_size, self.ep_group)

    def gather_over_pp(self, obj: Any) -> List[Any]:
        """All-gather a picklable object over pipeline stages, in stage order."""
        return _gather_objects(obj, self.pp_size, self.pp_group)

    def gather_objects_over_ep(self, obj: Any) -> List[Any]:
        """All-gather a picklable object over expert-parallel ranks, in rank order."""
        return _gather_objects(obj, self.ep_size, self.ep_group)

    def broadcast_object(self, obj: Any) -> Any:
        """Global rank 0's `obj` on every rank (e.g. what rank 0 read from a file system others may not see)."""
        if _world_size() == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_all(self, obj: Any) -> List[Any]:
        """All-gather a picklable object over every rank of the world, in global rank order."""
        return _gather_objects(obj, _world_size(), None)  # (group None: the whole world)

    def barrier(self) -> None:
        if _world_size() > 1:
            dist.barrier()

    def on_main(self, action: Callable[[], Any]) -> Any:
        """Run `action()` on global rank 0 only (e.g. a file write) and return its result there (None
        elsewhere); if it raises, every rank raises, so none is left waiting in a later collective."""
        result, problem = None, None
        if self.is_main:
            try:
                result = action()
            except Exception as e:  # noqa: BLE001 - re-raised on every rank just below
                problem = as_problem(e)
        self.raise_first(problem)
        return result

    def raise_first(self, problem: Optional[Tuple[type, str]]) -> None:
        """Agree on errors: every rank passes None or (exception class, message); if any rank has a problem,
        every rank raises the first one (in global rank order), so no rank is left waiting in a collective."""
        for rank, p in enumerate(self.gather_all(problem)):
            if p is not None:
                error, message = p
                raise error(message if rank == self.global_rank else f"(raised on rank {rank}) {message}")


def _world_size() -> int:
    """The number of processes: 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _sum(t: torch.Tensor, size: int, group) -> torch.Tensor:
    if size == 1:
        return t
    buf = t.to(_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.cpu()


def _gather(t: torch.Tensor, size: int, group) -> List[torch.Tensor]:
    if size == 1:
        return [t]
    buf = t.contiguous().to(_device())
    out = [torch.empty_like(buf) for _ in range(size)]
    dist.all_gather(out, buf, group=group)
    return [o.to(t.device) for o in out]


def _gather_objects(obj: Any, size: int, group) -> List[Any]:
    if size == 1:
        return [obj]
    out: List[Any] = [None] * size
    dist.all_gather_object(out, obj, group=group)
    return out


def as_problem(error: BaseException) -> Tuple[type, str]:
    """(class, message) of an exception for `raise_first`: the package's own errors and KeyboardInterrupt keep
    their class, any other becomes a RuntimeError naming the original type."""
    from megatron_prune.errors import PruneError

    if isinstance(error, PruneError):
        return type(error), str(error)
    if isinstance(error, KeyboardInterrupt):  # every rank stops as interrupted
        return KeyboardInterrupt, "interrupted"
    return RuntimeError, f"{type(error).__name__}: {error}"


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
