"""The fused training loss (model.fused_loss): the logits path's loss and gradients, without the logits."""

from __future__ import annotations

import pytest
import torch
from builders import build
from conftest import TINY_CONFIGS, tiny_model
from crma_lightning.callbacks.evaluation import ContinualEvaluation

from crma_lightning.backbone.output_head import head_as_identity, head_problem, probe_matches
from crma_lightning.core import losses
from crma_lightning.methods.regularizers import LwF


@pytest.mark.parametrize("chunk", [1, 5, 256])
def test_head_loss_and_gradient_equal_the_logits_path(chunk):
    g = torch.Generator().manual_seed(0)
    B, T, D, V = 3, 9, 16, 50
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = losses.IGNORE_INDEX  # a prompt
    labels[2, -2:] = losses.IGNORE_INDEX  # padding
    example_weight = torch.tensor([1.0, 0.5, 0.0])  # 0: a rank's padding example

    ref = losses.token_stats(hidden @ weight.T, labels, example_weight, accuracy=False)
    (grad_ref,) = torch.autograd.grad(ref.loss_sum * 0.37, hidden)
    fused = losses.head_token_stats(hidden, weight, labels, example_weight, chunk=chunk)
    (grad_fused,) = torch.autograd.grad(fused.loss_sum * 0.37, hidden)

    assert fused.correct is None
    assert fused.tokens == ref.tokens == 6 + 0.5 * 8
    torch.testing.assert_close(fused.loss_sum.double(), ref.loss_sum.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_fused, grad_ref, rtol=1e-5, atol=1e-6)  # both in float32
    assert grad_fused[2].abs().max() == 0  # a zero-weighted example gets no gradient


@pytest.mark.parametrize("chunk", [1, 5, 256])
def test_head_evaluation_equals_the_logits_path_with_accuracy(chunk):
    g = torch.Generator().manual_seed(1)
    B, T, D, V = 3, 9, 16, 50
    hidden, weight = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g)
    labels = (hidden @ weight.T).argmax(-1).roll(1, dims=1)  # position t's argmax is labels[t + 1]...
    labels[:, 5:] = torch.randint(0, V, (B, T - 5), generator=g)  # ...for the first positions only
    labels[1, :2] = losses.IGNORE_INDEX
    example_weight = torch.tensor([1.0, 0.0, 0.25])
    ref = losses.token_stats(hidden @ weight.T, labels, example_weight)
    with torch.no_grad():
        fused = losses.head_token_stats(hidden, weight, labels, example_weight, accuracy=True, chunk=chunk)
    assert ref.correct >= 4  # the test can tell a right argmax from a wrong one
    assert fused.correct == ref.correct and fused.tokens == ref.tokens
    torch.testing.assert_close(fused.loss_sum, ref.loss_sum, rtol=1e-6, atol=1e-5)
    # each example's own weighted loss sum and token count (the padding example's are 0)
    torch.testing.assert_close(fused.rows, ref.rows, rtol=1e-6, atol=1e-5)
    assert ref.rows[1].tolist() == [0.0, 0.0] and ref.rows[2, 1] == 0.25 * (T - 1)
    torch.testing.assert_close(ref.rows.sum(0), torch.stack([ref.loss_sum, ref.tokens]))
    with pytest.raises(ValueError, match="for evaluation"):
        losses.head_token_stats(hidden.requires_grad_(), weight, labels, accuracy=True)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_family_fuses_exactly_or_is_refused(family, tokens):
    model = tiny_model(family).requires_grad_(False)  # the backbone is frozen (the module freezes it)
    head = model.get_output_embeddings()
    why = head_problem(model)
    if family == "gemma2":  # soft-caps its logits after the head
        assert why == "the model transforms its logits after the head"
        assert not probe_matches(model, 128, torch.device("cpu"))  # the probe alone would catch it too
        return
    assert why is None, why
    before = head.weight.clone()
    assert probe_matches(model, 128, torch.device("cpu"))
    assert torch.equal(head.weight, before)  # the probe's scaling is undone exactly
    embedding = model.get_input_embeddings().weight
    trained = [p for p in model.parameters() if p.ndim == 1 and p is not head.weight and p is not embedding]
    for p in trained:
        p.requires_grad_(True)
    ref = losses.token_stats(model(input_ids=tokens).logits, tokens, accuracy=False).loss_sum
    ref_grads = torch.autograd.grad(ref, trained)
    with head_as_identity(head):
        hidden = model(input_ids=tokens).logits
    assert hidden.shape[-1] == head.in_features
    fused = losses.head_token_stats(hidden, head.weight, tokens, chunk=7).loss_sum
    fused_grads = torch.autograd.grad(fused, trained)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert model(input_ids=tokens).logits.shape[-1] == 128  # the head is itself again


def test_a_trainable_or_biased_head_is_refused():
    model = tiny_model("llama").requires_grad_(False)
    head = model.get_output_embeddings()
    assert head_problem(model) is None
    head.weight.requires_grad_(True)
    assert head_problem(model) == "the output head trains"
    head.weight.requires_grad_(False)
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features), requires_grad=False)
    assert head_problem(model) == "the output head has a bias"


def test_a_fit_with_the_fused_loss_equals_one_with_the_logits(tmp_path):
    """A whole MODULAR fit (three tasks, real Trainer): the same matrices and parameters either way."""
    runs = {}
    for fused in (True, False):
        module, dm, trainer = build("modular", tmp_path / str(fused), fused_loss=fused, epochs_per_task=1)
        trainer.fit(module, dm)
        ev = next(c for c in trainer.callbacks if isinstance(c, ContinualEvaluation))
        runs[fused] = (
            module.run_facts["fused_loss"],
            ev.loss_rows,
            dict(module.named_parameters()),
            ev.acc_rows,
        )
    assert runs[True][0] == "on"
    assert runs[False][0] == "off: model.fused_loss is false"
    for task, row in runs[True][1].items():
        assert row == pytest.approx(runs[False][1][task], rel=1e-5), task
        assert runs[True][3][task] == pytest.approx(runs[False][3][task], abs=1e-9), (
            task
        )  # the evaluation's argmax
    for name, p in runs[True][2].items():
        torch.testing.assert_close(p, runs[False][2][name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_regulariser_that_reads_the_logits_keeps_the_logits_path(tmp_path):
    module, dm, trainer = build(
        "naive", tmp_path, regularizers=[LwF(weight=1.0)], epochs_per_task=1, max_steps=6
    )
    trainer.fit(module, dm)
    assert module.run_facts["fused_loss"] == "off: model.regularizers ['lwf'] read the logits"
