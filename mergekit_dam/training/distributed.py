"""Sharded training across processes, on PyTorch FSDP2 (`fully_shard`).

Launched by torchrun or `accelerate launch` (they set WORLD_SIZE, RANK, LOCAL_RANK),
`mergekit-dam train` runs one process per device. Every tensor group of the view
(the embedding, each decoder layer, the head; see merged_model.py) becomes an FSDP unit: its
expert stacks and, as a nested unit, its coefficients are sharded across the ranks and
gathered only while the group merges its weights, so a rank holds 1/world of the
experts plus one layer gathered. Data parallelism splits each optimizer step's
`grad_accum` micro-batches across the ranks; FSDP reduce-scatters the coefficient
gradients. The same config therefore learns the same coefficients as one process, up
to floating-point summation order. Rank 0 writes the checkpoints and the artifact.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from mergekit_dam.core import auto


@dataclass
class Ranks:
    rank: int
    world: int
    device: torch.device
    mesh: object

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, group: torch.nn.Module) -> None:
        """Make a TensorGroup, experts and coefficients together, one FSDP unit. One unit,
        not two: FSDP reshards a unit after backward when its trainable parameters get
        their gradients, and the expert stacks alone have none."""
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard

        # split along the columns/rows, not the expert axis (N is small and rarely divisible by W)
        def columns(parameter):
            return Shard(1)

        fully_shard(group, mesh=self.mesh, shard_placement_fn=columns)
        group.copy_experts = True

    def root(self, view: torch.nn.Module) -> None:
        """Make the view the FSDP root. Without one, every group would be its own root,
        and FSDP keeps a root's parameters gathered from forward to backward."""
        from torch.distributed.fsdp import fully_shard

        fully_shard(view, mesh=self.mesh)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        dist.all_reduce(values)
        return values

    def barrier(self) -> None:
        dist.barrier()


def world_size() -> int:
    """Processes in this launch (torchrun and accelerate set WORLD_SIZE); 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Started by torchrun or `accelerate launch`, with any number of processes: a
    one-process launch takes the sharded (FSDP) code path too, on a world of one."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def setup(train_device: str) -> Optional[Ranks]:
    """The process group of a torchrun/accelerate launch (None in a single process)."""
    if not launched():
        return None
    from torch.distributed.device_mesh import init_device_mesh

    kind = auto.device(train_device).type  # one process per GPU: the local rank's
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    mesh = init_device_mesh(kind, (dist.get_world_size(),))
    if dist.get_rank() != 0:  # one copy of the logs
        logging.getLogger("mergekit_dam").setLevel(logging.WARNING)
    return Ranks(dist.get_rank(), dist.get_world_size(), device, mesh)


def is_main() -> bool:
    """Rank 0 of a launch (before or after the process group exists), or a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) parameter or state; others as they are."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def like(reference: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """`whole` laid out like `reference` (this rank's shard when it is a DTensor)."""
    if hasattr(reference, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(whole.to(reference.device), reference.device_mesh, reference.placements)
    return whole.to(reference.device)
