"""Task metrics of answers, as continual-learning papers report them (docs/method.md §4).

Pure functions over tensors and strings: exact match of a greedy answer (:func:`normalize_answer`),
label-set accuracy (:func:`choice_log_likelihoods`: the label whose ``answer_prefix`` + label + eos
is most likely after the prompt), ROUGE-L F1 (torchmetrics'), routing by the lowest prompt loss
(:func:`prompt_labels`, :func:`route`); and :class:`Sums`, the float64 per-task sums over ranks.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.functional.text import rouge_score
from transformers.modeling_outputs import CausalLMOutputWithPast

from crma_lightning.core.losses import IGNORE_INDEX, token_losses
from crma_lightning.data.loading import pad

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

#: The KV cache's name in a forward's arguments and outputs: ``cache`` in recent transformers 5.x,
#: ``past_key_values`` before (the old name still works there, with a deprecation warning per call).
CACHE = (
    "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
)


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


@dataclasses.dataclass
class ChoiceScores:
    """What one forward of the prompts gives a classification batch (:func:`score_choices`)."""

    log_likelihood: Tensor
    """``(B, L)`` summed log-probability of each label's target after each prompt."""
    correct: Tensor
    """``(B, L)`` target tokens of each label that are the argmax prediction (token accuracy)."""
    answers: Tensor | None
    """``(B, budget)`` greedy continuation of each prompt (eos not cut), or None for budget 0."""
    prompt_loss: Tensor | None
    """``(B,)`` mean next-token loss over each prompt's own tokens (the routing score), or None."""


def _left_padded_labels(ids: Tensor, mask: Tensor) -> Tensor:
    """Labels that score a left-padded prompt on itself: padding and each row's first real token
    (which nothing predicts) ignored."""
    return ids.masked_fill((mask == 0) | (mask.cumsum(-1) == 1), IGNORE_INDEX)


@torch.no_grad()
def score_choices(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    choices: Sequence[Sequence[int]],
    pad_id: int,
    budget: int = 0,
    prompt_loss: bool = False,
    stop_at: int | None = None,
) -> ChoiceScores:
    """Score every label of a classification batch and answer it greedily, with one forward of the
    B prompts: their KV cache is repeated L times for one forward of the ``B * L`` label targets (a
    few tokens each: the cost is about one forward of the prompts whatever the label count), and
    continued ``budget - 1`` single-token steps for the greedy answer (``budget`` tokens, the first
    from the prompt's last logits). ``prompt_loss`` also keeps every prompt position's logits.
    ``stop_at`` (an eos id): generation stops once every row has produced it, and the rest of the
    answers is filled with it (what follows an eos is never scored); leave it None where every
    rank must run the same forward passes (a sharded model).

    Prompts are left-padded and targets right-padded; position ids count real tokens only, so
    padding changes nothing (tests compare with unpadded sequences scored whole, and with greedy
    decoding one token at a time without a cache).
    """
    device = next(model.parameters()).device
    prompt, prompt_mask = (t.to(device) for t in pad(list(prompts), pad_id, "left"))  # (B, Tp)
    choice, choice_mask = (t.to(device) for t in pad(list(choices), pad_id, "right"))  # (L, Tc)
    (b, _), (n, tc) = prompt.shape, choice.shape
    start = prompt_mask.sum(1)  # real prompt tokens: the position of the first new token
    out = model(
        input_ids=prompt,
        attention_mask=prompt_mask,
        position_ids=(prompt_mask.cumsum(-1) - 1).clamp_min(0),
        use_cache=True,
        logits_to_keep=0 if prompt_loss else 1,
    )
    last = out.logits[:, -1].float()  # (B, V): predicts a label's first token, and the answer's
    losses_ = (
        per_example(out.logits, _left_padded_labels(prompt, prompt_mask))["mean"] if prompt_loss else None
    )
    cache = getattr(out, CACHE)

    # The labels, from a copy of the prompts' cache repeated per label
    # (row b * L + l: label l after prompt b).
    ids, scored = choice.repeat(b, 1), choice_mask.repeat(b, 1).bool()  # (B * L, Tc)
    first = last.log_softmax(-1).repeat_interleave(n, 0)  # (B * L, V)
    logp = [first.gather(1, ids[:, :1])[:, 0]]
    hit = [first.argmax(-1) == ids[:, 0]]
    if tc > 1:
        repeated = copy.deepcopy(cache)
        repeated.batch_repeat_interleave(n)
        logits = model(
            input_ids=ids[:, :-1],
            attention_mask=torch.cat([prompt_mask.repeat_interleave(n, 0), scored[:, :-1].long()], dim=1),
            position_ids=start.repeat_interleave(n)[:, None] + torch.arange(tc - 1, device=device),
            use_cache=True,
            **{CACHE: repeated},
        ).logits.float()  # (B * L, Tc - 1, V): position j predicts target token j + 1
        rest = logits.log_softmax(-1)
        logp += list(rest.gather(2, ids[:, 1:, None])[..., 0].unbind(1))
        hit += list((rest.argmax(-1) == ids[:, 1:]).unbind(1))
    logp_t, hit_t = torch.stack(logp, 1), torch.stack(hit, 1)  # (B * L, Tc)
    log_likelihood = (logp_t * scored).sum(1).view(b, n)
    correct = (hit_t & scored).sum(1).view(b, n).float()

    # The greedy answer, continuing the prompts' own cache one token at a time.
    answers = None
    if budget > 0:
        token = last.argmax(-1)  # (B,)
        steps = [token]
        mask = prompt_mask
        ended = token == stop_at if stop_at is not None else None
        for k in range(1, budget):
            if ended is not None and bool(ended.all()):
                steps += [torch.full_like(token, stop_at)] * (budget - k)
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=(start + k - 1)[:, None],
                use_cache=True,
                **{CACHE: cache},
            )
            cache = getattr(step, CACHE)
            token = step.logits[:, -1].argmax(-1)
            steps.append(token)
            if ended is not None:
                ended |= token == stop_at
        answers = torch.stack(steps, 1)
    return ChoiceScores(log_likelihood, correct, answers, losses_)


@torch.no_grad()
def choice_log_likelihoods(
    model: nn.Module, prompts: Sequence[Sequence[int]], choices: Sequence[Sequence[int]], pad_id: int
) -> Tensor:
    """``(B, L)`` summed log-probability of each of the L ``choices`` (token ids) after each of the
    B ``prompts`` (:func:`score_choices` without the answers)."""
    return score_choices(model, prompts, choices, pad_id).log_likelihood


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
