"""ZClip (callbacks/zclip.py): the z-score maths on hand-computed sequences, the statistics kept
through a resume, skipped steps left out, the conflict with a fixed clip; slow: a SIGKILL/resume
run and two DDP ranks against one process, both with clipping forced to happen."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from crma_lightning.callbacks.zclip import (
    ZClip,
    clip_coefficient,
    ema_update,
    warmup_statistics,
    zscore_threshold,
)
from faults import NaNAt
from lightning.pytorch.callbacks import Callback

from crma_lightning.core.errors import ConfigError

T = torch.float64


def t(x) -> torch.Tensor:
    return torch.tensor(float(x), dtype=T)


def test_warmup_statistics_are_the_population_mean_and_variance():
    mean, var = warmup_statistics(torch.tensor([1.0, 2.0, 3.0], dtype=T))
    assert (mean.item(), var.item()) == (2.0, pytest.approx(2 / 3, abs=1e-15))


def test_a_spike_is_clipped_to_the_adaptive_threshold_by_hand():
    # After warm-up on 1, 2, 3: μ = 2, v = 2/3. A norm of 10 has z = 8 / sqrt(2/3) ≈ 9.80 > 2, so
    # g* = μ + z_thresh² σ / z = 2 + 4 · (2/3) / 8 = 7/3; then μ = (2 + 7/3) / 2 = 13/6 and
    # v = (2/3 + (7/3 − 13/6)²) / 2 = 25/72 (α = 0.5, ε = 0).
    norm, mean, var = t(10), t(2), t(Fraction(2, 3))
    target, clipped, z = zscore_threshold(norm, mean, var, 2.0, 0.0, "adaptive_scaling")
    assert clipped.item() and z.item() == pytest.approx(8 / (2 / 3) ** 0.5, rel=1e-14)
    assert target.item() == pytest.approx(7 / 3, rel=1e-14)
    assert clip_coefficient(norm, target).item() == pytest.approx((7 / 3) / (10 + 1e-6), rel=1e-14)
    mean, var = ema_update(mean, var, target, 0.5)
    assert (mean.item(), var.item()) == (pytest.approx(13 / 6, rel=1e-14), pytest.approx(25 / 72, rel=1e-14))
    # A quiet step (2 < μ) is not clipped and enters the statistics as it is:
    # μ = (13/6 + 2) / 2 = 25/12, v = (25/72 + (2 − 25/12)²) / 2 = 51/288.
    target, clipped, _ = zscore_threshold(t(2), mean, var, 2.0, 0.0, "adaptive_scaling")
    assert not clipped.item() and target.item() == 2.0 and clip_coefficient(t(2), target).item() == 1.0
    mean, var = ema_update(mean, var, target, 0.5)
    assert (mean.item(), var.item()) == (
        pytest.approx(25 / 12, rel=1e-14),
        pytest.approx(51 / 288, rel=1e-14),
    )
    # 'mean' clips a spike to μ itself.
    target, clipped, _ = zscore_threshold(t(10), t(2), t(Fraction(2, 3)), 2.0, 0.0, "mean")
    assert clipped.item() and target.item() == 2.0


def test_the_callback_warms_up_unclipped_then_clips_and_counts():
    z = ZClip(enabled=True, alpha=0.5, z_thresh=2.0, warmup_steps=3, eps=0.0)
    assert [z.step(t(x)) for x in (1, 2, 3)] == [None, None, None]  # warm-up: nothing is clipped
    assert (z.mean.item(), z.var.item()) == (2.0, pytest.approx(2 / 3, abs=1e-15))
    assert z.step(t(10)).item() == pytest.approx(7 / 3, rel=1e-14)
    assert z.step(t(2)).item() == 2.0
    assert int(z.clip_events) == 1
    assert (z.mean.item(), z.var.item()) == (
        pytest.approx(25 / 12, rel=1e-14),
        pytest.approx(51 / 288, rel=1e-14),
    )


def test_max_grad_norm_caps_every_step_warm_up_included():
    z = ZClip(enabled=True, warmup_steps=2, max_grad_norm=1.5)
    assert z.step(t(3)).item() == 1.5  # warm-up, above the cap
    assert z.step(t(1)).item() == 1.0  # warm-up, below it: unchanged


def test_state_survives_a_round_trip_exactly_and_continues_identically():
    seq = [1.3, 0.7, 2.2, 0.9, 9.0, 1.1, 1.0, 15.0, 0.8]
    full = ZClip(enabled=True, warmup_steps=3)
    out_full = [full.step(t(x)) for x in seq]
    for cut in (2, 5):  # inside the warm-up and after it
        a = ZClip(enabled=True, warmup_steps=3)
        head = [a.step(t(x)) for x in seq[:cut]]
        b = ZClip(enabled=True, warmup_steps=3)
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # plain floats: any checkpoint format
        tail = [b.step(t(x)) for x in seq[cut:]]
        for x, y in zip(head + tail, out_full, strict=True):
            assert (x is None and y is None) or torch.equal(x, y)
        assert b.state_dict() == full.state_dict()
    assert full.state_dict()["clip_events"] == 2


def test_bad_options_are_reported_together():
    with pytest.raises(ConfigError) as e:
        ZClip(alpha=1.5, z_thresh=0, warmup_steps=0)
    assert (
        "zclip.alpha" in str(e.value)
        and "zclip.z_thresh" in str(e.value)
        and "zclip.warmup_steps" in str(e.value)
    )


def _fit(tmp_path, *callbacks, **trainer_kwargs):
    from builders import build

    module, dm, trainer = build("modular", tmp_path, epochs_per_task=1, callbacks=callbacks, **trainer_kwargs)
    module.nonfinite = "skip"
    trainer.fit(module, dm)
    return module, trainer


def test_a_fixed_clip_and_zclip_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="zclip.enabled replaces trainer.gradient_clip_val"):
        _fit(tmp_path, ZClip(enabled=True), gradient_clip_val=1.0)


class Norms(Callback):
    """Listed after ZClip: records the pre-clip total norm and the norm of the gradients as ZClip
    left them for the optimizer."""

    def __init__(self):
        self.pre, self.post = {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        norms = pl_module.gradient_norms()
        if norms is not None:
            self.pre[trainer.global_step] = norms.total.item()
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.post[trainer.global_step] = torch.nn.utils.get_total_norm(grads).item()


def test_in_training_spikes_are_clipped_and_a_skipped_step_leaves_the_statistics_alone(tmp_path):
    # z_thresh 0.5 makes clipping frequent; step 5's gradient is made non-finite and skipped.
    zclip, norms = ZClip(enabled=True, warmup_steps=3, z_thresh=0.5), Norms()
    module, _ = _fit(tmp_path, zclip, norms, NaNAt(5, "grad"))
    assert module.nonfinite_skipped == 1
    assert 5 not in norms.pre  # no norm for the skipped step...
    steps = sorted(norms.pre)
    replay = ZClip(enabled=True, warmup_steps=3, z_thresh=0.5)  # ...so replaying the others gives the state
    clipped = 0
    for s in steps:
        target = replay.step(torch.tensor(norms.pre[s], dtype=T))
        expected = norms.pre[s] if target is None else min(norms.pre[s], target.item())
        assert norms.post[s] == pytest.approx(expected, rel=1e-5), (
            s
        )  # the optimizer saw the clipped gradients
        clipped += int(target is not None and target.item() < norms.pre[s])
    assert clipped >= 2 and int(zclip.clip_events) == clipped
    assert zclip.state_dict() == replay.state_dict()  # the same float64 maths on the same norms


# -- slow: resume and DDP, through train.py ---------------------------------------------------------
#: Clipping forced to happen often on the tiny config (z_thresh 0.5, 5 warm-up steps).
ZCLIP = ["--config", "configs/recipe/zclip.yaml", "--zclip.warmup_steps", "5", "--zclip.z_thresh", "0.5"]


def zclip_state(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return next(v for k, v in ckpt["callbacks"].items() if k.startswith("ZClip"))


@pytest.mark.e2e
@pytest.mark.slow
def test_sigkill_then_resume_with_zclip_matches_uninterrupted(tmp_path):
    import numpy as np
    from kills import KILLS, artefacts, callbacks_with, train

    full = train(tmp_path / "full", *ZCLIP)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = train(tmp_path / "cut", *ZCLIP, *callbacks_with(KILLS["mid-task"]))
    assert killed.returncode != 0
    resumed = train(
        tmp_path / "cut",
        *ZCLIP,
        *callbacks_with('{"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}'),
        "--ckpt_path",
        "last",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a_dir, b_dir = tmp_path / "full" / "tiny" / "version_0", tmp_path / "cut" / "tiny" / "version_0"
    a, b = artefacts(a_dir), artefacts(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-6, rtol=0, err_msg=k)
    state = zclip_state(a_dir)  # last.ckpt of both runs is at step 40 of 48
    assert state["clip_events"] > 0
    assert zclip_state(b_dir) == state  # the statistics resumed bit-exactly
    clipped = [json.loads((d / "continual" / "grad_norm.json").read_text()) for d in (a_dir, b_dir)]
    assert [s["clipped"] for s in clipped[0].values()] == [s["clipped"] for s in clipped[1].values()]
    assert (
        clipped[0]["alpha"]["clipped"] > 0 and clipped[0]["gamma"]["clipped"] > 0
    )  # before and after the kill


@pytest.mark.slow
def test_ddp_two_ranks_with_zclip_match_one_process(tmp_path, tmp_path_factory):
    from distributed_helpers import MICRO_8X2, SMALL, assert_matches_single, assert_ranks_agree, fit

    base = ["--config", "configs/tiny.yaml", *SMALL, *ZCLIP]
    single = fit(tmp_path / "one", *base, *MICRO_8X2)
    ddp = fit(
        tmp_path / "ddp",
        *base,
        "--trainer.strategy",
        "ddp_find_unused_parameters_true",
        "--trainer.devices",
        "2",
        "--data.batch_size",
        "8",
    )
    assert_matches_single(ddp, single)
    assert_ranks_agree(ddp, world_size=2)
    one, two = zclip_state(single), zclip_state(ddp)
    assert one["clip_events"] > 0 and one["clip_events"] == two["clip_events"]
    assert (two["mean"], two["var"]) == (one["mean"], one["var"])  # the same gradients: bit-identical norms


@pytest.mark.slow
def test_fsdp2_two_processes_with_zclip_match_one_process(tmp_path):
    # FSDP2's gradients are DTensor shards (and CRMA's gate a whole 0-dim tensor): the norm ZClip
    # uses is still the global one and the clip scales every shard alike.
    from distributed_helpers import MICRO_8X2, SMALL, UNFUSED, assert_matches_single, fit

    single = fit(tmp_path / "one", "--config", "configs/tiny.yaml", *SMALL, *ZCLIP, *MICRO_8X2, *UNFUSED)
    fsdp2 = fit(tmp_path / "fsdp2", "--config", "configs/distributed/fsdp2_cpu.yaml", *SMALL, *ZCLIP)
    assert_matches_single(fsdp2, single, adapter_atol=1e-5)  # measured 1.3e-6: sharded norms
    stats = [json.loads((d / "continual" / "grad_norm.json").read_text()) for d in (single, fsdp2)]
    assert sum(s["clipped"] for s in stats[0].values()) > 0
    assert [s["clipped"] for s in stats[0].values()] == [s["clipped"] for s in stats[1].values()]
    for a, b in zip(stats[0].values(), stats[1].values(), strict=True):
        for group in ("lora", "crma"):
            assert b[group]["max"] == pytest.approx(a[group]["max"], rel=1e-6)  # measured 2e-7
