"""Will it fit? A memory plan for a training config, with no weights and no download.

``python train.py plan --config configs/paper_mistral7b_qlora.yaml [--device_gib 80] [overrides]``
builds the configured model on the meta device and counts, per device, weights, gradients, optimizer
state and activations for the configured strategy and world size, then names the fewest devices of
``--device_gib`` that hold the peak (docs/distributed.md "Will it fit?").
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from crma_lightning.core.atomic import atomic_write_text
from crma_lightning.core.errors import ConfigError

GiB = 2**30
#: NF4 bytes per weight: 4 bits, one 8-bit absmax per block of 64, one float32 per 256 such constants.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
#: AdamW keeps two float32 moments per trained parameter.
ADAM_BYTES = 8
#: Adapters, their gradients and the loss are float32 whatever the base dtype.
FP32 = 4
#: The fused loss's rows per chunk (crma_lightning.core.losses.head_token_stats).
LOSS_CHUNK = 512
#: Of every GPU, kept for CUDA's context and the caching allocator's fragmentation.
RESERVE_GIB = 1.5
#: LoRA targets that read the same tensor (one saved input serves them all, without dropout).
SHARED_INPUTS = ({"q_proj", "k_proj", "v_proj", "qkv_proj"}, {"gate_proj", "up_proj", "gate_up_proj"})

Kind = Literal["single", "ddp", "fsdp1", "fsdp2"]


# -- pure arithmetic ------------------------------------------------------------------------------
def layer_activation_bytes(
    hidden: int, kv_dim: int, intermediate: int, act: int, lora_inputs: int, crma: bool
) -> int:
    """Bytes one Llama-style decoder layer (frozen base weights) keeps for backward, per token.

    ``act``: bytes of a compute-dtype element (2 under bf16/fp16 autocast or a bf16 base, else 4);
    ``lora_inputs``: elements of the inputs the LoRAs keep (their A weights train), see
    :func:`lora_input_elements`. A frozen linear keeps no input: its input gradient needs its weight only.
    """
    kept = 2 * FP32 * hidden  # each RMSNorm keeps its input upcast to float32
    kept += act * (2 * hidden + 2 * kv_dim)  # attention keeps q, k, v and its output
    kept += act * 3 * intermediate  # SiLU keeps the gate; the product keeps silu(gate) and up
    kept += act * lora_inputs
    if crma:
        kept += act * hidden  # the block keeps the layer's output h (it writes h + W' R h)
    return kept


def lora_input_elements(adapted: dict[str, int], dropout: bool) -> int:
    """Elements per token of what one layer's LoRAs keep: ``adapted`` maps each adapted module's
    name (last component) to its input width. Without dropout, modules reading one tensor share it
    (:data:`SHARED_INPUTS`); with dropout each keeps its own dropped-out copy plus a 1-byte mask
    (counted here as a quarter of an element)."""
    if dropout:
        return sum(math.ceil(width * 1.25) for width in adapted.values())
    total, seen = 0, set()
    for name, width in adapted.items():
        group = next((frozenset(g) for g in SHARED_INPUTS if name in g), frozenset({name}))
        if group not in seen:
            seen.add(group)
            total += width
    return total


def loss_bytes(tokens: int, vocab: int, hidden: int, head_bytes: int, fused: bool) -> int:
    """The loss's peak workspace. Fused: the hidden states' gradient (formed in the forward pass)
    and one chunk's logits in the head's dtype and their float32 log-softmax; otherwise the logits,
    their float32 log-softmax and its gradient, all ``tokens x vocab``."""
    if fused:
        return tokens * hidden * FP32 + min(tokens, LOSS_CHUNK) * vocab * (head_bytes + 2 * FP32)
    return tokens * vocab * (head_bytes + 2 * FP32)


def activation_bytes(
    layers: int, tokens: int, per_layer: int, hidden: int, residual: int, loss: int, checkpointing: bool
) -> int:
    """Peak activation bytes of a step: what the layers keep (every layer's ``per_layer`` bytes per
    token; with checkpointing only each layer's input, plus one layer recomputed in backward), the
    final norm's float32 input, and the larger of the loss's workspace and one layer's gradients."""
    one_layer = tokens * per_layer
    kept = layers * tokens * residual * hidden + one_layer if checkpointing else layers * one_layer
    return kept + tokens * FP32 * hidden + max(loss, one_layer)


def nf4_bytes(numel: int) -> int:
    return math.ceil(numel * NF4_BYTES)


# -- the model's shape and parameters -------------------------------------------------------------
@dataclass
class Counts:
    """Parameters of the built (meta) model, by group."""

    base: int
    base_bytes: int
    base_linear: int
    """Of ``base``: the weights NF4 would quantise (every nn.Linear but the LM head)."""
    loras: dict[str, int]
    crma: int
    trains: dict[str, int]
    """What trains during a task: group -> parameters (LoRA of the task, CRMA)."""
    largest_layer_bytes: int
    nf4: bool
    head_bytes: int
    lora_inputs: int
    layers: int
    hidden: int
    kv_dim: int
    intermediate: int
    vocab: int


SHIPPED = "assets/model_configs"


def shipped_config(name: str) -> Path | None:
    """The config.json shipped for hub name ``name`` (``org/model``), or for a GGUF file's model name."""
    folder = Path(str(files("crma_lightning") / SHIPPED))
    exact = folder / (name.replace("/", "--") + ".json")
    if exact.is_file():
        return exact
    stem = Path(name).name.split(".")[0]
    return next(iter(sorted(folder.glob(f"*--{stem}.json"))), None)


def hf_config(backbone: Any):
    """The transformers config of ``backbone`` (a BackboneConfig), without weights or a download."""
    from transformers import AutoConfig

    from crma_lightning.backbone.hub import cache_root, resolve_path

    if backbone.config is not None:
        conf = dict(backbone.config)
        return AutoConfig.for_model(conf.pop("model_type"), **conf)
    name = resolve_path(backbone.name_or_path)
    if backbone.gguf_file:
        found = shipped_config(backbone.gguf_file) or next(
            iter(sorted((cache_root() / "gguf").glob(f"{Path(backbone.gguf_file).stem}-*/config.json"))), None
        )
        if found is not None:
            return AutoConfig.from_pretrained(found)
        return AutoConfig.from_pretrained(name, gguf_file=backbone.gguf_file)  # reads the header (~15 s)
    if os.path.isdir(name):
        return AutoConfig.from_pretrained(name, trust_remote_code=backbone.trust_remote_code)
    if (found := shipped_config(name)) is not None:
        return AutoConfig.from_pretrained(found)
    try:
        return AutoConfig.from_pretrained(
            name, revision=backbone.revision, trust_remote_code=backbone.trust_remote_code
        )
    except OSError as e:
        raise ConfigError(
            f"plan: no config for {backbone.name_or_path!r}: it is not shipped in crma_lightning/{SHIPPED} "
            f"and could not be read ({str(e)[:120]}); point model.backbone.name_or_path at a folder with its "
            "config.json"
        ) from None


def build_adapted(
    module: Any, context: Any, before_adapters: Any = None, every_lora: bool = True
) -> tuple[nn.Module, Any, Any]:
    """The configured model built under ``context`` (the meta device) with its LoRAs and CRMA added
    as ``ContinualLM.configure_model`` adds them (``module``: a ContinualLM not built yet; it is
    left holding the model); ``before_adapters(model)`` sees the bare base first;
    ``every_lora=False`` adds only the first task's LoRA (every LoRA has the one shape of
    ``model.lora``; peft takes ~1 s per LoRA at SmolLM2's 210 linear layers). Returns (model, the
    CRMA handle or None, the transformers config)."""
    from transformers import AutoModelForCausalLM

    from crma_lightning.adapters.injection import inject_crma
    from crma_lightning.adapters.lora import add_lora
    from crma_lightning.backbone.loading import DTYPES

    cfg = hf_config(module.backbone_config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with context:
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[module.backbone_config.dtype])
        if before_adapters is not None:
            before_adapters(model)
        names = module.layout.adapter_names(module.task_names)
        for adapter in names if every_lora else [module.adapter_for(module.task_names[0])]:
            add_lora(model, adapter, module.lora_config)
        crma = inject_crma(model, module.crma_config, principal_init=False) if module.layout.crma else None
    module.model, module.crma = model, crma
    return model, crma, cfg


def build_meta(module: Any) -> tuple[nn.Module, Counts]:
    """The configured model on the meta device, with its LoRAs and CRMA (``module``: a ContinualLM
    that is not built yet; it is left holding the meta model), and its parameter counts."""
    from crma_lightning.adapters.injection import find_decoder_layers
    from crma_lightning.adapters.lora import lora_parameters, tuner_layers
    from crma_lightning.backbone.loading import DTYPES

    size = DTYPES[module.backbone_config.dtype].itemsize
    nf4 = module.backbone_config.quantize == "nf4"
    base: dict[str, int] = {}

    def count_base(model: nn.Module) -> None:
        head = model.get_output_embeddings()
        linear = sum(m.weight.numel() for m in model.modules() if type(m) is nn.Linear and m is not head)
        total = sum(p.numel() for p in model.parameters())
        layer = find_decoder_layers(model)[1][0]
        lin0 = sum(m.weight.numel() for m in layer.modules() if type(m) is nn.Linear)
        rest0 = sum(p.numel() for p in layer.parameters()) - lin0
        base.update(
            total=total,
            linear=linear,
            largest=rest0 * size + (nf4_bytes(lin0) if nf4 else lin0 * size),
            bytes=(total - linear) * size + (nf4_bytes(linear) if nf4 else linear * size),
        )

    # torch's meta device context, not accelerate's init_empty_weights: under the latter, tying the
    # embeddings re-registers the head's weight as a new meta tensor, and a tied model counts it twice.
    model, crma, cfg = build_adapted(module, torch.device("meta"), count_base, every_lora=False)
    names = module.layout.adapter_names(module.task_names)
    layers = find_decoder_layers(model)[1]
    first = module.task_names[0]
    trains = {
        f"LoRA {module.adapter_for(first)}": sum(p.numel() for p in module.adapter_parameters("lora", first))
    }
    if "crma" in module.layout.trains and crma is not None:
        trains["CRMA"] = sum(p.numel() for p in crma.parameters())
    prefix = f"{find_decoder_layers(model)[0]}.0."
    adapted = {
        n.rsplit(".", 1)[-1]: layer.get_base_layer().in_features
        for n, layer in tuner_layers(model)
        if n.startswith(prefix) and hasattr(layer.get_base_layer(), "in_features")
    }
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    counts = Counts(
        base=base["total"],
        base_bytes=base["bytes"],
        base_linear=base["linear"],
        nf4=nf4,
        loras=dict.fromkeys(names, sum(p.numel() for p in lora_parameters(model, module.adapter_for(first)))),
        crma=sum(p.numel() for p in crma.parameters()) if crma is not None else 0,
        trains=trains,
        largest_layer_bytes=base["largest"],
        head_bytes=size,
        lora_inputs=lora_input_elements(adapted, module.lora_config.dropout > 0),
        layers=len(layers),
        hidden=text.hidden_size,
        kv_dim=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        vocab=text.vocab_size,
    )
    return model, counts


# -- the plan --------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Bytes per device of one training step, for one strategy and world size."""

    kind: Kind
    world: int
    batch: int
    length: int
    checkpointing: bool
    counts: Counts
    weights: int
    adapters: int
    gradients: int
    optimizer: int
    gathered: int
    activations: dict[bool, int]
    """Activation bytes without (False) and with (True) activation checkpointing."""
    checkpoint_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def static(self) -> int:
        return self.weights + self.adapters + self.gradients + self.optimizer + self.gathered

    def peak(self, checkpointing: bool | None = None) -> int:
        ckpt = self.checkpointing if checkpointing is None else checkpointing
        return self.static + self.activations[ckpt]


def strategy_kind(strategy: Any, world: int) -> Kind:
    """The plan's name for a parsed ``trainer.strategy`` (a string or a class_path namespace)."""
    name = (
        strategy
        if isinstance(strategy, str)
        else getattr(strategy, "class_path", None) or type(strategy).__name__
    )
    name = str(name).lower()
    if "sharded" in name or "modelparallel" in name:
        return "fsdp2"
    if "fsdp" in name:
        return "fsdp1"
    if "ddp" in name or (name == "auto" and world > 1):
        return "ddp"
    return "single"


def act_bytes(precision: Any, dtype_bytes: int) -> int:
    """Bytes of an activation element: 2 under 16-bit autocast or with a 16-bit base, else 4."""
    return 2 if str(precision).startswith(("bf16", "16")) or dtype_bytes == 2 else 4


def make_plan(
    counts: Counts,
    kind: Kind,
    world: int,
    batch: int,
    length: int,
    act: int,
    residual: int,
    checkpointing: bool,
    fused: bool,
) -> Plan:
    """Pure: bytes per device from the counts, the strategy and the step's shape."""
    shard = world if kind in ("fsdp1", "fsdp2") else 1
    trains = sum(counts.trains.values())
    ever = sum(counts.loras.values()) + counts.crma
    tokens = batch * length
    per_layer = layer_activation_bytes(
        counts.hidden, counts.kv_dim, counts.intermediate, act, counts.lora_inputs, counts.crma > 0
    )
    loss = loss_bytes(
        tokens, counts.vocab, counts.hidden, counts.head_bytes, fused and kind not in ("fsdp1", "fsdp2")
    )
    activations = {
        ckpt: activation_bytes(counts.layers, tokens, per_layer, counts.hidden, residual, loss, ckpt)
        for ckpt in (False, True)
    }
    notes = []
    if kind in ("fsdp1", "fsdp2"):
        notes.append("the fused loss is off under FSDP (the logits path is planned)")
        if counts.nf4:
            notes.append(
                "fit refuses FSDP with an NF4 base (ContinualLM.check_strategy): use one device or DDP"
            )
    return Plan(
        kind=kind,
        world=world,
        batch=batch,
        length=length,
        checkpointing=checkpointing,
        counts=counts,
        weights=math.ceil(counts.base_bytes / shard),
        adapters=math.ceil(ever * FP32 / shard),
        gradients=math.ceil(trains * FP32 / shard) + (ever * FP32 if kind == "ddp" and world > 1 else 0),
        optimizer=math.ceil(trains * ADAM_BYTES / shard),
        gathered=2 * counts.largest_layer_bytes if shard > 1 else 0,
        activations=activations,
        checkpoint_bytes=ever * FP32 + trains * ADAM_BYTES,
        notes=notes,
    )


def fewest_devices(peak_at: Any, kind: Kind, budget: float, limit: int = 1024) -> int | None:
    """The smallest world size whose per-device peak (``peak_at(world)``) fits ``budget`` bytes:
    1 or never for replicated strategies (their per-device bytes do not shrink), else the first
    power of two (doubling, then the exact count) up to ``limit``."""
    if kind in ("single", "ddp"):
        return 1 if peak_at(1) <= budget else None
    hi = 1
    while peak_at(hi) > budget:
        hi *= 2
        if hi > limit:
            return None
    lo = hi // 2 + 1 if hi > 1 else 1
    return next(n for n in range(lo, hi + 1) if peak_at(n) <= budget)


# -- the report ------------------------------------------------------------------------------------
def _gb(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _m(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def render(plan: Plan, label: str, device_gib: float, advice: str) -> str:
    c = plan.counts
    mode = {
        "single": "one device",
        "ddp": "DDP (replicated)",
        "fsdp1": "FSDP1 (sharded)",
        "fsdp2": "FSDP2 (sharded)",
    }
    lora_sizes = sorted(set(c.loras.values()))
    lines = [
        f"memory plan: {label}",
        f"  strategy {mode[plan.kind]}, {plan.world} device(s); per device: batch {plan.batch} x "
        f"{plan.length} tokens",
        f"  parameters: base {_m(c.base)} ({_gb(c.base_bytes)}"
        + (f", {_m(c.base_linear)} of them in NF4" if c.nf4 else "")
        + f"); {len(c.loras)} LoRA(s) of {', '.join(_m(n) for n in lora_sizes)}; CRMA {_m(c.crma)}",
        f"  trains during a task: {', '.join(f'{k} {_m(v)}' for k, v in c.trains.items())}",
        f"  weights         {_gb(plan.weights):>12}   frozen base",
        f"  adapters        {_gb(plan.adapters):>12}   every LoRA + CRMA, float32",
        f"  gradients       {_gb(plan.gradients):>12}   float32"
        + (" (+ DDP buckets)" if plan.kind == "ddp" and plan.world > 1 else ""),
        f"  optimizer       {_gb(plan.optimizer):>12}   AdamW moments, float32",
    ]
    if plan.gathered:
        lines.append(
            f"  gathered layers {_gb(plan.gathered):>12}   two decoder layers whole (current + prefetch)"
        )
    for ckpt in (False, True):
        mark = "  <- configured" if ckpt == plan.checkpointing else ""
        lines.append(
            f"  activations     {_gb(plan.activations[ckpt]):>12}   {'with' if ckpt else 'without'} "
            f"checkpointing{mark}"
        )
    lines += [
        f"  peak per device {_gb(plan.peak()):>12}   ({_gb(plan.peak(not plan.checkpointing))} "
        f"{'without' if plan.checkpointing else 'with'} checkpointing)",
        f"  adapter-only checkpoint {_gb(plan.checkpoint_bytes)} (adapters + the task's optimizer state)",
        *[f"  note: {n}" for n in plan.notes],
        f"advice: {advice}",
    ]
    return "\n".join(lines)


def advise(peak_at: Any, kind: Kind, world: int, device_gib: float) -> str:
    """One line: the fewest ``device_gib`` devices that hold ``kind``'s per-device peak
    (``peak_at(world)``, bytes), less :data:`RESERVE_GIB` each, or that none do."""
    usable = (device_gib - RESERVE_GIB) * GiB
    need = fewest_devices(peak_at, kind, usable)
    size = (
        f"x {device_gib:g} GiB device(s) ({device_gib - RESERVE_GIB:g} GiB usable: {RESERVE_GIB:g} kept for "
        "CUDA)"
    )
    if need is None:
        hint = "shard it (FSDP2), " if kind in ("single", "ddp") else ""
        return (
            f"does not fit on {size} with {kind}: {hint}quantize the base (nf4), or lower the batch or length"
        )
    if kind in ("single", "ddp"):
        return (
            f"fits on 1 {size} with {kind}, {_gb(peak_at(1))} each; more devices add data parallelism, not "
            "room"
        )
    configured = f"; as configured ({world}), {_gb(peak_at(world))} each" if world != need else ""
    return f"needs {need} {size} with {kind}, {_gb(peak_at(need))} each{configured}"


# -- the command -----------------------------------------------------------------------------------
def parse(argv: list[str]) -> tuple[Any, Any]:
    """(the parsed config, the model as a ContinualLM not yet built), through fit's own parser."""
    from crma_lightning.cli.fit import ContinualCLI
    from crma_lightning.training.module import ContinualLM

    class _Parse(ContinualCLI):
        def instantiate_classes(self) -> None:  # the model only: the data's files need not exist here
            from jsonargparse import Namespace
            from lightning.pytorch.cli import LightningArgumentParser

            parser = LightningArgumentParser(exit_on_error=False)
            parser.add_lightning_class_args(ContinualLM, "model", subclass_mode=False)
            self.config_init = parser.instantiate_classes(Namespace(model=self.config["model"]))

    argv0, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when sys.argv and args both hold options
    try:
        cli = _Parse(args=argv, run=False, seed_everything_default=False)
    finally:
        sys.argv = argv0
    return cli.config, cli.config_init["model"]


def world_of(trainer: Any) -> int:
    devices = trainer.get("devices", 1)
    if isinstance(devices, list):
        count = len(devices)
    elif isinstance(devices, str):
        count = int(devices) if devices.lstrip("-").isdigit() and int(devices) > 0 else 1
    else:
        count = devices if isinstance(devices, int) and devices > 0 else 1
    return count * int(trainer.get("num_nodes") or 1)


def plan_config(argv: list[str], device_gib: float = 80.0) -> tuple[Plan, str]:
    """The plan of the config ``argv`` names (fit's arguments) and its printed report."""
    from crma_lightning.backbone.loading import DTYPES

    config, module = parse(argv)
    trainer, data = config["trainer"], config["data"]
    world = world_of(trainer)
    kind = strategy_kind(trainer.get("strategy") or "auto", world)
    _, counts = build_meta(module)
    dtype_bytes = DTYPES[module.backbone_config.dtype].itemsize
    act = act_bytes(trainer.get("precision"), dtype_bytes)
    shape = dict(
        batch=data["batch_size"],
        length=data["max_length"],
        act=act,
        residual=dtype_bytes,
        checkpointing=module.gradient_checkpointing,
        fused=module.fused_loss,
    )
    plan = make_plan(counts, kind, world, **shape)
    label = f"{module.backbone_config.label}, {module.strategy}, {module.backbone_config.dtype}" + (
        ", NF4 base" if module.backbone_config.quantize == "nf4" else ""
    )
    advice = advise(lambda n: make_plan(counts, kind, n, **shape).peak(), kind, world, device_gib)
    return plan, render(plan, label, device_gib, advice)


PLAN_HELP = (
    "usage: train.py plan --config FILE [--config FILE ...] [--device_gib N] [--json PATH] [fit's options]\n"
    """\

Print the memory plan of a fit config: the bytes of the weights, adapters, gradients, optimizer state
and activations per device, the peak, and whether it fits a device of N GiB (default 80). Nothing is
downloaded or trained: the model is built on the meta device from its config.

  --device_gib N   the memory of one device, in GiB (default 80)
  --json PATH      also write the plan as JSON to PATH

Every option of `train.py fit` is accepted (`train.py fit --help` lists them), e.g.
  python train.py plan --config configs/paper_mistral7b.yaml --trainer.devices 2 --device_gib 24"""
)


def main(argv: list[str] | None = None) -> Plan:
    """``train.py plan --config ... [--device_gib N] [--json PATH] [fit's options]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(PLAN_HELP)
        raise SystemExit(0)
    device_gib, out = 80.0, None
    for opt in ("--device_gib", "--json"):
        if opt in argv:
            i = argv.index(opt)
            value = argv[i + 1]
            del argv[i : i + 2]
            device_gib, out = (float(value), out) if opt == "--device_gib" else (device_gib, value)
    try:
        plan, text = plan_config(argv, device_gib)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(text)
    if out:
        atomic_write_text(out, json.dumps(plan_dict(plan), indent=1))
    return plan


def plan_dict(plan: Plan) -> dict:
    return {
        "kind": plan.kind,
        "world": plan.world,
        "batch": plan.batch,
        "length": plan.length,
        "weights": plan.weights,
        "adapters": plan.adapters,
        "gradients": plan.gradients,
        "optimizer": plan.optimizer,
        "gathered": plan.gathered,
        "activations": {
            "without_checkpointing": plan.activations[False],
            "with_checkpointing": plan.activations[True],
        },
        "peak": plan.peak(),
        "checkpoint_bytes": plan.checkpoint_bytes,
        "params": {
            "base": plan.counts.base,
            "loras": plan.counts.loras,
            "crma": plan.counts.crma,
            "trains": plan.counts.trains,
        },
    }
