"""The training framework in-process with a real Trainer: freezing invariants, schedule, resume."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from builders import TASKS, build
from crma_lightning.callbacks.evaluation import ContinualEvaluation
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from crma_lightning.backbone.loading import BackboneConfig
from crma_lightning.core.errors import ConfigError
from crma_lightning.training.module import ContinualLM, GroupLR
from crma_lightning.training.schedules import WarmupCosine, per_task_lambda


class Snapshots(Callback):
    """Records parameters at every epoch start (before any step of that epoch)."""

    def __init__(self):
        self.at_epoch: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.at_epoch[trainer.current_epoch] = {
            n: p.detach().clone() for n, p in pl_module.named_parameters()
        }

    def on_train_end(self, trainer, pl_module):
        self.final = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


class LoRASchedule(Callback):
    """Records before every optimizer step: the global step, the LoRA group's learning rate and the
    largest Adam step count among its parameters."""

    def __init__(self):
        self.seen: list[tuple[int, float, int]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        opt = trainer.optimizers[0]
        lora = next(g for g in opt.param_groups if g["name"] == "lora")
        steps = [
            opt.state[p]["step"].item() for p in lora["params"] if p in opt.state and "step" in opt.state[p]
        ]
        self.seen.append((trainer.global_step, lora["lr"], max(steps, default=0)))


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """``whole_run(strategy)``: one uninterrupted fit of ``build(strategy)`` per strategy and module,
    as ``(module, trainer, snapshots, schedule)``. Its two callbacks only read (parameters at every
    epoch start and the end, the LoRA group's lr and Adam steps), so the fit is the plain one: the
    freezing invariants, the schedule test and the resume tests' uninterrupted reference share it."""
    runs = {}

    def get(strategy: str):
        if strategy not in runs:
            snaps, schedule = Snapshots(), LoRASchedule()
            module, dm, trainer = build(
                strategy, tmp_path_factory.mktemp(f"whole_{strategy}"), callbacks=[snaps, schedule]
            )
            trainer.fit(module, dm)
            runs[strategy] = module, trainer, snaps, schedule
        return runs[strategy]

    return get


def _lora_names(module, task):
    ids = {id(p) for p in module.adapter_parameters("lora", task)}
    return [n for n, p in module.named_parameters() if id(p) in ids]


@pytest.mark.parametrize("strategy", ["naive", "frozen", "modular"])
def test_freezing_invariants_over_a_whole_run(strategy, whole_run):
    module, _, snaps, _ = whole_run(strategy)
    first = snaps.at_epoch[0]
    ever = {id(p) for p in module.ever_trainable_parameters()}
    base = [n for n, p in module.named_parameters() if id(p) not in ever]
    assert base and all(torch.equal(first[n], snaps.final[n]) for n in base), "base weights changed"

    if strategy == "naive":
        shared = _lora_names(module, "a")
        assert all(shared == _lora_names(module, t) for t in TASKS)
        assert not torch.equal(snaps.at_epoch[2][shared[-1]], snaps.final[shared[-1]])  # keeps training
        return
    for k, task in enumerate(TASKS):
        names = _lora_names(module, task)
        end_of_task = snaps.at_epoch.get(2 * (k + 1), snaps.final)  # before the next task's first step
        assert any(not torch.equal(first[n], end_of_task[n]) for n in names), f"LoRA_{task} never trained"
        for n in names:  # bit-identical through every later task
            assert torch.equal(end_of_task[n], snaps.final[n]), f"LoRA_{task} changed after its task: {n}"
        # and untouched before its task started
        for n in names:
            assert torch.equal(first[n], snaps.at_epoch[2 * k][n])
    crma = [
        n for n, p in module.named_parameters() if id(p) in {id(q) for q in module.adapter_parameters("crma")}
    ]
    if strategy == "modular":
        assert crma and any(
            not torch.equal(snaps.at_epoch[4][n], snaps.final[n]) for n in crma
        )  # trains in task 3
    else:
        assert not crma


def test_each_task_restarts_the_schedule_and_the_optimizer_state(whole_run):
    seen = whole_run("frozen")[3].seen
    per_task = 8  # 64 examples / 16 per batch * 2 epochs
    lrs = [lr for _, lr, _ in seen]
    assert lrs[:per_task] == lrs[per_task : 2 * per_task] == lrs[2 * per_task :]
    assert lrs[per_task - 1] < lrs[0] == max(lrs)  # decays within each task (8 steps: no warm-up step)
    expected = per_task_lambda(WarmupCosine(), [per_task] * 3)
    assert lrs[per_task + 1] == pytest.approx(1e-2 * expected(per_task + 1))
    # Adam's step count restarts with every task: no moments carried across a boundary.
    assert [s for step, _, s in seen if step % per_task == 0] == [0, 0, 0]


@pytest.mark.parametrize("stop_at,every", [(13, 5), (16, 8)], ids=["mid-task", "task-boundary"])
def test_resume_reproduces_an_uninterrupted_run(stop_at, every, whole_run, tmp_path):
    module, trainer, _, _ = whole_run("modular")
    full = trainer.callbacks[1]
    assert isinstance(full, ContinualEvaluation)
    final_full = {n: p.detach().clone() for n, p in module.named_parameters()}

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=every)
    module, dm, trainer = build("modular", tmp_path / "cut", callbacks=[ckpt], max_steps=stop_at)
    trainer.fit(module, dm)
    assert trainer.global_step == stop_at
    last = tmp_path / "ckpt" / "last.ckpt"
    saved_step = torch.load(last, weights_only=True)["global_step"]
    assert saved_step == stop_at - stop_at % every

    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt2", save_last=True, save_top_k=0, every_n_train_steps=every
    )
    module2, dm2, trainer2 = build("modular", tmp_path / "resumed", callbacks=[ckpt])
    trainer2.fit(module2, dm2, ckpt_path=str(last))
    resumed = trainer2.callbacks[1]
    assert list(resumed.loss_rows) == ["base", *TASKS]
    assert resumed.loss_rows == full.loss_rows
    assert resumed.acc_rows == full.acc_rows
    for n, p in module2.named_parameters():
        assert torch.equal(p, final_full[n]), n


