"""Running ``test.py`` and ``train.py`` over several processes with ``torchrun`` (``torch.distributed``).

A process group is set up only when the process was started by ``torchrun`` (its ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR`` variables are set); plain ``python test.py``
is a world of one process and every call here is then local.

Work is split in lockstep *rounds*: in each round every rank handles the next batch of its
shard (image ``i`` belongs to rank ``i % world_size``: disjoint, no padding, no duplicates) and
then takes part in one :func:`exchange`, which moves each per-image result to the rank that
needs it. A user error on one rank travels in that exchange, so every rank stops at the same
point with no hang: the lowest failing rank prints its one error line, the others exit with the
same status silently (:class:`PeerFailed`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from AnomalyCLIP_lib.errors import AnomalyCLIPError, PeerFailed, one_line, user_error_line
from pipeline.atomic import locked_folder

logger = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Generous: rank 0 may hash a 900 MB backbone or write a large cache while the others wait.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """Where this process stands among the ranks (one process: rank 0 of 1).

    Attributes:
        rank: Global rank.
        size: Number of processes.
        local_rank: Rank on this machine (picks the GPU).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the logs, tables, results and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, count: int) -> list[int]:
        """Indices ``0..count-1`` this rank handles: every ``size``-th one, starting at ``rank``."""
        return list(range(self.rank, count, self.size))

    def shard_sizes(self, count: int) -> list[int]:
        """How many of ``count`` items each rank handles."""
        return [len(range(rank, count, self.size)) for rank in range(self.size)]

    def rounds(self, count: int, batch_size: int) -> int:
        """Lockstep rounds needed for the largest shard at ``batch_size`` items a round."""
        return math.ceil(math.ceil(count / self.size) / batch_size) if count else 0


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def several_processes() -> bool:
    """Whether ``torchrun`` started this process as one of two or more."""
    return launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1


def setup(device_name: str | None, resolve_device: Callable[[str | None], torch.device]) -> tuple[World, torch.device]:
    """The world and this rank's device; joins the process group under ``torchrun``.

    On GPUs each rank uses ``cuda:LOCAL_RANK`` with NCCL; with ``--device cpu`` (or no GPU) the
    ranks run on the CPU with gloo.

    Args:
        device_name: The ``--device`` flag.
        resolve_device: Turns the flag into a device for a single process.
    """
    if not several_processes():
        return World(), resolve_device(device_name)
    world = World(rank=int(os.environ["RANK"]), size=int(os.environ["WORLD_SIZE"]),
                  local_rank=int(os.environ["LOCAL_RANK"]))
    device = resolve_device(device_name)
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise AnomalyCLIPError(f"rank {world.rank} wants GPU {world.local_rank} but this machine has "
                                   f"{torch.cuda.device_count()}; lower torchrun's --nproc_per_node")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    return world, device


def finish(world: World) -> None:
    """Leave the process group (a no-op for one process)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _raise_first(world: World, errors: list[str | None]) -> None:
    failed = [rank for rank, error in enumerate(errors) if error]
    if not failed:
        return
    if failed[0] == world.rank:
        raise AnomalyCLIPError(errors[world.rank])
    raise PeerFailed(f"stopped because rank {failed[0]} failed: {errors[failed[0]]}")


def guarded(world: World, work: Callable[[], T]) -> tuple[T | None, str | None]:
    """Run ``work``; in a distributed world a user error is returned (to be shared) instead of raised.

    User errors are :class:`AnomalyCLIPError`, the operating-system errors a user fixes (a
    full disk, a read-only folder) and running out of memory (:func:`user_error_line`).
    """
    if not world.distributed:
        return work(), None
    try:
        return work(), None
    except PeerFailed:
        raise
    except AnomalyCLIPError as exc:
        return None, one_line(exc)
    except (OSError, MemoryError, RuntimeError) as exc:
        line = user_error_line(exc)
        if line is None:
            raise
        return None, line


def together(world: World, work: Callable[[], T]) -> T:
    """Run ``work`` on every rank; if it fails with a user error on any rank, every rank stops.

    Use it around set-up steps that could fail on one rank only (a file missing on one machine),
    so no rank is left waiting in a later collective.
    """
    value, error = guarded(world, work)
    if world.distributed:
        errors: list[str | None] = [None] * world.size
        dist.all_gather_object(errors, error)
        _raise_first(world, errors)
    return value  # type: ignore[return-value]


def exchange(world: World, outgoing: list[list[Any]], error: str | None = None) -> list[Any]:
    """Send ``outgoing[r]`` to rank ``r``; returns what every rank sent here, in rank order.

    Every rank must call it the same number of times. ``error`` (a user error of this round)
    reaches every rank, and then every rank raises (see :class:`PeerFailed`).
    """
    if not world.distributed:
        if error:
            raise AnomalyCLIPError(error)
        return list(outgoing[0])
    received: list[Any] = []
    errors: list[str | None] = []
    for source in range(world.size):
        slot: list[Any] = [None]
        scattered = [(error, items) for items in outgoing] if source == world.rank else None
        dist.scatter_object_list(slot, scattered, src=source)
        source_error, items = slot[0]
        errors.append(source_error)
        received.extend(items)
    _raise_first(world, errors)
    return received


@contextlib.contextmanager
def main_holds(world: World, folder: str | os.PathLike, flag: str) -> Iterator[None]:
    """Rank 0, which writes the outputs, holds ``folder`` (:func:`atomic.locked_folder`) while the block runs.

    If another run holds it, every rank stops with rank 0's line.
    """
    with contextlib.ExitStack() as stack:
        together(world, lambda: stack.enter_context(locked_folder(folder, flag)) if world.is_main else None)
        yield


def gather_to_main(world: World, value: T) -> list[T] | None:
    """Every rank's ``value`` on rank 0 (in rank order); ``None`` on the other ranks."""
    if not world.distributed:
        return [value]
    gathered: list[T] | None = [None] * world.size if world.is_main else None  # type: ignore[list-item]
    dist.gather_object(value, gathered, dst=0)
    return gathered


def broadcast_from_main(world: World, value: T) -> T:
    """Rank 0's ``value`` on every rank."""
    if not world.distributed:
        return value
    holder = [value if world.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]  # type: ignore[return-value]


def lockstep(world: World, batches: Iterator[T], rounds: int) -> Iterator[tuple[T | None, str | None]]:
    """``rounds`` steps of ``(next batch or None, user error or None)``, the same count on every rank.

    A rank whose shard is used up yields ``None`` batches; after an error it yields no more
    batches (the caller's :func:`exchange` of that round stops every rank).
    """
    for _ in range(rounds):
        batch, error = guarded(world, lambda: next(batches, None))
        yield batch, error
