"""Distributed helpers: whole tensors from shards, small all-gathers, and a run's process group.

The whole tensor of a parameter (under FSDP2 a ``DTensor``'s ``full_tensor()``, a collective every
rank must call; elsewhere the tensor itself), the DDP setting per-task freezing requires, the
refusal of FSDP1 on CPU, recognising a lost peer, and a clean shutdown of the process group
(docs/distributed.md, "When a rank dies, hangs or the job ends").
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.distributed.tensor import DTensor

from crma_lightning.core.errors import ConfigError


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor: gathered from every rank for a ``DTensor`` (a collective), else ``t``."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def whole_cpu(t: Tensor) -> Tensor:
    """``t`` detached, whole (see :func:`full_tensor`), contiguous, on the CPU: ready to save or hash."""
    return full_tensor(t.detach()).contiguous().cpu()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_strings(mine: str) -> list[str]:
    """Every rank's ``mine``, in rank order (``[mine]`` without a process group). A collective."""
    if not is_distributed():
        return [mine]
    out: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return [str(x) for x in out]


def require_find_unused_parameters(trainer: Any) -> None:
    """DDP must look for unused parameters: each task's step uses only that task's adapters.

    Plain ``ddp`` (also what ``strategy: auto`` picks for several devices) trains one step and then
    stops with DDP's "parameters that were not used" error; it is switched on here, before the
    model is wrapped, on every rank. An explicit ``find_unused_parameters=False`` cannot work and is
    refused before training.
    """
    from lightning.pytorch.strategies import DDPStrategy

    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy):
        return
    kwargs = strategy._ddp_kwargs  # passed to DistributedDataParallel by DDPStrategy._setup_model
    if kwargs.get("find_unused_parameters", True) is False:
        raise ConfigError(
            "trainer.strategy sets find_unused_parameters=False, but each task trains only its own "
            "adapters (the others get no gradient); use `ddp` or `ddp_find_unused_parameters_true`"
        )
    if not kwargs.get("find_unused_parameters"):
        kwargs["find_unused_parameters"] = True
        rank_zero_info("DDP: find_unused_parameters=True (each task trains only its own adapters)")


def check_fsdp1_device(config: dict[str, Any]) -> None:
    """FSDP1 (``strategy: fsdp``) is GPU-only in Lightning; say what to use on CPU instead of its
    traceback."""
    strategy = config.get("strategy")
    name = strategy if isinstance(strategy, str) else type(strategy).__name__
    if not (name.startswith("fsdp") or name in ("FSDPStrategy", "AdapterFSDPStrategy")):
        return
    accelerator = config.get("accelerator")
    if accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available()):
        raise ConfigError(
            f"trainer.strategy {name} (FSDP1) needs a GPU; on CPU use FSDP2: --config "
            "configs/distributed/fsdp2_cpu.yaml (crma_lightning.backbone.sharding.AdapterShardedStrategy)"
        )


#: What gloo, NCCL and the TCP store say when another rank died, hung or cannot be reached.
_PEER_LOST = (
    "closed by peer",
    "reset by peer",
    "timed out",
    "timeout",
    "pair closure",
    "broken pipe",
    "connection refused",
    "communicator was aborted",
)


def peer_lost(e: BaseException) -> bool:
    """Whether ``e``, raised inside a distributed run, says another rank is gone or unreachable."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return isinstance(e, getattr(dist, "DistError", ())) or any(p in str(e).lower() for p in _PEER_LOST)


def stop_local_ranks(launcher: Any) -> None:
    """Kill the ranks this process launched (Lightning kills them only on Ctrl+C), so none is left
    waiting for the full timeout."""
    import signal

    for proc in getattr(launcher, "procs", None) or []:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)


def end_distributed_run(launcher: Any) -> None:
    """End a multi-process run on this rank: shut the process group down, wait for the ranks this
    process launched, and leave without interpreter finalization.

    Lightning destroys the group at exit only for NCCL (``lightning.fabric.utilities.distributed.
    _init_dist_connection``). A gloo group left alive keeps its worker threads into interpreter
    finalization; one still releasing the last collective's tensors there needs the GIL, is ended by
    ``pthread_exit`` inside a destructor and aborts the process (``terminate called without an
    active exception``, exit 134). Destroying the group first made that rare but not gone (CI saw it
    on 1 of 10 FSDP2 runs: objects still holding the group, such as the device mesh, keep it alive
    until finalization). Everything of the run is on disk by now (checkpoints and reports are written
    atomically, the loggers were finalized by the trainer), so after flushing the streams the rank
    leaves with ``os._exit`` and no C++ destructor runs. Rank 0 of a node first waits for the ranks
    it launched and fails if one did: Lightning does not look at their exit codes after success.
    Only on success: after a failure a peer may be stuck in a collective, and shutting down could
    wait for it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    dist.destroy_process_group()
    if world == 1:
        return
    code = 0
    for local_rank, proc in enumerate(getattr(launcher, "procs", None) or [], start=1):
        if (rc := proc.wait()) != 0:
            print(f"error: local rank {local_rank} exited with code {rc}", file=sys.stderr)
            code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
