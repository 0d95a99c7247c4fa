"""Many processes, one result: which images a process takes, and how processes agree.

Two ways to split a run (the same code path as one process, where ``world_size == 1``):

- ``torchrun --nproc_per_node=N run.py ...``: a process group (NCCL on GPUs, gloo on CPUs); the
  images still to do are cut into N contiguous shards, every process writes its own durable
  records, and the main process merges them into the results one process would write.
- independent jobs (a Slurm array): ``num_shards=N shard_index=i`` take contiguous shards of the
  whole id list without a process group; ``python -m diffseg.tasks.merge RUN_DIR`` then writes
  the results from everybody's records.

Records are by image id, so a run may resume with another number of processes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..errors import ConfigError

__all__ = ["Dist", "agree_on_run_stamp", "from_env", "shard"]

T = TypeVar("T")


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The ``rank``-th of ``world_size`` contiguous slices of ``items``: exact (no padding, no
    repeats), sizes differing by at most one, the larger ones first."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    return list(items[start : start + base + (1 if rank < extra else 0)])


@dataclass(frozen=True)
class Dist:
    """This process's place: ``rank`` of ``world_size``; ``group`` when a process group links
    them (torchrun), False for independent shard jobs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def suffix(self) -> str:
        """File-name part of this process's own records (none for a single process)."""
        return "" if self.world_size == 1 else f".rank{self.rank}"

    def barrier(self) -> None:
        if self.group:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (only ours without a process group)."""
        if not self.group:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process."""
        if not self.group:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def from_env(num_shards: int = 1, shard_index: int = 0, device_type: str = "cpu") -> Dist:
    """This process's :class:`Dist`: from torchrun's environment (``WORLD_SIZE`` > 1: joins the
    process group), else the ``num_shards`` / ``shard_index`` options, else a single process.

    The group uses gloo on every device: it only carries barriers and small Python objects (the
    images themselves never cross processes), and gloo needs no GPU to be chosen per rank."""
    _export_slurm_tasks()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if num_shards != 1:
            raise ConfigError("use torchrun or num_shards/shard_index, not both")
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
        rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
        return Dist(rank, dist.get_world_size(), local, group=True)
    if not 0 <= shard_index < num_shards:
        raise ConfigError(f"shard_index={shard_index} must be in [0, num_shards={num_shards})")
    return Dist(shard_index, num_shards, 0, group=False)


def _export_slurm_tasks() -> None:
    """Several Slurm tasks of one submitit job (``tasks_per_node`` > 1): set the variables
    torchrun would (rank, world size, master address), so they form one process group."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    if "SUBMITIT_FOLDER" not in os.environ and "SUBMITIT_EXECUTOR" not in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export()


def agree_on_run_stamp() -> None:
    """Under torchrun, before Hydra makes the run dir: the main process's time stamp in
    ``DIFFSEG_RUN_STAMP`` on every process, so that they all use one run dir (the default run
    dir is named after the time). Nothing happens for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "DIFFSEG_RUN_STAMP" in os.environ:
        return
    import datetime

    dist = from_env()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    os.environ["DIFFSEG_RUN_STAMP"] = dist.broadcast(stamp)
