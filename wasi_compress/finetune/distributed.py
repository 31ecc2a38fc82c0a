"""Distributed set-up and tear-down in one context manager: under ``torchrun`` (``WORLD_SIZE`` > 1) it
initialises the process group (gloo on CPU, nccl on CUDA) unless one exists, and destroys on exit only
a group it created, so a caller's own process group is never torn down."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch

from wasi_compress.errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def distributed(config) -> Iterator[Dist]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Dist()
        return
    _check_supported(config)
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if torch.device(config.device).type == "cuda" else "gloo")
    try:
        if config.batch_size < dist.get_world_size():
            raise UserError(f"--batch-size {config.batch_size} is smaller than the {dist.get_world_size()} processes")
        yield Dist(dist.get_rank(), dist.get_world_size())
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _check_supported(config) -> None:
    if config.method == "wasi" and config.update == "subspace-iteration":
        raise UserError("--update subspace-iteration cannot run under DDP: it updates L, R inside backward from this "
                        "process's gradient only (no all-reduce), so replicas would drift apart; use --update optimizer-step")
    if config.step_in_backward is True:
        raise UserError("--step-in-backward cannot run under DDP: each step would run on this process's gradient "
                        "before DDP averages it; drop --step-in-backward")


def all_reduce_(tensor: torch.Tensor, info: Dist) -> None:
    if info.active:
        import torch.distributed as dist

        dist.all_reduce(tensor)


def broadcast_(tensor: torch.Tensor, info: Dist) -> None:
    if info.active:
        import torch.distributed as dist

        dist.broadcast(tensor, 0)


def gather_objects(obj, info: Dist) -> list:
    if not info.active:
        return [obj]
    import torch.distributed as dist

    gathered: list = [None] * info.world
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(info: Dist) -> None:
    if info.active:
        import torch.distributed as dist

        dist.barrier()
