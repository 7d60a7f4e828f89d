"""crma-lightning: continual fine-tuning of LLMs with CRMA (arXiv 2606.00382) on PyTorch Lightning."""

import logging

from crma_lightning.config import ConfigError, CRMAConfig, LoRAConfig
from crma_lightning.injection import CRMAInjection, inject_crma
from crma_lightning.projection import birkhoff, diagnostics, project, sinkhorn

# bitsandbytes (the optional `qlora` extra; peft imports it whenever it is installed) tries to fetch
# an optional CPU kernel from the Hugging Face hub through the `kernels` package on import and warns
# on every run when that package is absent. Its own fallback kernel is what runs, and nothing here
# downloads code at run time, so the warning only says something irrelevant to every user.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


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
