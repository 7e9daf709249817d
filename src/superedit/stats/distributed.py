"""Key statistics over several processes or machines with ``torch.distributed``.

    torchrun --nproc-per-node 2 -m superedit.stats.distributed --model M --layers 2-6 --tokens 100000
    torchrun --nproc-per-node 2 $(which superedit) stats --distributed --model M --layers 2-6

(the first form runs ``superedit stats --distributed`` with the arguments given). Over several
machines the same command with torchrun's ``--nnodes``/``--node-rank``/``--rdzv-endpoint``.

:func:`init_shard` joins the process group torchrun describes in the environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): gloo on CPU, nccl on CUDA (each process on
``cuda:LOCAL_RANK``). :func:`~superedit.stats.covariance.collect_covariances` with the returned
:class:`Shard` runs batch b on rank ``b % world_size`` and all-reduces the float64 sums (see that
module's doc): the result equals one process's to float64 rounding of the sums' order. Rank 0 reads and
writes the cache and renders the output; the others wait at a barrier.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import StatsError
from ..utils.logs import get_logger

log = get_logger(__name__)

__all__ = ["LOCAL", "Shard", "destroy_shard", "init_shard", "main"]


@dataclass(frozen=True)
class Shard:
    """This process's place in a torch.distributed group: ``rank`` of ``world_size``.

    ``device`` is where collective tensors must live (the model's device; CUDA for nccl). With
    ``world_size == 1`` every collective is a no-op and nothing of torch.distributed is touched."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether item ``index`` (a batch) is this rank's: ``index % world_size == rank``."""
        return index % self.world_size == self.rank

    def all_reduce_(self, tensors: Sequence) -> None:
        """Sum each tensor over all ranks, in place (every rank ends with the sum)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def broadcast_(self, tensor) -> None:
        """Rank 0's ``tensor`` into every rank's (same shape and dtype), in place."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        dist.broadcast(tensor, src=0)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's picklable ``obj`` on every rank (the others' argument is ignored)."""
        if self.world_size == 1:
            return obj
        import torch
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=torch.device(self.device) if self.device != "cpu" else None)
        return box[0]

    def barrier(self) -> None:
        if self.world_size == 1:
            return
        import torch.distributed as dist

        dist.barrier()


#: this process alone
LOCAL = Shard()


def init_shard(device: str | None = None, timeout_s: float = 1800.0) -> Shard:
    """Join the torch.distributed group described by torchrun's environment variables.

    ``device``: "cpu" (gloo) or "cuda" (nccl, this process on ``cuda:LOCAL_RANK``); default cuda when
    available. Without ``WORLD_SIZE`` in the environment (not started by torchrun) a
    :class:`StatsError` says how to start it; with ``WORLD_SIZE=1`` no group is made."""
    import datetime

    import torch
    import torch.distributed as dist

    env = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    if env["WORLD_SIZE"] is None or env["RANK"] is None:
        raise StatsError("--distributed needs torch.distributed's environment (WORLD_SIZE, RANK, MASTER_ADDR, "
                         "MASTER_PORT); start it with: torchrun --nproc-per-node N -m superedit.stats.distributed ...")
    try:
        world, rank, local = int(env["WORLD_SIZE"]), int(env["RANK"]), int(env["LOCAL_RANK"] or 0)
    except ValueError as exc:
        raise StatsError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers, got {env}") from exc
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise StatsError(f"--device {device} but CUDA is not available; use --device cpu (gloo)")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    elif device != "cpu":
        raise StatsError(f"distributed statistics run on cpu (gloo) or cuda (nccl), got --device {device!r}")
    if world == 1:
        return Shard(0, 1, device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    log.info("torch.distributed: rank %d of %d (%s, %s)", rank, world, dist.get_backend(), device)
    return Shard(rank, world, device)


def destroy_shard(shard: Shard, synchronise: bool = True) -> None:
    """Leave the process group (if one was made), every rank together.

    With ``synchronise`` (the normal exit; pass False when leaving on an error, where the peers may
    never reach it) a barrier first: a rank that tears its gloo pairs down while a peer still has a send or receive in
    flight makes that peer's transport thread abort (SIGABRT, "terminate called without an active
    exception"; seen once in CI under load at this point)."""
    if shard.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                if synchronise:
                    dist.barrier()
            finally:
                dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m superedit.stats.distributed ARGS`` = ``superedit stats --distributed ARGS`` (exits)."""
    from ..cli import app

    app(["stats", "--distributed", *(sys.argv[1:] if argv is None else argv)], prog_name="superedit")


if __name__ == "__main__":
    main()
