"""Prompts in, completions out: encoding, left-padded batches, ``generate``, per-prompt loss.

Used by :class:`crma_lightning.serve.model.ServedModel`, the base of a loaded run and of an
exported model; which LoRA and whether CRMA is on is the caller's business. A prompt is text (needs
the run's tokenizer) or a list of token ids (runs on synthetic tasks have no tokenizer).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from crma_lightning.core.errors import ConfigError
from crma_lightning.core.losses import labels_from_mask, sequence_losses
from crma_lightning.data.loading import pad

Prompt = str | Sequence[int]

DEFAULT_MAX_NEW_TOKENS = 32
"""Tokens generated per prompt unless ``max_new_tokens`` (or ``max_length``) is given."""


def is_single(prompt: Any) -> bool:
    """Whether ``prompt`` is one prompt (text or token ids) rather than a list of prompts."""
    return isinstance(prompt, str) or (
        isinstance(prompt, Sequence) and len(prompt) > 0 and all(isinstance(t, int) for t in prompt)
    )


def encode(
    prompt: Prompt, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, where: str = "prompt"
) -> list[int]:
    """Token ids of ``prompt``, encoded as the training data was (the tokenizer's special tokens)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ConfigError(
                f"{where} is text, but this run has no tokenizer (data.tokenizer is unset: synthetic tasks); "
                "give token ids instead, e.g. [5, 17, 9]"
            )
        ids = list(tokenizer(prompt).input_ids)
    elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    else:
        raise ConfigError(
            f"{where} must be a string or a list of token ids, got {type(prompt).__name__} {prompt!r:.60}"
        )
    if not ids:
        raise ConfigError(f"{where} is empty: give at least one token of text")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ConfigError(
            f"{where} has token ids {bad[:3]} outside the model's vocabulary 0..{vocab_size - 1}"
        )
    return ids


def decode(ids: list[int], tokenizer: PreTrainedTokenizerBase | None) -> str | list[int]:
    return ids if tokenizer is None else tokenizer.decode(ids, skip_special_tokens=True)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    pad_id: int,
    eos_id: int | None,
    batch_size: int = 8,
    **generate_kwargs: Any,
) -> list[list[int]]:
    """New token ids for every prompt (eos and what follows it removed), in input order.

    ``generate_kwargs`` are transformers generation arguments (``max_new_tokens``, ``do_sample``,
    ``temperature``, ``top_p``, ...). Batches are left-padded, as decoder-only generation needs.
    """
    config = copy.deepcopy(model.generation_config)
    # The tokenizer's ids, not the (possibly random-init) model config's defaults.
    config.pad_token_id, config.eos_token_id = pad_id, eos_id
    if "max_new_tokens" not in generate_kwargs and "max_length" not in generate_kwargs:
        generate_kwargs["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    try:
        config.update(**generate_kwargs)
        config.validate()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"bad generation arguments {generate_kwargs}: {e}") from None
    device = model_device(model)
    out: list[list[int]] = []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo : lo + batch_size]
        input_ids, mask = (t.to(device) for t in pad(chunk, pad_id, "left"))
        generated = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
        for row in generated[:, input_ids.shape[1] :].tolist():  # (B, new tokens)
            if eos_id is not None and eos_id in row:
                row = row[: row.index(eos_id)]
            out.append(row)
    return out


@torch.no_grad()
def prompt_losses(model: nn.Module, prompts: list[list[int]], *, pad_id: int, batch_size: int = 16) -> Tensor:
    """Mean next-token loss of each prompt on itself, ``(N,)`` float32; NaN for 1-token prompts.

    Position t predicts token t + 1; right padding keeps the real tokens' logits exact (causal).
    """
    device = model_device(model)
    out = []
    for lo in range(0, len(prompts), batch_size):
        input_ids, mask = (t.to(device) for t in pad(prompts[lo : lo + batch_size], pad_id, "right"))
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        out.append(sequence_losses(logits, labels_from_mask(input_ids, mask)))
    return torch.cat(out).cpu()
