"""Put CRMA on every decoder layer of a Hugging Face causal LM, switch it off and on, remove it.

Each block is a child module ``crma`` of its decoder layer, applied by a removable forward hook.
The decoder layers are the ``nn.ModuleList`` found at the first of :data:`LAYER_PATHS` that exists
on the model; the hidden size comes from the (text) config.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from crma_lightning.adapters.config import CRMAConfig
from crma_lightning.adapters.crma import CRMA_GROUPS, CRMABlock, principal_directions
from crma_lightning.adapters.projection import Diagnostics, project, project_with_diagnostics
from crma_lightning.core.dist import full_tensor
from crma_lightning.core.errors import ConfigError

#: Where decoder layers live, by model family. Llama, Mistral, Qwen2, Gemma2/3, Phi-3 and most
#: recent decoders use ``model.layers``; GPT-2 ``transformer.h``; multimodal Gemma3
#: ``model.language_model.layers``; OPT ``model.decoder.layers``; GPT-NeoX ``gpt_neox.layers``.
LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "transformer.h",
    "model.decoder.layers",
    "gpt_neox.layers",
)

CHILD_NAME = "crma"


def _get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        if not hasattr(module, part):
            return None
        module = getattr(module, part)
    return module


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified path and the ``nn.ModuleList`` of the model's decoder layers."""
    for path in LAYER_PATHS:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path, layers
    raise ConfigError(
        f"cannot inject CRMA into {type(model).__name__}: no decoder layers found at any supported layout "
        f"({', '.join(LAYER_PATHS)}). Supported families: Llama, Mistral, Qwen2, Gemma2/3, Phi-3, GPT-2, "
        "OPT, GPT-NeoX. Pass a Hugging Face *ForCausalLM model."
    )


def hidden_size_of(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(f"{type(model).__name__} has no .config; CRMA needs a transformers model")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(text, key, None), int):
            return getattr(text, key)
    raise ConfigError(
        f"cannot read the hidden size from {type(config).__name__} (no hidden_size/n_embd/d_model)"
    )


def _replace_hidden(output: Any, hidden: Tensor) -> Any:
    # Decoder layers return a tensor (transformers >= 5) or a tuple whose first item is it.
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


