"""crma-lightning: continual fine-tuning of LLMs with CRMA (arXiv 2606.00382) on PyTorch Lightning."""

from crma_lightning.config import ConfigError, CRMAConfig, LoRAConfig
from crma_lightning.injection import CRMAInjection, inject_crma
from crma_lightning.projection import birkhoff, diagnostics, project, sinkhorn

__all__ = [
    "CRMAConfig",
    "CRMAInjection",
    "ConfigError",
    "LoRAConfig",
    "birkhoff",
    "diagnostics",
    "inject_crma",
    "project",
    "sinkhorn",
]
__version__ = "0.1.0"
