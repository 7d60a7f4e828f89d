"""CRMA block and injection on tiny models of every supported family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CONFIGS, tiny_model
from torch import nn

from crma_lightning.adapters.config import CRMAConfig, LoRAConfig
from crma_lightning.adapters.crma import CRMABlock, low_rank_residual
from crma_lightning.adapters.injection import inject_crma
from crma_lightning.adapters.lora import activate_lora, add_lora, lora_disabled
from crma_lightning.core.errors import ConfigError


def _perturb(handle, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in handle.blocks.values():
            for p in b.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _class_dicts(model):
    return {type(m): dict(vars(type(m))) for m in model.modules()}


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("form", ["additive", "subspace"])
def test_identity_at_init_toggle_and_remove(family, form, tokens):
    model = tiny_model(family)
    classes_before = _class_dicts(model)
    base = model(tokens).logits
    add_lora(model, "t1", LoRAConfig(target_modules="all-linear"))
    activate_lora(model, "t1")
    handle = inject_crma(model, CRMAConfig(form=form))
    assert len(handle.blocks) == 2
    assert all(name.endswith((".0", ".1")) for name in handle.blocks)
    # Identity at step 0 (LoRA B = 0 too): max abs diff <= 1e-6 in fp32.
    assert (model(tokens).logits - base).abs().max().item() <= 1e-6

    _perturb(handle)
    with_crma = model(tokens).logits
    assert (with_crma - base).abs().max() > 1e-3
    with handle.disabled():
        assert torch.equal(model(tokens).logits, base)  # same weights, CRMA off: exactly the base(+LoRA)
    assert torch.equal(model(tokens).logits, with_crma)

    handle.remove()
    assert torch.equal(model(tokens).logits, base)
    assert not any("crma" in n for n, _ in model.named_modules())
    # Wrap, don't patch: no transformers class was modified.
    assert _class_dicts(model).keys() >= classes_before.keys()
    for cls, d in classes_before.items():
        assert dict(vars(cls)) == d


def test_toggle_reproduces_lora_logits_exactly(tokens):
    model = tiny_model("llama")
    add_lora(model, "t1", LoRAConfig(r=4))
    activate_lora(model, "t1")
    model.eval()  # new LoRA dropout modules start in training mode
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    lora_only = model(tokens).logits
    handle = inject_crma(model, CRMAConfig())
    _perturb(handle)
    assert (model(tokens).logits - lora_only).abs().max() > 1e-3
    handle.enabled = False
    assert torch.equal(model(tokens).logits, lora_only)
    with lora_disabled(model):
        base = model(tokens).logits
    assert (base - lora_only).abs().max() > 1e-4


def test_batched_projection_equals_per_layer(tokens):
    model = tiny_model("qwen2")
    handle = inject_crma(model, CRMAConfig(batched_projection=True))
    _perturb(handle, seed=3)
    batched = model(tokens).logits
    (batched.square().mean()).backward()
    g_batched = [p.grad.clone() for p in handle.parameters()]
    model.zero_grad()
    handle.set_batched_projection(False)
    per_layer = model(tokens).logits
    (per_layer.square().mean()).backward()
    torch.testing.assert_close(batched, per_layer, atol=1e-6, rtol=0)
    for a, p in zip(g_batched, handle.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)
    assert all(b.step_mix is None for b in handle.blocks.values())  # no stale M after forward


def test_param_groups_declared_and_trainable(tokens):
    model = tiny_model("llama")
    handle = inject_crma(model, CRMAConfig())
    groups = handle.param_groups()
    assert set(groups) == {"crma_proj", "crma_mix", "crma_gate"}
    assert [p.shape for p in groups["crma_mix"]] == [(4, 4), (4, 4)]
    assert [p.shape for p in groups["crma_proj"]] == [(4, 32), (32, 4)] * 2
    for p in model.parameters():
        p.requires_grad_(False)
    for p in handle.parameters():
        p.requires_grad_(True)
    model(tokens).logits.square().mean().backward()
    # W = 0 at init: the write projection gets a gradient first, the rest of the chain follows.
    assert all(b.write.grad.abs().sum() > 0 for b in handle.blocks.values())


@pytest.mark.parametrize(
    "projection,streams", [("sinkhorn", 2), ("sinkhorn", 8), ("birkhoff", 3), ("birkhoff", 5)]
)
def test_block_bound_and_subspace_non_expansive(projection, streams):
    cfg = CRMAConfig(streams=streams, projection=projection, form="subspace", gate_init=1.0, mix_init=3.0)
    block = CRMABlock(16, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        block.log_mix.normal_(0, 5)
    d = block.diagnostics()
    assert d.sigma_max.item() <= 1
    h = torch.randn(100, 16)
    out = block(h)
    assert (out.norm(dim=-1) <= h.norm(dim=-1) * (1 + 1e-5)).all()


def test_block_input_placement_and_layer_selection(tokens):
    model = tiny_model("mistral")
    base = model(tokens).logits
    handle = inject_crma(model, CRMAConfig(placement="block_input", layers=[-1]))
    assert list(handle.blocks) == ["model.layers.1"]
    assert torch.equal(model(tokens).logits, base)
    _perturb(handle)
    assert (model(tokens).logits - base).abs().max() > 1e-3


def _reference_forward(block: CRMABlock, h: torch.Tensor) -> torch.Tensor:
    """docs/method.md §5 written out step by step (the block's forward before the fused write)."""
    m, g = block.mixing_matrix(), block.gate_value()
    if block.config.form == "additive":
        s = F.linear(h, block.read)  # (..., n)
        return h + g * F.linear(s @ m.T - s, block.write)
    u, _ = torch.linalg.qr(block.basis.float())
    s = h @ u  # (..., n)
    return h + g * (s @ (m - torch.eye(m.shape[-1])).T) @ u.T


def _perturbed_block(form: str, d: int, seed: int = 0) -> CRMABlock:
    block = CRMABlock(d, CRMAConfig(form=form, gate_init=0.5), torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return block


def _out_and_grads(fn, block, h, grad):
    block.zero_grad()
    h = h.clone().requires_grad_(True)
    out = fn(h)
    out.backward(grad)
    return out.detach(), h.grad, [p.grad.clone() for p in block.parameters()]


@pytest.mark.parametrize("form", ["additive", "subspace"])
@pytest.mark.parametrize("shape", [(16, 32, 64), (3, 40)])
def test_fused_write_matches_the_reference_formulation(form, shape):
    block = _perturbed_block(form, shape[-1])
    gen = torch.Generator().manual_seed(2)
    h, grad = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    out, gh, gp = _out_and_grads(block, block, h, grad)
    ref, gh_ref, gp_ref = _out_and_grads(lambda x: _reference_forward(block, x), block, h, grad)
    # Float summation order differs (g and M folded into W' first): rounding only.
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, gh_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(gp, gp_ref, strict=True):
        # A parameter's gradient sums over every row (512 here, entries up to ~50), so its rounding
        # scales with the tensor, not the entry: an absolute 1e-5 failed on one near-zero entry of
        # `read`'s gradient (1.7e-5 off, max |g| 43) on one CPU and passed on another.
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-5)


def test_custom_write_backward_matches_autograd():
    gen = torch.Generator().manual_seed(3)
    h, read, write = (
        torch.randn(4, 8, 24, generator=gen),
        torch.randn(4, 24, generator=gen),
        torch.randn(24, 4, generator=gen),
    )
    grads = []
    for custom in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (h, read, write)]
        low_rank_residual(*leaves, custom_backward=custom).sum().backward()  # expanded (stride-0) grad
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # h needs no gradient (frozen embeddings before the first block): only the factors get one.
    r = read.clone().requires_grad_(True)
    low_rank_residual(h, r, write).square().sum().backward()
    assert r.grad is not None and torch.isfinite(r.grad).all()


