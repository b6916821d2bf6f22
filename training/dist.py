"""Data-parallel set-up and teardown: which rank this process is, among how many (torchrun)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run; Ranks() is a run of one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the GPU index on this machine

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints and writes files."""
        return self.rank == 0


def start(device_choice: str) -> Ranks:
    """The process group under torchrun (NCCL on GPUs, gloo on the CPU); Ranks() otherwise."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Ranks()
    import torch.distributed as dist

    from training.config import resolve_device

    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    on_gpu = resolve_device(device_choice, ranks.local_rank).type == "cuda"
    if on_gpu:
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group("nccl" if on_gpu else "gloo")
    return ranks


def stop(clean: bool) -> None:
    """Tear down the process group. After a clean finish every rank first meets the others at a
    barrier, so that no rank closes its connections while a peer is still at work (once, in CI, a rank
    that left early aborted in gloo's teardown). After an error or an interrupt the ranks may not be at
    the same point, and a barrier could wait forever: skip it."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()