class CRMAInjection:
    """Handle on the CRMA blocks injected into one model: toggle, remove, batched projection, groups.

    Not an ``nn.Module``: the blocks are owned (and saved, sharded, moved) by their decoder layers.
    """

    def __init__(self, model: nn.Module, config: CRMAConfig, layer_path: str, blocks: dict[str, CRMABlock]):
        self.model = model
        self.config = config
        self.layer_path = layer_path
        self.blocks = blocks  # qualified layer name -> block, in layer order
        self._handles: list[RemovableHandle] = []
        self._batch_handles: list[RemovableHandle] = []
        self._batched = False
        #: crma.init pissa: layer name -> the weights its read projection's directions came from.
        self.init_sources: dict[str, list[str]] = {}

    # -- forward machinery -------------------------------------------------------------
    def _attach(self) -> None:
        for name, block in self.blocks.items():
            layer = self.model.get_submodule(name)
            if self.config.placement == "block_output":
                self._handles.append(layer.register_forward_hook(_output_hook(block)))
            else:
                self._handles.append(layer.register_forward_pre_hook(_input_hook(block), with_kwargs=True))
        self.set_batched_projection(self.config.batched_projection)

    def set_batched_projection(self, on: bool) -> None:
        """One batched projection of all layers' logits per forward pass (on) or one per layer (off)."""
        if on == self._batched:
            return
        if on:
            self._batch_handles = [
                self.model.register_forward_pre_hook(lambda *_: self._project_all()),
                self.model.register_forward_hook(lambda *_: self._clear_step_mix()),
            ]
            self._handles += self._batch_handles
        else:
            for h in self._batch_handles:
                h.remove()
                self._handles.remove(h)
            self._batch_handles = []
            self._clear_step_mix()
        self._batched = on

    def _project_all(self) -> None:
        if not self.enabled:
            return
        m = self.mixing_matrices()  # (L, n, n)
        for block, m_l in zip(self.blocks.values(), m.unbind(0), strict=True):
            block.step_mix = m_l

    def _clear_step_mix(self) -> None:
        for block in self.blocks.values():
            block.step_mix = None

    # -- public API --------------------------------------------------------------------
    def mixing_matrices(self) -> Tensor:
        """All layers' M in one batched projection, ``(L, n, n)`` float32.

        Differentiable only with unsharded parameters: under FSDP the batched projection is off and
        each layer projects inside its own forward (see :meth:`set_batched_projection`).
        """
        c = self.config
        logits = torch.stack([b.log_mix for b in self.blocks.values()])  # (L, n, n) or (L, n!)
        return project(
            logits, c.projection, c.streams, iters=c.sinkhorn_iters, tau=c.temperature, compiled=c.compile
        )

    def _full_logits(self) -> Tensor:
        # Under FSDP each rank holds a shard of every log_mix: gather (a collective, every rank).
        with self._unsharded():
            return torch.stack(
                [full_tensor(b.log_mix.detach()) for b in self.blocks.values()]
            )  # (L, n, n) or (L, n!)

    def _wrappers(self) -> list[nn.Module]:
        # The layer's ``crma`` child: the block itself, or (FSDP1) the FSDP unit wrapping it.
        return [getattr(self.model.get_submodule(name), CHILD_NAME) for name in self.blocks]

    @contextmanager
    def _unsharded(self) -> Iterator[None]:
        """FSDP1: the blocks' parameters whole for the duration (a collective); FSDP2 and
        unsharded models need nothing here (FSDP2 parameters are DTensors, gathered by _full)."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

        with ExitStack() as stack:
            for w in self._wrappers():
                if isinstance(w, FSDP1):
                    stack.enter_context(FSDP1.summon_full_params(w, writeback=False))
            yield

    @torch.no_grad()
    def diagnostics(self) -> Diagnostics:
        """Every layer's projection health in one batched call; each field has shape ``(L,)``.

        For Sinkhorn the rescale is the one the projection actually applied. Under FSDP this
        gathers the logits and must be called on every rank.
        """
        c = self.config
        logits = self._full_logits()
        return project_with_diagnostics(
            logits, c.projection, c.streams, iters=c.sinkhorn_iters, tau=c.temperature
        )[1]

    @torch.no_grad()
    def gates(self) -> Tensor:
        """Every layer's gate value g, shape ``(L,)`` (gathered under FSDP: call on every rank)."""
        with self._unsharded():
            return torch.stack([full_tensor(b.gate_value().detach()) for b in self.blocks.values()])

    @property
    def enabled(self) -> bool:
        return all(b.enabled for b in self.blocks.values())

    @enabled.setter
    def enabled(self, on: bool) -> None:
        for b in self.blocks.values():
            b.enabled = on

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Temporarily switch CRMA off (same weights): the paper's inference ablation."""
        before = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = before

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """All blocks' parameters by declared group (``crma_proj``, ``crma_mix``, ``crma_gate``)."""
        groups: dict[str, list[nn.Parameter]] = {g: [] for g in CRMA_GROUPS}
        for block in self.blocks.values():
            for g, params in block.param_groups().items():
                groups[g] += params
        return groups

    def parameters(self) -> list[nn.Parameter]:
        return [p for params in self.param_groups().values() for p in params]

    def state_dict(self) -> dict[str, Tensor]:
        """Block tensors keyed ``<layer name>.<param>`` (the layer name, not the ``crma`` child).

        Whole tensors: under FSDP the shards are gathered, so every rank must call this. (Through
        the ``crma`` child, so that an FSDP1 unit wrapping the block gathers its flat parameter.)
        """
        return {
            f"{name}.{k}": full_tensor(v.detach())
            for name, w in zip(self.blocks, self._wrappers(), strict=True)
            for k, v in w.state_dict().items()
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name, block in self.blocks.items():
            prefix = f"{name}."
            block.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})

    def remove(self) -> None:
        """Remove every hook and block: the model is the plain host model again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._batched = False
        for name in self.blocks:
            delattr(self.model.get_submodule(name), CHILD_NAME)
        self.blocks = {}


def _output_hook(block: CRMABlock):
    # The block is called through its layer's ``crma`` child: the block itself, or the FSDP1 unit
    # wrapping it (whose forward all-gathers the block's parameters first).
    def hook(layer: nn.Module, _args: Any, output: Any) -> Any:
        if not block.enabled:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        return _replace_hidden(output, getattr(layer, CHILD_NAME)(hidden))

    return hook


def _input_hook(block: CRMABlock):
    def hook(layer: nn.Module, args: tuple, kwargs: dict) -> Any:
        if not block.enabled:
            return None
        crma = getattr(layer, CHILD_NAME)
        if args:
            return (crma(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": crma(kwargs["hidden_states"])}

    return hook


def resolve_layer_indices(indices: list[int] | None, num_layers: int) -> list[int]:
    if indices is None:
        return list(range(num_layers))
    out = sorted({i % num_layers for i in indices if -num_layers <= i < num_layers})
    if len(out) != len(set(indices)):
        raise ConfigError(f"crma.layers {indices} has indices outside 0..{num_layers - 1} or duplicates")
    return out


def reader_index(i: int, num_layers: int, placement: str) -> int:
    """The decoder layer that next reads the hidden state CRMA writes at layer ``i``: the next layer
    for ``block_output`` (the last layer's output is read only by the final norm and the LM head,
    so the last layer uses its own), layer ``i`` itself for ``block_input``."""
    return min(i + 1, num_layers - 1) if placement == "block_output" else i


def pissa_source(layer: nn.Module, names: list[str], d: int, where: str) -> tuple[Tensor, list[str]]:
    """The stacked ``(sum of out, d)`` weights of ``layer``'s linear layers named in ``names`` (the
    last component of their qualified names; a LoRA-wrapped layer by its base weight, a 4-bit one
    dequantised) and their names. A clear error when none of them reads ``d``-dim input."""
    from crma_lightning.adapters.lora import dense_weight

    found: list[tuple[str, Tensor]] = []
    for name, module in layer.named_modules():
        if name.rsplit(".", 1)[-1] in names:
            w = dense_weight(module)
            if w is not None and w.shape[1] == d:
                found.append((name, w))
    if not found:
        linear = [n for n, m in layer.named_modules() if n and dense_weight(m) is not None]
        raise ConfigError(
            f"crma.init: pissa found no linear layer named {names} reading the hidden size {d} in {where}; "
            f"its linear layers are {linear[:12]}. Set crma.pissa_modules to the names of the layer's input "
            "projections."
        )
    return torch.cat([w for _, w in found]), [f"{where}.{n}" for n, _ in found]


def inject_crma(model: nn.Module, config: CRMAConfig, *, principal_init: bool = True) -> CRMAInjection:
    """Add a CRMA block to every (selected) decoder layer of ``model``; returns the handle.

    ``handle.blocks`` maps the qualified names of the layers touched to their blocks. Blocks are
    created in float32 on the model's device: the adapter is tiny and its projection runs in fp32.
    With ``crma.init: pissa`` the read projections start from principal directions
    (:func:`pissa_source`, :func:`crma_lightning.adapters.crma.principal_directions`) and
    ``handle.init_sources`` names the weights each came from; ``principal_init=False`` skips that
    (the blocks' weights are about to be loaded).
    """
    config.validate()
    path, layers = find_decoder_layers(model)
    if any(hasattr(layer, CHILD_NAME) for layer in layers):
        raise ConfigError("this model already has CRMA injected; call remove() on the existing handle first")
    d = hidden_size_of(model)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(config.init_seed)
    blocks: dict[str, CRMABlock] = {}
    sources: dict[str, list[str]] = {}
    for i in resolve_layer_indices(config.layers, len(layers)):
        principal = None
        if config.init == "pissa" and principal_init:
            r = reader_index(i, len(layers), config.placement)
            weight, sources[f"{path}.{i}"] = pissa_source(layers[r], config.pissa_modules, d, f"{path}.{r}")
            principal = principal_directions(weight, config.streams).cpu()
        block = CRMABlock(d, config, generator=gen, compiled=config.compile, principal=principal).to(device)
        layers[i].add_module(CHILD_NAME, block)
        blocks[f"{path}.{i}"] = block
    handle = CRMAInjection(model, config, path, blocks)
    handle.init_sources = sources
    handle._attach()
    return handle