@pytest.mark.parametrize("form", ["additive", "subspace"])
def test_block_is_exactly_the_identity_at_init_in_its_dtype(form):
    block = CRMABlock(64, CRMAConfig(form=form), torch.Generator().manual_seed(0))
    with torch.no_grad():
        block.log_mix.normal_(0, 3)  # M far from I: only W = 0 (resp. g = 0) makes it the identity
    h = torch.randn(16, 32, 64)
    assert torch.equal(block(h), h)
    hb = h.to(torch.bfloat16)
    assert block(hb).dtype == torch.bfloat16 and torch.equal(block(hb), hb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(h)
    assert out.dtype == torch.float32 and torch.equal(out, h)  # autocast does not round the residual stream
    assert torch.equal(block.to(torch.bfloat16)(hb), hb)  # bf16 parameters (a bf16-true run)


def test_validation_lists_every_problem():
    with pytest.raises(ConfigError) as e:
        CRMAConfig(streams=1, sinkhorn_iters=0, temperature=0.0).validate()
    msg = str(e.value)
    assert "crma.streams" in msg and "crma.sinkhorn_iters" in msg and "crma.temperature" in msg
    with pytest.raises(ConfigError, match="birkhoff"):
        CRMAConfig(streams=6, projection="birkhoff").validate()


def test_unsupported_model_names_layouts():
    class NotAnLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(ConfigError, match="model.layers.*transformer.h"):
        inject_crma(NotAnLM(), CRMAConfig())
    model = tiny_model("gpt2")
    inject_crma(model, CRMAConfig())
    with pytest.raises(ConfigError, match="already has CRMA"):
        inject_crma(model, CRMAConfig())


def test_batched_diagnostics_match_each_block():
    model = tiny_model("llama")
    handle = inject_crma(model, CRMAConfig(sinkhorn_iters=3))
    _perturb(handle, seed=5)
    with torch.no_grad():
        for b in handle.blocks.values():
            b.log_mix.mul_(20)  # peaked: 3 iterations leave the rescale active
    batched = handle.diagnostics()
    for i, block in enumerate(handle.blocks.values()):
        d = block.diagnostics()
        for field in ("sigma_max", "sigma_2", "row_err", "col_err", "rescale"):
            torch.testing.assert_close(getattr(batched, field)[i], getattr(d, field))
    assert (batched.rescale > 1).any() and (batched.sigma_max <= 1).all()


def test_a_multimodal_language_model_layout():
    """Gemma3's image-text model keeps its decoder at model.language_model.layers; the vision
    tower's layers are not decoder layers and get no block."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(
        Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    )
    model.eval()
    x = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    base = model(input_ids=x).logits
    handle = inject_crma(model, CRMAConfig())
    assert handle.layer_path == "model.language_model.layers" and len(handle.blocks) == 2
    assert (model(input_ids=x).logits - base).abs().max().item() <= 1e-6
    _perturb(handle)
    assert (model(input_ids=x).logits - base).abs().max() > 1e-3
    with handle.disabled():
        assert torch.equal(model(input_ids=x).logits, base)