def test_module_validation_lists_every_problem():
    with pytest.raises(ConfigError) as e:
        ContinualLM(
            BackboneConfig(),
            ["a", "a", "shared"],
            strategy="sequential",  # type: ignore[arg-type]
            lr=GroupLR(lora=-1.0),
        )
    msg = str(e.value)
    for needle in ("model.backbone", "model.strategy", "used twice", "'shared' is reserved", "model.lr.lora"):
        assert needle in msg, needle


def test_fit_without_the_required_callbacks_fails_clearly(tmp_path):
    module, dm, _ = build("frozen", tmp_path)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        reload_dataloaders_every_n_epochs=1,
        enable_progress_bar=False,
    )
    with pytest.raises(
        ConfigError,
        match=r"lacks the callbacks the method needs: freezing .*evaluation .*method_callbacks\(\)",
    ):
        trainer.fit(module, dm)


def test_no_weight_decay_on_mixing_logits_and_gate(tmp_path):
    """Decay would pull M toward J/n and the gate toward 1: those groups get none; the others the
    optimizer's own, and a step with zero gradients moves only the decayed parameters."""
    module, dm, trainer = build("modular", tmp_path)
    module.configure_model()
    module.trainer = trainer
    trainer.datamodule = dm
    dm.setup()
    optimizer = module.configure_optimizers()["optimizer"]
    decay = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decay == {"lora": 0.01, "crma_proj": 0.01, "crma_mix": 0.0, "crma_gate": 0.0}
    before = {g["name"]: [p.detach().clone() for p in g["params"]] for g in optimizer.param_groups}
    for g in optimizer.param_groups:
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for g in optimizer.param_groups:
        moved = any(not torch.equal(a, p) for a, p in zip(before[g["name"]], g["params"], strict=True))
        assert moved == (g["name"] in ("lora", "crma_proj")), g["name"]
