"""One training step of any config on fake tensors: shapes, injection and parameter groups at full size.

Under torch's ``FakeTensorMode`` (shapes, dtypes, no storage) the configured model
(:func:`crma_lightning.cli.plan.build_adapted`) runs the first task's forward, loss, backward and
one AdamW step as ``training_step`` does, so the paper's Mistral-7B step runs on a laptop in
seconds (docs/distributed.md). Not exercised: a 4-bit base (its linear layers stay plain
``nn.Linear`` in the compute dtype) and CRMA's PiSSA initialisation, which need real weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode


@dataclass
class FakeStep:
    """What one fake step touched."""

    layers: int
    crma_blocks: int
    lora_layers: int
    trained: dict[str, int]
    """Parameter group -> parameters that received a gradient and were stepped."""
    frozen_with_grad: int
    loss_shape: tuple[int, ...]
    fused_loss: bool
    nf4_as_dense: bool


def fake_step(argv: list[str]) -> FakeStep:
    """One training step of the config ``argv`` (fit's arguments) on fake tensors."""
    from crma_lightning.adapters.config import NO_DECAY
    from crma_lightning.adapters.injection import find_decoder_layers
    from crma_lightning.adapters.lora import activate_lora, tuner_layers
    from crma_lightning.backbone.output_head import batch_token_stats, head_problem
    from crma_lightning.cli.plan import act_bytes, build_adapted, parse

    config, module = parse(argv)
    batch, length = config["data"]["batch_size"], config["data"]["max_length"]
    model, crma, _ = build_adapted(module, torch.device("meta"))
    # Whether the fused loss applies is read off the meta model (a fake parameter is not an nn.Parameter).
    fused = module.fused_loss and head_problem(model) is None
    mode = FakeTensorMode()
    with mode:
        _fake_cpu(model)
    task = module.task_names[0]
    with mode:
        activate_lora(model, module.layout.active_for(task, module.task_names))
        for p in model.parameters():
            p.requires_grad_(False)
        for p in module.ever_trainable_parameters():
            p.data = p.data.float()
        trainable = module.trainable_parameters(task)
        for p in trainable:
            p.requires_grad_(True)
        if module.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.train()
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (batch, length))
        head = model.get_output_embeddings() if fused else None
        autocast = act_bytes(config["trainer"].get("precision"), 4) == 2
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            # No attention mask: transformers' mask helpers inspect its values, which fake tensors lack.
            stats, _ = batch_token_stats(
                lambda: model(input_ids=ids, use_cache=False).logits, head, ids, None, accuracy=False
            )
        loss = stats.loss_sum / stats.tokens.clamp_min(1)
        loss.backward()
        groups = [
            {"params": [p for p in params if p.requires_grad], "lr": getattr(module.lr, name), "name": name}
            | ({"weight_decay": 0.0} if name in NO_DECAY else {})
            for name, params in module.param_groups().items()
        ]
        groups = [g for g in groups if g["params"]]
        optimizer = torch.optim.AdamW(groups, foreach=False)
        optimizer.step()
    trained = {g["name"]: sum(p.numel() for p in g["params"] if p.grad is not None) for g in groups}
    ever = {id(p) for p in trainable}
    return FakeStep(
        layers=len(find_decoder_layers(model)[1]),
        crma_blocks=len(crma.blocks) if crma is not None else 0,
        lora_layers=len(list(tuner_layers(model))),
        trained=trained,
        frozen_with_grad=sum(1 for p in model.parameters() if id(p) not in ever and p.grad is not None),
        loss_shape=tuple(loss.shape),
        fused_loss=head is not None,
        nf4_as_dense=module.backbone_config.quantize == "nf4",
    )


def _fake_cpu(model: nn.Module) -> None:
    """Replace every parameter and buffer of ``model`` (on meta) by an empty CPU tensor of the same
    shape and dtype (a fake one under ``FakeTensorMode``), in place, keeping ties and flags."""
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in done:
                    done[id(p)] = nn.Parameter(
                        torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad
                    )
                module._parameters[name] = done[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)
