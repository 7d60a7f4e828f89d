"""The memory plan (crma_lightning/cli/plan.py) and the paper-size step on fake tensors (fake_step.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from jsonargparse import Namespace

from crma_lightning.cli.plan import (
    Counts,
    activation_bytes,
    build_meta,
    fewest_devices,
    layer_activation_bytes,
    lora_input_elements,
    loss_bytes,
    make_plan,
    nf4_bytes,
    parse,
    plan_config,
    shipped_config,
    strategy_kind,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))
SMOLLM2_LAYER = {
    "q_proj": 576,
    "k_proj": 576,
    "v_proj": 576,
    "o_proj": 576,
    "gate_proj": 576,
    "up_proj": 576,
    "down_proj": 1536,
}


# -- pure arithmetic, on literal values ------------------------------------------------------------
def test_layer_activation_bytes():
    # norms 2 * 4 * 4 = 32; q, k, v, out 2 * (8 + 4) = 24; MLP 2 * 3 * 8 = 48; LoRA inputs 2 * 4; CRMA 2 * 4
    assert layer_activation_bytes(hidden=4, kv_dim=2, intermediate=8, act=2, lora_inputs=4, crma=True) == 120
    assert layer_activation_bytes(hidden=4, kv_dim=2, intermediate=8, act=2, lora_inputs=0, crma=False) == 104


def test_lora_inputs_share_a_tensor_without_dropout():
    # q/k/v read one tensor, gate/up another; o and down their own.
    assert lora_input_elements(SMOLLM2_LAYER, dropout=False) == 576 + 576 + 576 + 1536
    # With dropout each keeps its own copy plus a 1-byte mask (a quarter of a float32 element).
    assert lora_input_elements(SMOLLM2_LAYER, dropout=True) == 6 * 720 + 1920
    assert lora_input_elements({"q_proj": 64, "v_proj": 64}, dropout=False) == 64


def test_loss_bytes():
    # fused: the hidden states' gradient 1024 x 8 x 4, one 512-row chunk of logits (4 B) and
    # log-softmax (2 x 4 B)
    assert loss_bytes(tokens=1024, vocab=100, hidden=8, head_bytes=4, fused=True) == 32768 + 512 * 100 * 12
    assert loss_bytes(tokens=1024, vocab=100, hidden=8, head_bytes=4, fused=False) == 1024 * 100 * 12
    assert loss_bytes(tokens=100, vocab=10, hidden=2, head_bytes=2, fused=True) == 800 + 100 * 10 * 10


def test_activation_bytes_with_and_without_checkpointing():
    # 3 layers, 10 tokens, 100 B per token per layer, hidden 4, residual 2 B, loss 50 B
    assert activation_bytes(3, 10, 100, 4, 2, 50, checkpointing=False) == 3000 + 160 + 1000
    assert activation_bytes(3, 10, 100, 4, 2, 50, checkpointing=True) == 240 + 1000 + 160 + 1000
    assert activation_bytes(3, 10, 100, 4, 2, 5000, checkpointing=True) == 240 + 1000 + 160 + 5000


def test_nf4_bytes():
    # 16384 weights: 8192 B of 4-bit codes, 256 8-bit block constants, one float32 for those 256
    assert nf4_bytes(64 * 256) == 8192 + 256 + 4


COUNTS = Counts(
    base=1000,
    base_bytes=2000,
    base_linear=800,
    loras={"a": 10, "b": 10},
    crma=5,
    trains={"LoRA a": 10, "CRMA": 5},
    largest_layer_bytes=300,
    nf4=False,
    head_bytes=2,
    lora_inputs=0,
    layers=2,
    hidden=4,
    kv_dim=2,
    intermediate=8,
    vocab=16,
)


def test_plan_replicates_under_ddp_and_shards_under_fsdp():
    shape = dict(batch=1, length=4, act=2, residual=2, checkpointing=False, fused=True)
    ddp = make_plan(COUNTS, "ddp", 4, **shape)
    assert (ddp.weights, ddp.adapters, ddp.optimizer, ddp.gathered) == (2000, 100, 120, 0)
    assert ddp.gradients == 15 * 4 + 25 * 4  # the task's gradients + DDP's buckets over every adapter
    fsdp = make_plan(COUNTS, "fsdp2", 4, **shape)
    assert (fsdp.weights, fsdp.adapters, fsdp.gradients, fsdp.optimizer) == (500, 25, 15, 30)
    assert fsdp.gathered == 600  # two decoder layers whole
    single = make_plan(COUNTS, "single", 1, **shape)
    assert single.gradients == 60 and single.peak() == single.static + single.activations[False]
    assert single.checkpoint_bytes == 25 * 4 + 15 * 8


def test_fewest_devices():
    assert fewest_devices(lambda n: 100 / n, "fsdp2", 30) == 4
    assert fewest_devices(lambda n: 100 / n, "fsdp1", 100) == 1
    assert fewest_devices(lambda n: 100 + 0 * n, "fsdp2", 30, limit=64) is None
    assert fewest_devices(lambda n: 10, "ddp", 30) == 1
    assert fewest_devices(lambda n: 100, "single", 30) is None


def test_strategy_kind():
    assert strategy_kind("auto", 1) == "single"
    assert strategy_kind("auto", 2) == "ddp"
    assert strategy_kind("ddp_find_unused_parameters_true", 16) == "ddp"
    assert (
        strategy_kind(Namespace(class_path="crma_lightning.backbone.sharding.AdapterShardedStrategy"), 16)
        == "fsdp2"
    )
    assert (
        strategy_kind(Namespace(class_path="crma_lightning.backbone.sharding.AdapterFSDPStrategy"), 8)
        == "fsdp1"
    )
    assert strategy_kind("fsdp", 8) == "fsdp1"


# -- the plan of real configs ---------------------------------------------------------------------
def test_shipped_configs_resolve():
    assert shipped_config("mistralai/Mistral-7B-v0.3").name == "mistralai--Mistral-7B-v0.3.json"
    assert (
        shipped_config("SmolLM2-135M-Instruct.Q4_1.gguf").name == "HuggingFaceTB--SmolLM2-135M-Instruct.json"
    )
    assert shipped_config("nobody/nothing") is None


def test_meta_counts_equal_the_real_module():
    """The meta model's groups are those configure_model builds for real (tiny config)."""
    from crma_lightning.adapters.lora import lora_parameters

    argv = ["--config", "configs/tiny.yaml"]
    _, meta_module = parse(argv)
    _, counts = build_meta(meta_module)
    _, real = parse(argv)
    real.configure_model()
    assert counts.base == sum(p.numel() for p in real.model.parameters()) - sum(
        p.numel() for p in real.ever_trainable_parameters()
    )
    assert counts.loras == {a: sum(p.numel() for p in lora_parameters(real.model, a)) for a in counts.loras}
    assert counts.crma == sum(p.numel() for p in real.crma.parameters())
    assert sum(counts.trains.values()) == sum(
        p.numel() for p in real.trainable_parameters(real.task_names[0])
    )


