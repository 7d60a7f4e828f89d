"""GPU checks as tests (``pytest -m gpu``), skipped without CUDA; ``benchmarks/gpu_check.sh`` runs them.

- bf16 tokens/s of MODULAR against FROZEN (CRMA's cost) on a ~1B random-init Llama;
- ``train.py fit`` with FSDP1 on one node (every visible GPU), then resumed; with FSDP2 (bf16-mixed)
  and with ``16-mixed`` (fp16 autocast and its GradScaler) on one GPU;
- an NF4 base (bitsandbytes) with LoRA and CRMA: forward, backward, finite gradients;
- the fused loss on CUDA against Liger's fused linear cross-entropy when it is installed, else
  against the logits path;
- the memory plan's estimate against ``torch.cuda.max_memory_allocated`` (within 15 %).

With ``CRMA_GPU_RESULTS=<file.json>`` the measurements are written there at the end of the session.
The choice between the CUDA and CPU paths (:func:`cuda_reason`, :func:`reference_loss`) is tested on
CPU below, unmarked.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from importlib.util import find_spec

import pytest
import torch
from subproc import run_train

from crma_lightning.adapters.config import CRMAConfig, LoRAConfig
from crma_lightning.adapters.injection import inject_crma
from crma_lightning.adapters.lora import add_lora, lora_parameters
from crma_lightning.backbone.loading import BackboneConfig, load_backbone
from crma_lightning.core.losses import head_token_stats, token_stats


def cuda_reason(available: bool | None = None) -> str | None:
    """Why the GPU checks cannot run here (None: they can)."""
    available = torch.cuda.is_available() if available is None else available
    return None if available else "needs a CUDA device (torch.cuda.is_available() is False)"


needs_cuda = pytest.mark.skipif(cuda_reason() is not None, reason=cuda_reason() or "")
gpu = [pytest.mark.gpu, needs_cuda]


def reference_loss(device: str, liger: bool | None = None) -> tuple[str, Callable]:
    """The fused loss's reference on ``device``: Liger's fused linear cross-entropy where it runs
    (CUDA, installed), else the loss from the full logits. ``f(hidden (N, D), weight (V, D),
    targets (N,)) -> summed loss``."""
    liger = find_spec("liger_kernel") is not None if liger is None else liger
    if device == "cuda" and liger:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        fused = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        return "liger", lambda h, w, t: fused(w, h, t)
    return "logits", lambda h, w, t: torch.nn.functional.cross_entropy((h @ w.T).float(), t, reduction="sum")


#: TinyLlama-1.1B's shape, random init.
LLAMA_1B = dict(
    model_type="llama",
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    path = os.environ.get("CRMA_GPU_RESULTS")
    if path and RESULTS:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"device": device, "torch": torch.__version__, "checks": RESULTS}, f, indent=1)


# -- on CPU: the selection ------------------------------------------------------------------------
def test_selection_without_cuda():
    assert cuda_reason(False).startswith("needs a CUDA device")
    assert cuda_reason(True) is None
    assert reference_loss("cpu", liger=True)[0] == "logits"  # Liger is a Triton kernel: CUDA only
    assert reference_loss("cuda", liger=False)[0] == "logits"
    _, loss = reference_loss("cpu")
    h, w, labels = torch.randn(6, 4), torch.randn(10, 4), torch.tensor([1, 2, 3, 4, 5, -100])
    # position t predicts labels[t + 1]; -100 is not scored
    ours = head_token_stats(h[None], w, labels[None]).loss_sum
    assert torch.allclose(loss(h[:5], w, labels[1:]), ours, atol=1e-5)


def test_gpu_checks_skip_cleanly_without_cuda(request):
    """Every test marked ``gpu`` carries the CUDA skip, and it is active exactly when CUDA is absent."""
    marked = [
        f
        for n, f in globals().items()
        if n.startswith("test_")
        and any(getattr(m, "name", None) == "gpu" for m in getattr(f, "pytestmark", []))
    ]
    assert len(marked) == 6
    for f in marked:
        skips = [m for m in f.pytestmark if m.name == "skipif"]
        assert skips and skips[0].args[0] == (not torch.cuda.is_available())


# -- on CUDA --------------------------------------------------------------------------------------
def _adapted(backbone: BackboneConfig, modular: bool, device: str = "cuda"):
    model = load_backbone(backbone)
    for p in model.parameters():
        p.requires_grad_(False)
    add_lora(model, "task", LoRAConfig(r=16, alpha=32, dropout=0.0, target_modules=QKVO))
    handle = inject_crma(model, CRMAConfig(streams=4)) if modular else None
    params = lora_parameters(model, "task") + (handle.parameters() if handle else [])
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    model.config.use_cache = False
    return model.to(device), params, handle


def _step(model, params, ids, opt) -> float:
    head = model.get_output_embeddings()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        from crma_lightning.backbone.output_head import head_as_identity

        with head_as_identity(head):
            hidden = model(input_ids=ids, use_cache=False).logits
        stats = head_token_stats(hidden, head.weight, ids)
    loss = stats.loss_sum / stats.tokens
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


@pytest.mark.gpu
@needs_cuda
def test_bf16_tokens_per_s_modular_vs_frozen():
    batch, seq, warmup, steps = 8, 512, 3, 10
    row = {}
    for name in ("frozen", "modular"):
        model, params, handle = _adapted(BackboneConfig(config=LLAMA_1B, dtype="bfloat16"), name == "modular")
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        ids = torch.randint(0, LLAMA_1B["vocab_size"], (batch, seq), device="cuda")
        times, losses = [], []
        for i in range(warmup + steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            losses.append(_step(model, params, ids, opt))
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        assert all(torch.isfinite(torch.tensor(losses)))
        row[name] = {
            "tokens_per_s": batch * seq / statistics.median(times),
            "step_s": statistics.median(times),
        }
        if handle is not None:
            row[name]["max_sigma"] = handle.diagnostics().sigma_max.max().item()
            assert row[name]["max_sigma"] <= 1 + 1e-6
        del model, params, handle, opt
        torch.cuda.empty_cache()
    row["modular_over_frozen_step"] = row["modular"]["step_s"] / row["frozen"]["step_s"]
    RESULTS["bf16_throughput_llama_1.1b"] = row
    assert row["modular_over_frozen_step"] < 1.25


@pytest.mark.e2e
@pytest.mark.gpu
@needs_cuda
def test_fsdp1_one_node(tmp_path):
    devices = str(torch.cuda.device_count())
    args = [
        "fit",
        "--config",
        "configs/tiny.yaml",
        "--trainer.accelerator",
        "gpu",
        "--trainer.devices",
        devices,
        "--trainer.strategy",
        "crma_lightning.backbone.sharding.AdapterFSDPStrategy",
        "--trainer.precision",
        "bf16-mixed",
        "--model.backbone.dtype",
        "bfloat16",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
    ]
    first = run_train(*args, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_train(*args, "--ckpt_path", "last", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    adapters = sorted(p.name for p in tmp_path.rglob("adapters/*"))
    RESULTS["fsdp1_one_node"] = {"devices": int(devices), "adapters": adapters}
    assert adapters


@pytest.mark.e2e
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "extra",
    [
        [
            "--trainer.strategy",
            "crma_lightning.backbone.sharding.AdapterShardedStrategy",
            "--trainer.precision",
            "bf16-mixed",
        ],
        ["--trainer.precision", "16-mixed"],
    ],
    ids=["fsdp2_bf16", "single_16mixed"],
)
def test_fit_on_one_gpu(tmp_path, extra):
    fit = run_train(
        "fit",
        "--config",
        "configs/tiny.yaml",
        "--trainer.accelerator",
        "gpu",
        "--trainer.devices",
        "1",
        *extra,
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        timeout=300,
    )
    summary = next(tmp_path.rglob("summary.json"), None)
    RESULTS[f"fit_{extra[-1]}"] = {
        "exit": fit.returncode,
        "summary": json.loads(summary.read_text()) if summary else None,
    }
    assert fit.returncode == 0, fit.stderr[-3000:]


@pytest.mark.gpu
@needs_cuda
def test_nf4_base_on_cuda():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    config = dict(LLAMA_1B, num_hidden_layers=4)
    model, params, _ = _adapted(BackboneConfig(config=config, dtype="bfloat16", quantize="nf4"), modular=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    ids = torch.randint(0, config["vocab_size"], (4, 256), device="cuda")
    opt = torch.optim.AdamW(params, lr=1e-4)
    losses = [_step(model, params, ids, opt) for _ in range(3)]
    RESULTS["nf4_base"] = {"losses": losses, "allocated_gib": torch.cuda.memory_allocated() / 2**30}
    assert all(map(lambda x: x == x and abs(x) != float("inf"), losses)) and losses[-1] < losses[0]


@pytest.mark.gpu
@needs_cuda
def test_fused_loss_on_cuda():
    n, d, vocab = 4096, 2048, 32000
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, d, device="cuda", generator=gen, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(vocab, d, device="cuda", generator=gen, dtype=torch.bfloat16) / d**0.5
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    ours = head_token_stats(hidden[None], weight, torch.cat([targets[:1], targets])[None, :n]).loss_sum
    (grad_ours,) = torch.autograd.grad(ours, hidden)
    name, reference = reference_loss("cuda")
    ref = reference(hidden[:-1], weight, targets[:-1])  # labels[t + 1] = targets[t]: position t predicts it
    (grad_ref,) = torch.autograd.grad(ref, hidden)
    RESULTS["fused_loss"] = {"reference": name, "loss": ours.item(), "reference_loss": ref.item()}
    assert torch.allclose(ours.float(), ref.float(), rtol=2e-3)
    assert torch.allclose(grad_ours[:-1].float(), grad_ref[:-1].float(), atol=2e-3, rtol=2e-2)
    # also the whole logits path, the model's own loss
    logits_loss = token_stats(
        (hidden @ weight.T)[None], torch.cat([targets[:1], targets])[None, :n], accuracy=False
    )
    assert torch.allclose(ours.float(), logits_loss.loss_sum.float(), rtol=2e-3)


@pytest.mark.gpu
@needs_cuda
def test_plan_matches_cuda_peak():
    """The plan's peak for a bf16 MODULAR step on a SmolLM2-shaped model, 8 x 512 tokens, against
    the step's ``torch.cuda.max_memory_allocated`` (weights included)."""
    from crma_lightning.cli.plan import parse, plan_config, shipped_config

    shape = {
        k: v
        for k, v in json.loads(shipped_config("HuggingFaceTB/SmolLM2-135M-Instruct").read_text()).items()
        if k != "architectures"
    }
    argv = [
        "--config",
        "configs/tiny.yaml",
        "--model.backbone.config",
        json.dumps(shape),
        "--model.backbone.dtype",
        "bfloat16",
        "--trainer.precision",
        "bf16-mixed",
        "--data.batch_size",
        "8",
        "--data.max_length",
        "512",
        "--model.lora.dropout",
        "0.0",
        "--data.tokenizer",
        "null",
        "--data.synthetic_vocab",
        "64",
    ]
    plan, text = plan_config(argv)
    _, module = parse(argv)
    module.configure_model()
    model = module.model.cuda()
    task = module.task_names[0]
    params = module.trainable_parameters(task)
    trains = {id(p) for p in params}
    for p in module.ever_trainable_parameters():
        p.requires_grad_(id(p) in trains)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, shape["vocab_size"], (8, 512), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        _step(model, params, ids, opt)
    peak = torch.cuda.max_memory_allocated()
    RESULTS["plan_vs_cuda_peak"] = {
        "plan_gib": plan.peak() / 2**30,
        "measured_gib": peak / 2**30,
        "error": plan.peak() / peak - 1,
        "plan": text,
    }
    assert abs(plan.peak() / peak - 1) <= 0.15, text
