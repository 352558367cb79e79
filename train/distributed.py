"""Multi-process training through torch.distributed, and the same calls as no-ops in one process.

`torchrun --nproc_per_node N -m msf train ...` starts N processes with RANK / WORLD_SIZE /
LOCAL_RANK set; `setup` joins them into one group (NCCL on CUDA, gloo on the CPU) and gives each
its device (`cuda:LOCAL_RANK`). Without those variables it returns a one-process context whose
collectives return their input, so the training loop is written once.

What the loop relies on:
- every process builds the same model from the same seed (DDP also broadcasts rank 0's weights);
- each process takes its slice of every global batch (`msf.pipeline.train_plan`) and DDP averages
  the gradients, which equals the global batch's gradient because every slice has the same size
  and the loss is a mean over images and pixels;
- scores, losses and class counts are summed across processes before anyone reads them;
- only rank 0 writes files (run directory, checkpoints, logs, plots); every process reads the
  checkpoint on resume; decisions taken from the clock are rank 0's, broadcast.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from msf.metrics import FScoreMeter


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place; returns the tensor. Moved to the device the backend reduces on
        (NCCL: this process's GPU, gloo: the CPU) and back, when it sits elsewhere."""
        if self.active:
            on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
            moved = tensor.to(on)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            if moved is not tensor:
                tensor.copy_(moved)
        return tensor

    def reduce_meter(self, meter: FScoreMeter) -> FScoreMeter:
        if self.active:
            meter.load_state(self.sum_(meter.state()))
        return meter

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list:
        """Every process's `obj`, in rank order, on every process."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_name: str) -> tuple[DistContext, torch.device]:
    """The process group (when launched by torchrun) and this process's device."""
    if not launched_by_torchrun():
        return DistContext(), pick_device(device_name)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device_name}: CUDA is not available on this machine")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"process {rank} has LOCAL_RANK {local_rank} but this machine has "
                             f"{torch.cuda.device_count()} GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device_name in ("auto", "cpu"):
        device = torch.device("cpu")
    else:
        raise ValueError(f"--device {device_name}: a multi-process run takes --device auto, cpu or cuda")
    if not dist.is_initialized():
        # Generous timeout: the other processes wait in a barrier while rank 0 decodes the cache.
        # device_id binds NCCL to this process's GPU up front instead of guessing at the first barrier.
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(minutes=60), device_id=device if use_cuda else None)
    return DistContext(rank, world, local_rank), device


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name}: not a device ({exc})") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPUs")
        if device.index is not None:
            torch.cuda.set_device(device.index)  # Triton launches on the current device, whatever its pointers say
    return device
