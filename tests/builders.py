"""A tiny continual fit built in-process (module, DataModule, Trainer) for the unit tests of
training, callbacks, routing and the output head."""

from __future__ import annotations

import lightning.pytorch as pl
from conftest import TINY_CONFIGS
from crma_lightning.callbacks.adapters import AdapterCheckpoint
from crma_lightning.callbacks.evaluation import ContinualEvaluation
from crma_lightning.callbacks.freezing import FreezingPolicy
from crma_lightning.callbacks.regularization import RegularizerHooks
from crma_lightning.callbacks.spectral import SpectralBoundLogger
from lightning.pytorch.callbacks import ModelCheckpoint

from crma_lightning.adapters.config import LoRAConfig
from crma_lightning.backbone.loading import BackboneConfig
from crma_lightning.data import ContinualDataModule, TaskSpec
from crma_lightning.training.module import ContinualLM, GroupLR

TASKS = ("a", "b", "c")


def build(
    strategy: str,
    tmp_path,
    *,
    lora_dropout=0.1,
    epochs_per_task=2,
    callbacks=(),
    evaluation=None,
    routing=None,
    fused_loss=True,
    regularizers=None,
    eval_tasks=(),
    logger=False,
    **trainer_kwargs,
):
    """A tiny continual fit; ``routing`` (a RoutingStatistics) runs before ``evaluation``, as
    train.py orders them; ``eval_tasks`` names synthetic tasks that are only evaluated."""
    backbone = BackboneConfig(config={**TINY_CONFIGS["llama"], "vocab_size": 80})
    module = ContinualLM(
        backbone,
        list(TASKS),
        strategy=strategy,
        lora=LoRAConfig(r=4, dropout=lora_dropout, target_modules="all-linear"),
        lr=GroupLR(lora=1e-2, crma_proj=3e-3, crma_mix=1e-2, crma_gate=1e-2),
        seed=0,
        fused_loss=fused_loss,
        regularizers=regularizers,
    )
    dm = ContinualDataModule(
        [TaskSpec(t) for t in TASKS],
        max_length=16,
        train_size=64,
        holdout_size=16,
        batch_size=16,
        eval_batch_size=16,
        epochs_per_task=epochs_per_task,
        synthetic_vocab=48,
        eval_tasks=[TaskSpec(t) for t in eval_tasks],
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=len(TASKS) * epochs_per_task,
        reload_dataloaders_every_n_epochs=1,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        default_root_dir=tmp_path,
        callbacks=[
            FreezingPolicy(),
            *([routing] if routing else []),
            evaluation or ContinualEvaluation(print_table=False),
            SpectralBoundLogger(),
            AdapterCheckpoint(),
            *([RegularizerHooks()] if regularizers else []),
            *callbacks,
        ],
        **trainer_kwargs,
    )
    return module, dm, trainer
