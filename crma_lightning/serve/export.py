"""Export one task of a run for a colleague, and load such an export in one call.

``export_task(run, task, out_dir)`` writes, atomically, ``crma_export.json`` (the manifest),
``model/`` (the base with the task's LoRA merged by peft's ``merge_and_unload``, and the run's
tokenizer), ``crma/`` (modular runs) and ``peft_lora/`` (the LoRA alone); ``load_exported(out_dir)``
returns the model with CRMA on. docs/inference.md ("Export one task") describes each part.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from crma_lightning.adapters.injection import CRMAInjection
from crma_lightning.backbone.hub import plain_model
from crma_lightning.backbone.loading import DTYPES, load_backbone
from crma_lightning.core.atomic import atomic_directory, atomic_write_json
from crma_lightning.core.errors import ConfigError
from crma_lightning.data import load_tokenizer
from crma_lightning.evaluation import generation
from crma_lightning.evaluation.generation import Prompt
from crma_lightning.runs.checkpoint import load_crma, save_crma, save_lora
from crma_lightning.serve.model import ServedModel
from crma_lightning.serve.run import TrainedRun

MANIFEST = "crma_export.json"
FORMAT = "crma-lightning-export"
VERSION = 1
MODEL_DIR = "model"
CRMA_DIR = "crma"
PEFT_DIR = "peft_lora"


def export_task(run: TrainedRun, task: str, out_dir: str | os.PathLike) -> Path:
    """Write ``task``'s model from a loaded ``run`` to ``out_dir`` (replaced atomically if it exists).

    The base model is loaded afresh from the run's backbone config and the task's LoRA merged into
    it, so the run's own model is left untouched (this holds a second copy of the base in memory).
    A run on a 4-bit base (``quantize: nf4``) is merged into the full-precision base, as QLoRA
    adapters are: a merge into NF4 would round the LoRA's update away and write packed weights.
    """
    adapter = run.adapter_for(task)
    out_dir = Path(out_dir)
    backbone = run.info.backbone
    with atomic_directory(out_dir) as tmp:
        save_lora(run.model, adapter, tmp / PEFT_DIR)
        base = load_backbone(dataclasses.replace(backbone, quantize="none"))
        merged = PeftModel.from_pretrained(base, str(tmp / PEFT_DIR)).merge_and_unload()
        # a GGUF-loaded base is saved as a plain checkpoint (transformers refuses it otherwise)
        plain_model(merged).save_pretrained(str(tmp / MODEL_DIR), safe_serialization=True)
        if run.tokenizer is not None:
            run.tokenizer.save_pretrained(str(tmp / MODEL_DIR))
        if run.crma is not None:
            save_crma(
                run.crma, tmp / CRMA_DIR, extra={"task": task, "strategy": run.strategy, "tasks": run.tasks}
            )
        atomic_write_json(
            tmp / MANIFEST,
            {
                "format": FORMAT,
                "version": VERSION,
                "task": task,
                "strategy": run.strategy,
                "tasks": run.tasks,
                "source_run": str(Path(run.info.run_dir).resolve()),
                "base_model": backbone.label,
                "dtype": backbone.dtype,
                "trust_remote_code": backbone.trust_remote_code,
                "model_dir": MODEL_DIR,
                "crma_dir": CRMA_DIR if run.crma is not None else None,
                "peft_lora_dir": PEFT_DIR,
                "tokenizer": run.tokenizer is not None,
                "note": f"{MODEL_DIR}/ alone and {PEFT_DIR}/ on the base model are the task's model with "
                "CRMA off; crma_lightning.serve.load_exported(dir) puts CRMA back on",
            },
        )
    return out_dir


class ExportedModel(ServedModel):
    """A task's model as exported: base with the LoRA merged, CRMA re-injected (on by default)."""

    def __init__(
        self,
        manifest: dict[str, Any],
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase | None,
        crma: CRMAInjection | None,
    ) -> None:
        super().__init__(model, tokenizer, crma)
        self.manifest = manifest

    @property
    def task(self) -> str:
        return self.manifest["task"]

    def generate(
        self, prompt: Prompt | list[Prompt], crma: bool = True, batch_size: int = 8, **generate_kwargs: Any
    ):
        """Complete ``prompt`` (text or token ids, or a list of them); see ``TrainedRun.generate``."""
        single = generation.is_single(prompt)
        prompts = [prompt] if single else list(prompt)
        ids = [self.encode(p, f"prompt {i}") for i, p in enumerate(prompts)]
        out = [
            self.decode(row) for row in self.generate_ids(ids, self.task, crma, batch_size, **generate_kwargs)
        ]
        return out[0] if single else out


def load_exported(
    directory: str | os.PathLike, device: str | torch.device = "cpu", trust_remote_code: bool = False
) -> ExportedModel:
    """Load a directory written by :func:`export_task`: model, CRMA state (checked against the
    model's architecture) and tokenizer, in one call. An export whose manifest asks for
    ``trust_remote_code`` is refused unless ``trust_remote_code=True``: nothing in it runs otherwise."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ConfigError(
            f"{directory} is not an exported task (no {MANIFEST}); make one with "
            "`python train.py export --run <run dir> --task <task> --output <dir>`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is damaged ({e}); export the task again") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ConfigError(
            f"{path} is format {manifest.get('format')!r} v{manifest.get('version')}; this version reads "
            f"{FORMAT!r} v{VERSION}"
        )
    if manifest.get("trust_remote_code") and not trust_remote_code:
        raise ConfigError(
            f"{path} asks for trust_remote_code, which runs code shipped with the model; pass "
            "trust_remote_code=True only if you trust its author"
        )
    model_dir = directory / manifest["model_dir"]
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            dtype=DTYPES[manifest["dtype"]],
            trust_remote_code=bool(manifest["trust_remote_code"]),
        )
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{model_dir} cannot be loaded as a causal LM ({e}); export the task again"
        ) from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    crma = load_crma(model, directory / manifest["crma_dir"]) if manifest["crma_dir"] else None
    model.to(device)
    tokenizer = load_tokenizer(str(model_dir)) if manifest["tokenizer"] else None
    return ExportedModel(manifest, model, tokenizer, crma)
