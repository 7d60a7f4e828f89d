"""The LightningModule: a frozen causal LM plus per-task LoRAs and (MODULAR) the shared CRMA.

The conditions are :mod:`crma_lightning.methods.layouts`' (docs/method.md §2). The whole task
sequence is one ``fit``: tasks are consecutive blocks of ``data.epochs_per_task`` epochs; callbacks
use the module through ``crma_lightning.methods.protocol``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from crma_lightning.adapters.config import NO_DECAY, CRMAConfig, GroupLR, LoRAConfig
from crma_lightning.adapters.injection import CRMAInjection, inject_crma
from crma_lightning.adapters.lora import activate_lora, add_lora, lora_parameters
from crma_lightning.backbone.loading import BackboneConfig, load_backbone
from crma_lightning.backbone.output_head import batch_token_stats, head_problem, probe_matches
from crma_lightning.backbone.sharding import shard_for_strategy
from crma_lightning.core import losses
from crma_lightning.core.clock import TaskClock
from crma_lightning.core.errors import ConfigError, raise_problems
from crma_lightning.data.tasks import name_problems
from crma_lightning.methods.layouts import AdapterKind, AdapterLayout, Strategy, resolve_layout
from crma_lightning.methods.protocol import check_fit_setup
from crma_lightning.methods.regularizers import Regularizer, penalties
from crma_lightning.runs.checkpoint import AdapterOnlyCheckpoints
from crma_lightning.training.gradients import GradientSteps, NonFiniteError
from crma_lightning.training.holdout import HoldoutSteps, holdout_sums
from crma_lightning.training.optim import fused_adam
from crma_lightning.training.schedules import TaskSchedule, WarmupCosine, per_task_lambda, task_starts

__all__ = ["ContinualLM", "GroupLR", "NonFiniteError"]


class ContinualLM(HoldoutSteps, GradientSteps, AdapterOnlyCheckpoints, pl.LightningModule):
    """Continual fine-tuning of a causal LM under NAIVE, FROZEN or MODULAR (CRMA)."""

    def __init__(
        self,
        backbone: BackboneConfig,
        task_names: list[str],
        strategy: Strategy | None = None,
        layout: AdapterLayout | None = None,
        regularizers: list[Regularizer] | None = None,
        lora: LoRAConfig | None = None,
        crma: CRMAConfig | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr: GroupLR | None = None,
        lr_schedule: TaskSchedule | None = None,
        reset_optimizer_per_task: bool = True,
        schedule_per_task: bool = True,
        gradient_checkpointing: bool = False,
        fused_loss: bool = True,
        nonfinite: Literal["skip", "stop"] = "stop",
        seed: int = 0,
    ):
        """
        Args:
            backbone: the causal LM to fine-tune (frozen).
            task_names: the task sequence, in order (linked from ``data.tasks`` by the CLI).
            strategy: a layout by name: naive (one shared LoRA), frozen (fresh LoRA per task, frozen
                after it), modular (frozen + CRMA trained throughout; the paper's method), inc_lora
                (per-task LoRAs summed). Default modular.
            layout: the adapter layout by class (``crma_lightning.methods.layouts``), instead of ``strategy``.
            regularizers: terms added to the loss (``crma_lightning.methods.regularizers``: EWC, LwF,
                OrthogonalLoRA), each by class_path.
            lora: LoRA rank, alpha, dropout, target modules.
            crma: the CRMA adapter (used by 'modular' only).
            optimizer: optimizer class (class_path + init_args), called with the parameter groups.
                Adam and AdamW run torch's fused kernel unless ``foreach`` or ``fused`` is set
                (crma_lightning.training.optim.fused_adam).
            lr: learning rate per parameter group.
            lr_schedule: per-task schedule (restarts at every task); default warm-up + cosine.
            reset_optimizer_per_task: clear optimizer moments at every task start, as a fresh
                per-task optimizer would.
            schedule_per_task: restart ``lr_schedule`` at every task (else one schedule over the
                whole run: joint multi-task training).
            gradient_checkpointing: recompute activations in backward (saves memory).
            fused_loss: form the training loss from the final hidden states a chunk of positions at
                a time, never the (batch, length, vocabulary) logits
                (crma_lightning.backbone.output_head): the same loss, in less memory. Used where the
                output head is a plain frozen Linear and no regulariser reads the logits; otherwise,
                or when a probe at fit start finds the two losses differ, the logits path
                (summary.json says which).
            nonfinite: on a NaN/inf loss or gradient, 'skip' the step (counted and logged as
                train/nonfinite_skipped) or 'stop' with a message; the last checkpoint stays.
            seed: seeds per-step randomness (dropout) as a function of the step, for exact resume
                (linked from ``data.seed``).
        """
        super().__init__()
        self.backbone_config = backbone
        self.task_names = list(task_names)
        self.lora_config = lora or LoRAConfig()
        self.crma_config = crma or CRMAConfig()
        self.optimizer_factory = optimizer
        self.lr = lr or GroupLR()
        self.lr_schedule = lr_schedule or WarmupCosine()
        self.reset_optimizer_per_task = reset_optimizer_per_task
        self.schedule_per_task = schedule_per_task
        self.gradient_checkpointing = gradient_checkpointing
        self.fused_loss = fused_loss
        self._fused_head: nn.Linear | None = None  # set at fit start (on_fit_start)
        # adapter_parameters() per (kind, task), kept from fit start to fit end (the module tree no
        # longer changes then): walking the model for them costs several calls a step.
        self._adapter_cache: dict[tuple[str, str | None], list[nn.Parameter]] | None = None
        self.nonfinite = nonfinite
        self.nonfinite_skipped = 0
        self.seed = seed
        self.run_facts: dict[str, Any] = {}
        self.regularizers = list(regularizers or [])
        self._validate(strategy, layout)
        self.holdout_sums = holdout_sums(self.task_names)  # validate/test (crma_lightning.training.holdout)
        self.model: nn.Module | None = None
        self.crma: CRMAInjection | None = None
        # Checkpoints hold only the adapters (see on_save_checkpoint); the frozen base is reloaded.
        self.strict_loading = False
        self._task_starts: list[int] | None = None
        # FSDP2: parameters left whole on every rank (0-dim) and the mesh their grads average over.
        self._replicated: list[nn.Parameter] = []
        self._dp_mesh = None

    def _validate(self, strategy: str | None, layout: AdapterLayout | None) -> None:
        p = self.backbone_config.problems() + self.lora_config.problems("model.lora") + self.lr.problems()
        if self.nonfinite not in ("skip", "stop"):
            p.append(f"model.nonfinite must be 'skip' or 'stop' (got {self.nonfinite!r}).")
        try:
            self.layout = resolve_layout(strategy, layout)
            if self.layout.crma:
                p += self.crma_config.problems("model.crma")
        except ConfigError as e:
            p.append(str(e))
        p += name_problems(self.task_names)
        if hasattr(self, "layout"):
            p += [q for reg in self.regularizers for q in reg.problems(self)]
            names = [reg.name for reg in self.regularizers]
            p += [
                f"model.regularizers: {n} is listed twice" for n in sorted(set(names)) if names.count(n) > 1
            ]
        raise_problems(p, "model configuration")

    @property
    def strategy(self) -> str:
        """The layout's name: naive, frozen, modular, inc_lora (summary.json, checkpoints, serve)."""
        return self.layout.name

    # -- building ------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the backbone, add the LoRA(s) and (MODULAR) CRMA. Idempotent."""
        if self.model is not None:
            return
        strategy = self._trainer.strategy if self._trainer is not None else None
        self.check_strategy(strategy)
        model = load_backbone(self.backbone_config)
        for p in model.parameters():
            p.requires_grad_(False)
        for i, adapter in enumerate(self.layout.adapter_names(self.task_names)):
            # LoRA A is randomly initialised: seed it so every rank and every rerun agree.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 7_919 + i)
                add_lora(model, adapter, self.lora_config)
        if self.layout.crma:
            self.crma = inject_crma(model, self.crma_config)
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.model = model
        activate_lora(model, self.layout.active_for(self.task_names[0], self.task_names))
        # Every parameter that will ever train requires grad when the strategy wraps the model
        # (DDP builds its reducer then); the freezing policy narrows it per task. Adapters train
        # in float32 whatever the base dtype (a bf16 base keeps fp32 LoRAs and CRMA).
        for p in self.ever_trainable_parameters():
            p.data = p.data.float()
            p.requires_grad_(True)
        self._replicated, self._dp_mesh = shard_for_strategy(model, self.crma, strategy, self._device_mesh)

    def check_strategy(self, strategy: Any) -> None:
        """Refuse what this module cannot train under ``strategy``; train.py calls it before ranks launch."""
        if not (isinstance(strategy, FSDPStrategy | ModelParallelStrategy) or self._device_mesh is not None):
            return
        if self.backbone_config.quantize != "none":
            raise ConfigError(
                f"model.backbone.quantize: {self.backbone_config.quantize} does not work with FSDP: sharding "
                "would split the packed 4-bit weights from their quantisation state. Use one device or DDP "
                "(every rank holds the 4-bit base; a 7B NF4 base needs ~4.5 GB), or quantize: none."
            )
        if self.regularizers:
            raise ConfigError(
                "model.regularizers are not supported under FSDP sharding yet (EWC and LwF need the whole "
                "shared parameters outside the sharded forward); use DDP (trainer.strategy: ddp)"
            )

    def adapter_for(self, task: str) -> str:
        """The LoRA used for ``task``: its own, or the shared one under NAIVE."""
        return self.layout.adapter_for(task, self.task_names)

    def use_task(self, task: str) -> None:
        """Route the forward pass through ``task``'s LoRA(s) (trainability is not changed)."""
        activate_lora(self._model, self.layout.active_for(task, self.task_names))

    @property
    def _model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("the backbone is not built yet: call configure_model() first")
        return self.model

    # -- the adapter contract used by freezing, optimizer groups and checkpoints -------------
    def adapter_parameters(self, kind: AdapterKind, task: str | None = None) -> list[nn.Parameter]:
        """``lora``: the LoRA used for ``task`` (all LoRAs when ``task`` is None); ``crma``: all
        CRMA parameters (empty without CRMA)."""
        if self._adapter_cache is not None and (kind, task) in self._adapter_cache:
            return list(self._adapter_cache[kind, task])
        if kind == "crma":
            params = self.crma.parameters() if self.crma is not None else []
        else:
            names = self.layout.adapter_names(self.task_names) if task is None else [self.adapter_for(task)]
            params = [p for name in names for p in lora_parameters(self._model, name)]
        if self._adapter_cache is not None:
            self._adapter_cache[kind, task] = list(params)
        return params

    def trainable_parameters(self, task: str) -> list[nn.Parameter]:
        """What trains during ``task``: its LoRA, plus CRMA under MODULAR (the layout's table)."""
        return [p for kind in self.layout.trains for p in self.adapter_parameters(kind, task)]

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters that train in every task (the shared LoRA, CRMA): what EWC and LwF protect."""
        shared = self.adapter_parameters("lora") if self.layout.shared_lora else []
        return shared + self.adapter_parameters("crma")

    def current_task(self) -> str:
        return TaskClock.of(self.trainer).task(self.trainer.current_epoch)

    def ever_trainable_parameters(self) -> list[nn.Parameter]:
        return self.adapter_parameters("lora") + self.adapter_parameters("crma")

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {"lora": self.adapter_parameters("lora")}
        if self.crma is not None:
            groups.update(self.crma.param_groups())
        return groups

    # -- forward and loss ----------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self._model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    @property
    def fused_head(self) -> nn.Linear | None:
        """The output head when the loss is formed from the final hidden states (``fused_loss``,
        decided at fit start), else None."""
        return self._fused_head

    def token_stats(self, batch: dict[str, Tensor], accuracy: bool = True) -> losses.TokenStats:
        """Summed next-token loss, scored-token count and (unless ``accuracy=False``) correct
        predictions of a batch (through the fused head when there is one)."""
        return self._token_stats(batch, accuracy)[0]

    def _token_stats(
        self, batch: dict[str, Tensor], accuracy: bool
    ) -> tuple[losses.TokenStats, Tensor | None]:
        """:meth:`token_stats` and the logits, when this path formed them (None through the fused head)."""
        return batch_token_stats(
            lambda: self(batch["input_ids"], batch.get("attention_mask")),
            self._fused_head,
            batch["labels"],
            batch.get("example_weight"),
            accuracy,
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        # Training logs the loss only: no accuracy (an argmax over the vocabulary). A regulariser
        # that reads the logits gets them: with one, on_fit_start kept the logits path.
        stats, logits = self._token_stats(batch, accuracy=False)
        # Normalise by the global token count: DDP averages gradients over ranks, so
        # loss_sum * world / global_tokens gives exactly the single-process token mean. The same
        # all-reduce counts ranks with a non-finite loss, so every rank takes the same decision.
        bad = (~torch.isfinite(stats.loss_sum.detach())).float()
        tokens, bad = self.trainer.strategy.reduce(torch.stack([stats.tokens.detach(), bad]), reduce_op="sum")
        if bad > 0:
            # Lightning refuses a skipped (None) training_step under DDP/FSDP, so every rank keeps
            # its backward and gradient reduction in step with a zero-weighted loss, and
            # on_before_optimizer_step drops the (non-finite) gradients: the optimizer then leaves
            # every parameter untouched, as Lightning's own skip would.
            self._nonfinite("loss")
            self._skip_step = True
            return stats.loss_sum.nan_to_num(0.0, 0.0, 0.0) * 0.0
        loss = stats.loss_sum * self.trainer.world_size / tokens.clamp_min(1)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        penalty = penalties(self, batch, logits, tokens)
        accumulate, world = self.trainer.accumulate_grad_batches, self.trainer.world_size
        if accumulate == 1 and world == 1:
            return loss if penalty is None else loss + penalty
        # The step's gradient is the token mean over every rank's every micro-batch, not a mean of
        # micro-batch means: each returns its summed loss times world x accumulate, which DDP's
        # average and Lightning's accumulation divide out (exactly, for powers of two, so DDP and
        # one process accumulating agree bit for bit), and GradientSteps divides the step's
        # gradients by the window's tokens (``tokens`` is already the sum over ranks).
        self._window_tokens = tokens if self._window_tokens is None else self._window_tokens + tokens
        total = stats.loss_sum if penalty is None else stats.loss_sum + penalty * tokens / world
        return total * (world * accumulate)

    # -- task boundaries -----------------------------------------------------------------
    def task_steps(self) -> list[int]:
        """Optimizer steps of every task, from the DataModule's per-task batch counts."""
        dm = self.trainer.datamodule
        accumulate = self.trainer.accumulate_grad_batches
        return [
            math.ceil(dm.train_batches_per_epoch(k, self.trainer.world_size) / accumulate)
            * dm.epochs_per_task
            for k in range(dm.num_tasks)
        ]

    def task_start_step(self, task_index: int) -> int:
        if self._task_starts is None:
            self._task_starts = task_starts(self.task_steps())
        return self._task_starts[task_index]

    def on_fit_start(self) -> None:
        self._adapter_cache = {}
        vocab = self._model.get_input_embeddings().num_embeddings
        check_fit_setup(self.trainer, self.task_names, vocab)
        if not self.fused_loss:
            why = "model.fused_loss is false"
        elif isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            why = "sharded training (the head is called outside FSDP's forward otherwise)"
        else:
            why = head_problem(self._model)
        if why is None and (readers := [r.name for r in self.regularizers if r.reads_logits]):
            why = f"model.regularizers {readers} read the logits"
        if why is None and not probe_matches(self._model, vocab, self.device):
            why = "on a probe batch the model's logits are not its head applied to its last hidden states"
        self._fused_head = self._model.get_output_embeddings() if why is None else None
        self.run_facts["fused_loss"] = "on" if why is None else f"off: {why}"
        # from_pretrained returns the base in eval mode; training runs it in train mode (its dropout
        # on), as peft and the HF Trainer do, from the first step, resumed or not.
        self.train()

    def on_fit_end(self) -> None:
        self._adapter_cache = None

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        step = self.trainer.global_step
        # Checked per batch, not per epoch: Lightning skips on_train_epoch_start when it resumes
        # from a checkpoint taken on an epoch's last step. Before the task's first optimizer step
        # the state is cleared (repeating it for accumulated micro-batches is harmless).
        k = TaskClock.of(self.trainer).task_index(self.trainer.current_epoch)
        if k > 0 and step == self.task_start_step(k) and self.reset_optimizer_per_task:
            for opt in self.trainer.optimizers:
                opt.state.clear()
        # Dropout masks as a function of (seed, step, rank): identical after a resume.
        torch.manual_seed(self.seed * 1_000_003 + step * 7919 + self.global_rank)

    # -- optimization ----------------------------------------------------------------------
    def configure_optimizers(self):
        groups = [
            {"params": params, "lr": getattr(self.lr, name), "name": name}
            | ({"weight_decay": 0.0} if name in NO_DECAY else {})
            for name, params in self.param_groups().items()
            if params
        ]
        optimizer = fused_adam(self.optimizer_factory(groups))
        steps = self.task_steps() if self.schedule_per_task else [sum(self.task_steps())]
        schedule = LambdaLR(optimizer, per_task_lambda(self.lr_schedule, steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
