"""Continual-learning data: task specs, sources, tokenisation, batching and the DataModule.

One file per concern:

- :mod:`.spec`: ``TaskSpec``, one task;
- :mod:`.tasks`: the validation of a task list;
- :mod:`.sources`: task sources, one ``TaskSource`` class per kind (synthetic, shipped corpus
  domains, local files and folders, hub datasets; ``register`` or ``data.sources`` add more);
- :mod:`.tokenize`: tokenizers and tokenisation (text blocks, prompt/response, synthetic tasks);
- :mod:`.split`: the seeded holdout/train split by source record;
- :mod:`.loading`: padding, the sharded per-epoch sampler, the resumable training loader;
- :mod:`.module`: ``ContinualDataModule``, one task per stage of one ``fit``.
"""

from crma_lightning.core.losses import IGNORE_INDEX
from crma_lightning.data.loading import PadCollator, ResumableDataLoader, ShardedBatchSampler, pad
from crma_lightning.data.module import ContinualDataModule
from crma_lightning.data.replay import Replay
from crma_lightning.data.sources import CORPUS_PREFIX, FILE_BUILDERS, TaskSource, register, source_kind
from crma_lightning.data.spec import TaskSpec
from crma_lightning.data.tokenize import TINY_TOKENIZER, load_tokenizer, tiny_tokenizer_path

__all__ = [
    "CORPUS_PREFIX",
    "FILE_BUILDERS",
    "IGNORE_INDEX",
    "TINY_TOKENIZER",
    "ContinualDataModule",
    "PadCollator",
    "Replay",
    "ResumableDataLoader",
    "ShardedBatchSampler",
    "TaskSource",
    "TaskSpec",
    "load_tokenizer",
    "pad",
    "register",
    "source_kind",
    "tiny_tokenizer_path",
]