def _argv(config: str) -> list[str]:
    """A config alone if it names a model, else laid over configs/smollm2.yaml (overlays: methods,
    recipes...)."""
    import yaml

    backbone = (yaml.safe_load((REPO / config).read_text()).get("model") or {}).get("backbone") or {}
    complete = "name_or_path" in backbone or "config" in backbone
    return ["--config", config] if complete else ["--config", "configs/smollm2.yaml", "--config", config]


@pytest.mark.parametrize("config", CONFIGS)
def test_plan_runs_offline_for_every_config(config, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan, text = plan_config(_argv(config))
    assert plan.peak() > plan.weights > 0
    assert text.splitlines()[-1].startswith("advice: ")


def test_paper_qlora_plan():
    plan, text = plan_config(["--config", "configs/paper_mistral7b_qlora.yaml"], device_gib=24)
    c = plan.counts
    assert c.nf4 and c.layers == 32 and c.hidden == 4096 and c.kv_dim == 1024
    # r 16 on q, k, v, o: 32 layers x 16 x ((4096 + 4096) + (4096 + 1024) + (4096 + 1024) + (4096 + 4096))
    assert set(c.loras.values()) == {32 * 16 * (8192 + 5120 + 5120 + 8192)} == {13_631_488}
    assert c.crma == 32 * (4 * 4096 * 2 + 16 + 1)
    assert 3.5 < plan.weights / 2**30 < 4.2  # 6.98e9 weights in NF4 + 0.27e9 in bf16
    assert plan.checkpointing and plan.activations[True] < plan.activations[False] / 4
    assert "advice: fits on 1 x 24 GiB device" in text


def test_fsdp_plan_shards_the_paper_config():
    one, _ = plan_config(
        [
            "--config",
            "configs/distributed/fsdp2_multinode.yaml",
            "--trainer.devices",
            "1",
            "--trainer.num_nodes",
            "1",
        ]
    )
    many, text = plan_config(["--config", "configs/distributed/fsdp2_multinode.yaml"])
    assert (one.kind, many.kind, many.world) == ("fsdp2", "fsdp2", 16)
    assert many.weights == pytest.approx(one.weights / 16, abs=1)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/paper_mistral7b.yaml", "configs/paper_mistral7b_qlora.yaml"])
def test_paper_step_on_fake_tensors(config):
    """Mistral-7B: forward with CRMA on all 32 layers and the first task's LoRA, the loss, backward
    (checkpointed), one AdamW step. The QLoRA config's base linears are plain bf16 Linear here
    (bitsandbytes cannot quantise fake tensors): its NF4 kernels are not exercised."""
    from crma_lightning.cli.fake_step import fake_step

    step = fake_step(["--config", config])
    assert (step.layers, step.crma_blocks, step.lora_layers) == (32, 32, 32 * 4)  # q, k, v, o per layer
    assert step.trained == {
        "lora": 13_631_488,
        "crma_proj": 32 * 2 * 4 * 4096,
        "crma_mix": 32 * 16,
        "crma_gate": 32,
    }
    assert step.frozen_with_grad == 0 and step.loss_shape == () and step.fused_loss
    assert step.nf4_as_dense == config.endswith("qlora.yaml")


def test_plan_command_prints_and_writes_json(tmp_path, capsys):
    import json

    from crma_lightning.cli.plan import main

    out = tmp_path / "plan.json"
    plan = main(["--config", "configs/tiny.yaml", "--device_gib", "8", "--json", str(out)])
    printed = capsys.readouterr().out
    assert (
        printed.startswith("memory plan: random-init llama, modular")
        and "advice: fits on 1 x 8 GiB" in printed
    )
    assert json.loads(out.read_text())["peak"] == plan.peak()


def test_plan_help_is_its_own(capsys):
    from crma_lightning.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: train.py plan --config FILE") and "--device_gib N" in out
