"""A model ready for inference: one ``logits`` and one batched ``generate`` for runs and exports.

:class:`ServedModel` holds a transformers model, its tokenizer (None for runs on synthetic tasks)
and its CRMA blocks (None without CRMA). :meth:`ServedModel.serving` sets up the forward pass for a
task: here it switches CRMA on or off; a loaded run (``serve.run.TrainedRun``) also makes the
task's LoRA the active one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from crma_lightning.adapters.injection import CRMAInjection
from crma_lightning.evaluation import generation
from crma_lightning.evaluation.generation import Prompt


class ServedModel:
    """A model, its tokenizer and its CRMA blocks, for logits, generation and prompt scoring."""

    def __init__(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, crma: CRMAInjection | None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.crma = crma

    @contextmanager
    def serving(self, task: str | None, crma: bool = True) -> Iterator[None]:
        """The forward pass as ``task`` would be served, CRMA on or off; restores the previous state."""
        previous = self.crma.enabled if self.crma is not None else None
        if self.crma is not None:
            self.crma.enabled = crma
        try:
            yield
        finally:
            if self.crma is not None:
                self.crma.enabled = previous

    @property
    def device(self) -> torch.device:
        return generation.model_device(self.model)

    @property
    def pad_id(self) -> int:
        return 0 if self.tokenizer is None else self.tokenizer.pad_token_id

    @property
    def eos_id(self) -> int | None:
        return None if self.tokenizer is None else self.tokenizer.eos_token_id

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    def encode(self, prompt: Prompt, where: str = "prompt") -> list[int]:
        return generation.encode(prompt, self.tokenizer, self.vocab_size, where)

    @torch.no_grad()
    def logits(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        task: str | None = None,
        crma: bool = True,
    ) -> Tensor:
        """``(B, T, V)`` logits of the model serving ``task``."""
        mask = None if attention_mask is None else attention_mask.to(self.device)
        with self.serving(task, crma):
            return self.model(
                input_ids=input_ids.to(self.device), attention_mask=mask, use_cache=False
            ).logits

    def generate_ids(
        self,
        ids: Sequence[list[int]],
        task: str | None,
        crma: bool = True,
        batch_size: int = 8,
        **generate_kwargs: Any,
    ) -> list[list[int]]:
        """New token ids for each tokenised prompt, as ``task`` (see :func:`generation.generate_ids`)."""
        with self.serving(task, crma):
            return generation.generate_ids(
                self.model,
                list(ids),
                pad_id=self.pad_id,
                eos_id=self.eos_id,
                batch_size=batch_size,
                **generate_kwargs,
            )

    def prompt_losses(
        self, ids: Sequence[list[int]], task: str | None, crma: bool = True, batch_size: int = 16
    ) -> Tensor:
        """``(N,)`` mean next-token loss of each tokenised prompt on itself, as ``task``."""
        with self.serving(task, crma):
            return generation.prompt_losses(self.model, list(ids), pad_id=self.pad_id, batch_size=batch_size)

    def decode(self, ids: list[int]) -> str | list[int]:
        return generation.decode(ids, self.tokenizer)
