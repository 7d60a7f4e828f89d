"""Sharded training: FSDP2 (``fully_shard``) per decoder layer, FSDP1 wrap units, adapter-only
distributed checkpoints, and gathering sharded tensors.

Under FSDP2 parameters are sharded ``DTensor``s between forward passes; anything that reads a whole
adapter tensor goes through :func:`crma_lightning.core.dist.full_tensor`, a collective every rank calls.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from crma_lightning.adapters.crma import CRMABlock
from crma_lightning.adapters.injection import CRMAInjection, find_decoder_layers
from crma_lightning.adapters.lora import tuner_layers
from crma_lightning.core.atomic import swap_in
from crma_lightning.core.dist import full_tensor
from crma_lightning.core.errors import ConfigError

#: Attribute set on modules that :func:`fsdp1_policy` wraps as their own FSDP1 unit.
FSDP_UNIT = "_crma_fsdp_unit"


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def shard_for_strategy(
    model: nn.Module, crma: CRMAInjection | None, strategy: Any, mesh: Any
) -> tuple[list[nn.Parameter], Any]:
    """Prepare ``model`` for the trainer's strategy: FSDP2 under ModelParallelStrategy (``mesh`` is
    set), FSDP1 wrap units under ``strategy: fsdp``, nothing otherwise.

    Returns the parameters FSDP2 leaves whole on every rank and the data-parallel mesh their
    gradients average over (``[]``, None without FSDP2). Sharded parameters exist whole only inside
    their layer's forward, so the batched projection (all layers' logits stacked before the model's
    forward) is replaced by one projection per layer inside the layer's own forward.
    """
    fsdp1 = isinstance(strategy, FSDPStrategy)
    if mesh is None and not fsdp1:
        return [], None
    if crma is not None:
        crma.set_batched_projection(False)
    if mesh is not None:
        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ConfigError("tensor parallelism is not supported: set tensor_parallel_size: 1 (FSDP2 only)")
        dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
        return fully_shard_model(model, dp_mesh), dp_mesh
    adapters = [m for m in model.modules() if isinstance(m, CRMABlock)] + lora_modules(model)
    mark_fsdp1_units(model, adapters)
    # A plain `strategy: fsdp` gets the same units as AdapterFSDPStrategy (it wraps after
    # configure_model); settings given explicitly win.
    strategy.kwargs.setdefault("auto_wrap_policy", fsdp1_policy)
    strategy.kwargs.setdefault("use_orig_params", True)
    return [], None


def fully_shard_model(model: nn.Module, mesh: Any) -> list[nn.Parameter]:
    """FSDP2: shard every decoder layer, then the root.

    ``fully_shard`` refuses 0-dim parameters (CRMA's gate), so those stay whole on every rank and
    are returned: their gradients must be averaged across ``mesh`` by the caller
    (:func:`average_replicated_grads`), as FSDP does for the sharded ones.
    """
    from torch.distributed.fsdp import fully_shard

    replicated = [p for p in model.parameters() if p.dim() == 0]
    _, layers = find_decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=set(replicated))
    fully_shard(model, mesh=mesh, ignored_params=set(replicated))
    return replicated


def average_replicated_grads(params: list[nn.Parameter], mesh: Any) -> None:
    """Average the gradients of parameters FSDP does not manage over the data-parallel ranks (one
    all-reduce; every rank holds the same set of gradients, since all ranks train the same task)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or mesh.size() == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, group=mesh.get_group())  # SUM: gloo has no AVG
    flat /= mesh.size()
    for g, v in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(v.view_as(g))


def lora_modules(model: nn.Module) -> list[nn.Module]:
    """Every LoRA leaf module (e.g. each task's ``lora_A``/``lora_B`` Linear), via peft's declared
    ``adapter_layer_names``; parameter containers (embedding LoRAs) are not modules and are skipped."""
    out = []
    for _, layer in tuner_layers(model):
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr)
            out += [m for m in container.values() if isinstance(m, nn.Module)]
    return out


def mark_fsdp1_units(model: nn.Module, adapters: list[nn.Module]) -> None:
    """Tag the decoder layers and the adapter modules that :func:`fsdp1_policy` wraps."""
    _, layers = find_decoder_layers(model)
    for module in [*layers, *adapters]:
        setattr(module, FSDP_UNIT, True)


