"""torchrun integration: process group from torchrun's environment, rank-0-only side effects.

`torchrun --nproc_per_node=N -m MedSRLib.training CONFIG` (and torchrun's multi-node flags
`--nnodes/--node_rank/--rdzv_endpoint`) set RANK, LOCAL_RANK and WORLD_SIZE; without them the
run is a single process. The backend is gloo on CPU and nccl on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints, logs and exports."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup(device_name: str = "auto") -> DistributedContext:
    """Initialise the process group when launched by torchrun; pick the device."""
    use_cuda = torch.cuda.is_available() if device_name == "auto" else device_name.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(rank, local_rank, world_size, device)


def teardown(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def weight_spread(module: torch.nn.Module, context: DistributedContext) -> float:
    """Largest difference of any parameter between ranks (0.0 when all ranks agree)."""
    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in module.parameters()])
    if not context.enabled:
        return 0.0
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return float((high - low).max())
