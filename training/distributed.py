"""Data-parallel training over `torch.distributed`, launched by torchrun (docs/scaling.md).

Every rank holds the whole SAE and reads the same deterministic batch stream; global batch i is
cut into `world.size` contiguous slices and rank r trains on slice r, so the data seen as a whole
is that of a single-process run with the same --batch-size. Gradients are summed and divided by
the world size (each rank's loss is a mean over an equal slice), so every rank applies the same
update. Firing counts are summed only when a density window closes, `last_fired` is max-reduced
only when the dead mask is read (resampling; every step for topk's AuxK), so relu runs have no
per-step collective besides the gradients. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .density import DensityTracker


class World(NamedTuple):
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """The rank and world size torchrun put in the environment (a single process without it)."""
    env = os.environ
    return World(
        int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    )


def init(device: str) -> tuple[World, str]:
    """Join torchrun's process group if WORLD_SIZE > 1 (nccl for CUDA, gloo otherwise); returns
    the world and the device this rank trains on (`cuda` becomes `cuda:LOCAL_RANK`)."""
    world = world_from_env()
    if world.size == 1:
        return world, device
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return world, device


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def average_grads(params: list[Tensor], world: World) -> None:
    """Replace every .grad by its mean over the ranks (all ranks then take the same step)."""
    works = [dist.all_reduce(p.grad, async_op=True) for p in params]
    for w, p in zip(works, params, strict=True):
        w.wait()
        p.grad.div_(world.size)


def local_slices(batches: Iterator[Tensor], world: World, device) -> Iterator[Tensor]:
    """This rank's contiguous slice of every global batch, moved to `device`."""
    for x in batches:
        b = x.shape[0] // world.size
        yield x[world.rank * b : (world.rank + 1) * b].to(device)


class ReducedDensityTracker(DensityTracker):
    """A DensityTracker whose windows, dead masks and checkpoint state cover all ranks.

    Each rank counts its own slices; a closing window is summed over the ranks (so the stored
    history is global) and `last_fired` is max-reduced whenever it is read. Every method here is
    a collective: all ranks call them at the same steps, as the training loop does.
    """

    def flush(self, step: int) -> None:
        if self.window_steps:
            dist.all_reduce(self.window)
        super().flush(step)

    def dead_mask(self, step: int, dead_window: int) -> Tensor:
        dist.all_reduce(self.last_fired, op=dist.ReduceOp.MAX)
        return super().dead_mask(step, dead_window)

    def open_window(self) -> Tensor:
        window = self.window.clone()
        dist.all_reduce(window)
        return window

    def recent_density(self, min_tokens: int = 0) -> tuple[Tensor, int]:
        if self.counts:  # closed windows are already global
            return super().recent_density(min_tokens)
        window = self.window.clone()
        dist.all_reduce(window)
        tokens = self.window_steps * self.batch_size
        return window.double() / max(tokens, 1), tokens

    def state(self) -> dict[str, Tensor]:
        dist.all_reduce(self.last_fired, op=dist.ReduceOp.MAX)
        window = self.window.clone()
        dist.all_reduce(window)
        return {**super().state(), "density.window": window.cpu()}

    def load_state(self, t: dict[str, Tensor]) -> None:
        super().load_state(t)
        # The checkpoint's open window is the global sum: keep it on one rank only, so the next
        # reduction does not count it size times.
        if dist.get_rank() != 0:
            self.window.zero_()
