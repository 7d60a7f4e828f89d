"""Task metrics of answers, as continual-learning papers report them (docs/method.md §4).

Pure functions over tensors and strings, plus the one summing metric the evaluation reduces with:

- **exact match**: a greedy answer equals its reference after :func:`normalize_answer` (whitespace
  trimmed, case folded), as the O-LoRA code scores classification;
- **label-set accuracy**: the label whose target tokens (``answer_prefix`` + label + eos) get the
  highest *summed* log-probability after the prompt (:func:`choice_log_likelihoods`; the sum is the
  log-probability of the whole answer, which greedy decoding approximates; eos ends it, so a label
  that is a prefix of another is not favoured): no generation and no parsing;
- **ROUGE-L** F1 of a greedy answer against its reference (``torchmetrics``' implementation);
- **routing without a task id**: the candidate adapter with the lowest mean next-token loss on the
  prompt tokens only (:func:`prompt_labels`, :func:`route`); causal attention keeps the answer
  out of the prompt positions' logits, so the answer cannot leak into the choice.

:class:`Sums` is a torchmetrics ``Metric`` holding float64 sums per task, so ranks add up once
(DDP, FSDP) and a single process gets exactly the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.functional.text import rouge_score

from crma_lightning.data.loading import pad
from crma_lightning.losses import IGNORE_INDEX, token_losses

QUANTITIES = (
    "loss_sum",  # summed next-token loss over scored tokens
    "tokens",  # scored tokens
    "correct",  # scored tokens whose argmax prediction is right
    "examples",  # examples (weighted: padding examples count 0)
    "exact",  # examples whose greedy answer matches exactly
    "label_correct",  # examples whose best-scored label is theirs
    "rouge",  # summed ROUGE-L F1 of the greedy answers
    "routed_right",  # examples routed to their own task's adapter (no task id)
    "routable",  # examples whose own task was among the routing candidates
)
"""The columns of :class:`Sums`, in order."""
Q = {name: i for i, name in enumerate(QUANTITIES)}


def normalize_answer(text: str) -> str:
    """An answer as exact match compares it: surrounding whitespace removed, case folded."""
    return text.strip().casefold()


def exact_matches(answers: Sequence[str], references: Sequence[str]) -> Tensor:
    """``(N,)`` float64: 1.0 where the normalised answer equals the normalised reference."""
    return torch.tensor(
        [float(normalize_answer(a) == normalize_answer(r)) for a, r in zip(answers, references, strict=True)],
        dtype=torch.float64,
    )


def rouge_l_sum(answers: Sequence[str], references: Sequence[str]) -> float:
    """Summed ROUGE-L F1 of ``answers`` against ``references`` (torchmetrics; 0.0 for none)."""
    if not answers:
        return 0.0
    mean = rouge_score(list(answers), list(references), rouge_keys="rougeL")["rougeL_fmeasure"]
    return float(mean) * len(answers)


def prompt_lengths(labels: Tensor, attention_mask: Tensor, route_tokens: int) -> Tensor:
    """``(B,)`` prompt tokens of each example: the unscored tokens before its answer (prompt/response
    and classification examples), or for a text block, whose every token is scored, its first
    ``route_tokens`` tokens."""
    answer_start = (labels == IGNORE_INDEX).long().cumprod(1).sum(1)  # leading unscored tokens
    length = attention_mask.sum(1)
    return torch.where(answer_start > 0, answer_start.clamp_max(length), length.clamp_max(route_tokens))


def prompt_labels(input_ids: Tensor, prompt_length: Tensor) -> Tensor:
    """Labels that score only the prompt: ``input_ids`` before ``prompt_length (B,)``, else ignored."""
    position = torch.arange(input_ids.shape[1], device=input_ids.device)
    return input_ids.masked_fill(position[None, :] >= prompt_length[:, None], IGNORE_INDEX)


def per_example(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Per example of ``logits (B, T, V)`` and unshifted ``labels (B, T)``, each ``(B,)`` float32:
    summed next-token loss, scored tokens, correct argmax predictions, and the mean loss (NaN with
    nothing scored)."""
    t = token_losses(logits, labels)
    loss_sum, tokens = (t.nll * t.scored).sum(1), t.scored.sum(1)
    return {
        "loss_sum": loss_sum,
        "tokens": tokens,
        "correct": (t.correct * t.scored).sum(1),
        "mean": loss_sum / tokens,
    }


def route(prompt_losses: Tensor) -> Tensor:
    """``(N,)`` index of the candidate with the lowest prompt loss in each row of ``(N, K)``; a row
    with no finite loss (a 1-token prompt) goes to the last candidate, the latest task."""
    best = torch.nan_to_num(prompt_losses, nan=float("inf")).argmin(dim=1)
    scorable = torch.isfinite(prompt_losses).any(dim=1)
    return torch.where(scorable, best, torch.full_like(best, prompt_losses.shape[1] - 1))


@torch.no_grad()
def choice_log_likelihoods(
    model: nn.Module, prompts: Sequence[Sequence[int]], choices: Sequence[Sequence[int]], pad_id: int
) -> Tensor:
    """``(B, L)`` summed log-probability of each of the L ``choices`` (token ids) after each of the B
    ``prompts``, in one forward over the ``B * L`` sequences.

    Prompts are left-padded and choices right-padded, so every choice starts at the same position
    and only the last ``T_choice + 1`` positions' logits are computed (``logits_to_keep``); position
    ids count real tokens only, so padding changes nothing (tests compare with unpadded sequences).
    """
    device = next(model.parameters()).device
    prompt, prompt_mask = pad(list(prompts), pad_id, "left")  # (B, Tp)
    choice, choice_mask = pad(list(choices), pad_id, "right")  # (L, Tc)
    (b, tp), (n, tc) = prompt.shape, choice.shape
    ids = torch.cat([prompt[:, None].expand(b, n, tp), choice[None].expand(b, n, tc)], dim=-1).reshape(
        b * n, tp + tc
    )
    mask = torch.cat([prompt_mask[:, None].expand(b, n, tp), choice_mask[None].expand(b, n, tc)], -1).reshape(
        b * n, -1
    )
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=tc + 1
    ).logits  # (B * L, Tc + 1, V): the last prompt position predicts the choice's first token
    targets = choice.masked_fill(choice_mask == 0, IGNORE_INDEX).to(device)  # (L, Tc)
    labels = torch.cat([torch.full((n, 1), IGNORE_INDEX, device=device), targets], dim=1)  # (L, Tc + 1)
    t = token_losses(logits, labels.repeat(b, 1), accuracy=False)  # nll (B * L, Tc)
    return -(t.nll * t.scored).sum(1).view(b, n)


class Sums(Metric):
    """Float64 sums of :data:`QUANTITIES` per task, ``(tasks, len(QUANTITIES))``, summed over ranks."""

    full_state_update = False

    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.add_state(
            "value", torch.zeros(tasks, len(QUANTITIES), dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, task: int, **quantities: Tensor | float) -> None:
        """Add each named quantity (a tensor is summed first) to task ``task``'s row."""
        for name, v in quantities.items():
            self.value[task, Q[name]] += v.double().sum() if isinstance(v, Tensor) else float(v)

    def compute(self) -> Tensor:
        return self.value


def ratio(num: float, den: float) -> float:
    """``num / den``, NaN for an empty denominator (a metric with nothing to average)."""
    return num / den if den > 0 else float("nan")
