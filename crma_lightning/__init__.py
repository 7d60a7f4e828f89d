"""crma-lightning: continual fine-tuning of LLMs with CRMA (arXiv 2606.00382) on PyTorch Lightning."""

import logging

from crma_lightning import _paths

_paths.install()

from crma_lightning.adapters.config import CRMAConfig, LoRAConfig  # noqa: E402
from crma_lightning.adapters.injection import CRMAInjection, inject_crma  # noqa: E402
from crma_lightning.adapters.projection import birkhoff, diagnostics, project, sinkhorn  # noqa: E402
from crma_lightning.core.errors import ConfigError  # noqa: E402

# bitsandbytes (the `qlora` extra; peft imports it whenever it is installed) asks the `kernels`
# package for an optional CPU kernel on import; each logs a warning on every run when it cannot be
# had (no package, or offline: "Skipping publisher trust check"), and bitsandbytes' own kernel runs.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("kernels._internals.hf_hub").setLevel(logging.ERROR)


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