def fsdp1_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP1 ``auto_wrap_policy``: wrap the modules tagged by :func:`mark_fsdp1_units`."""
    return True if recurse else getattr(module, FSDP_UNIT, False)


class AdapterFSDPStrategy(FSDPStrategy):
    """FSDP1 (``strategy: fsdp``, GPU only) set up for adapters on a frozen base: wrap units from
    :func:`fsdp1_policy` (decoder layers, and each adapter module on its own) and
    ``use_orig_params`` (the freezing policy flips ``requires_grad`` per parameter after wrapping).
    Checkpoints: ``state_dict_type: full`` gathers on rank 0 and keeps only the adapters
    (``ContinualLM.on_save_checkpoint``), so the file is megabytes; the gather itself still visits
    the whole model once per checkpoint.
    """

    def __init__(
        self,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "full",
        use_orig_params: bool = True,
        limit_all_gathers: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        """
        Args:
            sharding_strategy: FSDP1 sharding strategy (HYBRID_SHARD: shard within a node,
                replicate across nodes).
            state_dict_type: 'full' (one adapter-only file, rank 0) or 'sharded' (not resumable:
                the stock loader asks for every base weight).
            use_orig_params: keep the original parameters visible (needed for per-task freezing).
            limit_all_gathers: rate-limit all-gathers (FSDP1 option; lowers peak memory).
            process_group_backend: default nccl on GPU.
            timeout: collective timeout.
        """
        super().__init__(
            auto_wrap_policy=fsdp1_policy,
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            process_group_backend=process_group_backend,
            timeout=timeout,
            use_orig_params=use_orig_params,
            limit_all_gathers=limit_all_gathers,
        )


class AdapterShardedStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2) whose checkpoints hold only the adapter tensors.

    Saving writes each rank's adapter shards with DCP (``save_distributed_checkpoint=True``, the
    default) or gathers them into one file on rank 0. Loading a sharded checkpoint reads exactly
    the adapter tensors and optimizer states it holds; the frozen base stays as configure_model
    built it. Optimizer states of parameters that had none when saving start from zero moments
    (AdamW then takes the same first step as from an empty state).
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        """
        Args:
            data_parallel_size: FSDP2 shards over this many ranks; 'auto' means all of them
                (num_nodes x devices).
            tensor_parallel_size: must be 1 (tensor parallelism is not supported).
            save_distributed_checkpoint: each rank writes its adapter shards (a DCP folder); False
                gathers them into one file written by rank 0.
            process_group_backend: 'gloo' (CPU) or 'nccl' (GPU); default from the device.
            timeout: collective timeout.
        """
        super().__init__(
            data_parallel_size,
            tensor_parallel_size,
            save_distributed_checkpoint,
            process_group_backend,
            timeout,
        )

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes // int(self._tensor_parallel_size)
        super().setup_environment()

    def _adapter_state(self) -> dict[str, Tensor]:
        names = self.lightning_module.adapter_state_names()
        return {k: v for k, v in self.model.state_dict().items() if k in names}

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any | None = None
    ) -> None:
        """A sharded checkpoint is written under a temporary sibling name and swapped in by rank 0
        once every rank's shards and the metadata are complete, so a kill during any save leaves the
        previous checkpoint loadable (and the first save, none at all)."""
        path = Path(self.broadcast(str(filepath)))
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, path, storage_options)
        partial = path.with_name(f".{path.name}.partial")
        if self.global_rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        self.barrier("crma_sharded_save_start")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("crma_sharded_save_written")  # every rank's shards and meta.pt are on disk
        if self.global_rank == 0:
            swap_in(partial, path)
        self.barrier("crma_sharded_save_swapped")

    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = self._adapter_state()
        if self._save_distributed_checkpoint:
            return state
        full = {k: full_tensor(v).cpu() for k, v in state.items()}  # on every rank: a collective
        return full if self.global_rank == 0 else {}

    def load_checkpoint(
        self, checkpoint_path: str | Path, weights_only: bool | None = None
    ) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import DefaultLoadPlanner
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        state = self._adapter_state()
        dcp.load({"state_dict": state}, checkpoint_id=path)
        self.model.load_state_dict(state, strict=False)
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            opt_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(opt_state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=opt_state[key])
        metadata = torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
        metadata["state_dict"] = state  # what ContinualLM.on_load_checkpoint checks
        return metadata

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # loaded in load_checkpoint
