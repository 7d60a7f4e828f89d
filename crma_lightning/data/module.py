"""The continual-learning DataModule: a sequence of tasks, one task per stage of one ``fit``.

Task ``k`` is trained during epochs ``[k * epochs_per_task, (k + 1) * epochs_per_task)``;
``train_dataloader()`` is asked again at every epoch and hands out the current task. Every task also
keeps two fixed held-out sets, validation (scored after every task during ``fit``) and test
(:meth:`holdout_batches` with ``split="test"``), from files or cut by the seed (:mod:`.split`).
"""

from __future__ import annotations

import math

import datasets
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from crma_lightning.backbone.hub import is_offline
from crma_lightning.core.clock import TaskClock
from crma_lightning.core.errors import ConfigError
from crma_lightning.data.loading import (
    PadCollator,
    ResumableDataLoader,
    ShardedBatchSampler,
    sharded_batches,
    striped_batches,
)
from crma_lightning.data.replay import MixedRows, Replay, ReplayBatchSampler, joint_slice
from crma_lightning.data.replay import buffer as replay_buffer_of
from crma_lightning.data.sources import TaskSource, find_source
from crma_lightning.data.split import task_sets
from crma_lightning.data.synthetic import FIRST_TOKEN
from crma_lightning.data.tasks import TaskSpec, validate_data_config
from crma_lightning.data.tokenize import load_tokenizer


class ContinualDataModule(LightningDataModule):
    """A sequence of tasks for continual fine-tuning, each with a training set and a fixed holdout set.

    Args:
        tasks: The tasks in training order.
        tokenizer: Tokenizer name or local folder for ``AutoTokenizer.from_pretrained``, ``tiny`` for the
            one shipped in the package, or ``path/to/model.gguf``. Needed only for non-synthetic tasks.
        max_length: Tokens per example: synthetic sequence length, text block length, truncation length.
        train_size: Training examples per task (fewer, with a warning, if the source runs out).
        holdout_size: Validation examples per task (the holdout the matrices use during fit), set
            aside before training examples are drawn (at most this many from a validation file).
        test_size: Test examples per task (default: ``holdout_size``; 0: no test set), cut from the
            records after the training ones (at most this many from a test file; a synthetic
            task draws its own). Validation and training sets do not depend on it.
        batch_size: Training examples per batch on each rank.
        eval_batch_size: Examples per batch in ``holdout_batches``.
        epochs_per_task: Epochs spent on each task before moving to the next.
        seed: Seeds the holdout/train split, the per-epoch shuffles and synthetic data.
        synthetic_vocab: Size of the token range a synthetic task permutes
            (ids ``3 .. 3 + synthetic_vocab - 1``).
        synthetic_jump: Probability that a synthetic sequence jumps to a random token instead of
            following the permutation; > 0 keeps holdout sequences distinct from training ones.
        num_workers: DataLoader worker processes for training batches.
        replay: mix examples of finished tasks into later tasks' batches (``crma_lightning.data.replay``).
        multitask: joint training, the reference upper bound: the training examples of all tasks
            are pooled and shuffled once, and stage k trains on the k-th of ``len(tasks)`` equal
            slices of the pool (every stage sees every task); each example is trained on as often
            as in the sequential run. Evaluation after each stage is as usual.
        sources: task sources (``crma_lightning.data.sources.TaskSource``, given as
            ``{class_path: ..., init_args: ...}``) that claim a task's ``source`` before the
            registered and built-in ones.
        eval_tasks: tasks that are evaluated, never trained (same spec format as ``tasks``): scored
            after the base and after every task as extra columns of the matrices (general drift),
            never in the task clock. Their validation and test sets are cut as a trained task's.
    """

    def __init__(
        self,
        tasks: list[TaskSpec],
        tokenizer: str | None = None,
        max_length: int = 128,
        train_size: int = 500,
        holdout_size: int = 100,
        test_size: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        epochs_per_task: int = 1,
        seed: int = 0,
        synthetic_vocab: int = 64,
        synthetic_jump: float = 0.2,
        num_workers: int = 0,
        replay: Replay | None = None,
        multitask: bool = False,
        sources: list[TaskSource] | None = None,
        eval_tasks: list[TaskSpec] | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.train_size = train_size
        self.holdout_size = holdout_size
        self.test_size = test_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.epochs_per_task = epochs_per_task
        self.seed = seed
        self.synthetic_vocab = synthetic_vocab
        self.synthetic_jump = synthetic_jump
        self.num_workers = num_workers
        self.replay = replay
        self.multitask = multitask
        self.sources = sources
        self.tasks, self.eval_tasks = validate_data_config(self, tasks, eval_tasks or [])
        self._hf_tokenizer: PreTrainedTokenizerBase | None = None
        self._train: dict[str, datasets.Dataset] = {}
        self._holdout: dict[str, datasets.Dataset] = {}
        self._test: dict[str, datasets.Dataset] = {}

    # -- task schedule -----------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def eval_task_names(self) -> list[str]:
        """The evaluation-only tasks (``eval_tasks``): never trained, scored after every task."""
        return [t.name for t in self.eval_tasks]

    @property
    def evaluated_task_names(self) -> list[str]:
        """The matrices' columns: the training tasks in order, then the evaluation-only ones."""
        return self.task_names + self.eval_task_names

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def total_epochs(self) -> int:
        return self.num_tasks * self.epochs_per_task

    @property
    def clock(self) -> TaskClock:
        """Which task each epoch trains (the one task clock every module asks)."""
        return TaskClock(tuple(self.task_names), self.epochs_per_task)

    def task_index_at_epoch(self, epoch: int) -> int:
        """Index of the task trained in ``epoch``; epochs past the schedule stay on the last task."""
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0, got {epoch}")
        return self.clock.task_index(epoch)

    @property
    def test_count(self) -> int:
        """Test examples asked for per task (``test_size``, default ``holdout_size``)."""
        return self.holdout_size if self.test_size is None else self.test_size

    def source_of(self, task: TaskSpec) -> TaskSource:
        """The source that owns ``task`` (``data.sources`` first, then the registered and built-in ones)."""
        return find_source(task.source, self.sources or ())

    def spec(self, task: str) -> TaskSpec:
        """The spec of ``task`` (after :meth:`setup`, a classification task's label set is filled in)."""
        self._require(task)
        return self._specs[self.evaluated_task_names.index(task)]

    @property
    def _specs(self) -> list[TaskSpec]:
        return self.tasks + self.eval_tasks

    # -- tokens ------------------------------------------------------------------------------
    @property
    def hf_tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The loaded tokenizer (lazily), or None when ``data.tokenizer`` is not set."""
        if self._hf_tokenizer is None and self.tokenizer is not None:
            self._hf_tokenizer = load_tokenizer(self.tokenizer)
        return self._hf_tokenizer

    @property
    def pad_token_id(self) -> int:
        tokenizer = self.hf_tokenizer
        return 0 if tokenizer is None else tokenizer.pad_token_id

    @property
    def vocab_size(self) -> int:
        """Token ids the data can contain: ``len(tokenizer)``, or ``3 + synthetic_vocab`` without a
        tokenizer."""
        tokenizer = self.hf_tokenizer
        return FIRST_TOKEN + self.synthetic_vocab if tokenizer is None else len(tokenizer)

    # -- building ----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download network sources' data and the tokenizer into the local caches (runs once per node)."""
        if is_offline():
            return
        if self.tokenizer is not None:
            load_tokenizer(self.tokenizer)  # fills the hub cache that setup() reads on every rank
        for i, task in enumerate(self._specs):
            source = self.source_of(task)
            if source.network:
                for location in source.splits(task).values():
                    source.load(i, task, location)

    def setup(self, stage: str | None = None) -> None:
        """Tokenise every task into validation, training and test sets; later calls do nothing."""
        for i, task in enumerate(self._specs):
            if task.name not in self._train:
                # An evaluation-only task is cut as a trained one (index after the training tasks);
                # its training set is never used.
                spec, *sets = task_sets(self, i, task)
                specs = self.tasks if i < len(self.tasks) else self.eval_tasks
                specs[i if i < len(self.tasks) else i - len(self.tasks)] = spec
                self._holdout[task.name], self._train[task.name], self._test[task.name] = sets

    def split_size(self, task: str, split: str = "validation") -> int:
        """Examples in the ``validation`` (holdout) or ``test`` set of ``task``."""
        return len(self.held_out(task, split))

    def held_out(self, task: str, split: str = "validation") -> datasets.Dataset:
        """The tokenised ``validation`` (holdout) or ``test`` set of ``task``."""
        self._require(task)
        if split not in ("validation", "test"):
            raise ConfigError(f"split must be 'validation' or 'test', got {split!r}")
        return (self._holdout if split == "validation" else self._test)[task]

    def _require(self, task: str) -> None:
        if task not in self.evaluated_task_names:
            raise ConfigError(f"unknown task {task!r}; the tasks are {self.evaluated_task_names}")
        self.setup()

    # -- loaders -----------------------------------------------------------------------------
    def train_dataloader(self) -> ResumableDataLoader:
        """The current epoch's task, this rank's shard (see :mod:`crma_lightning.data.loading`)."""
        trainer = self.trainer
        if trainer is None:
            return self.train_dataloader_for_epoch(0)
        epoch_bound = trainer.max_epochs is None or trainer.max_epochs < 0 or trainer.max_epochs > 1
        if self.total_epochs > 1 and epoch_bound and trainer.reload_dataloaders_every_n_epochs != 1:
            raise ConfigError(
                "trainer.reload_dataloaders_every_n_epochs must be 1 with several task epochs "
                f"({self.num_tasks} tasks x data.epochs_per_task={self.epochs_per_task}): the training data "
                "changes with the epoch"
            )
        return self.train_dataloader_for_epoch(trainer.current_epoch, trainer.global_rank, trainer.world_size)

    def train_dataloader_for_epoch(
        self, epoch: int, rank: int = 0, world_size: int = 1
    ) -> ResumableDataLoader:
        """Training batches of ``epoch``'s task for ``rank`` of ``world_size``, shuffled by
        ``(seed, epoch)``."""
        k = self.task_index_at_epoch(epoch)
        task = self.task_names[k]
        self._require(task)
        data = self._train[task]
        collate = PadCollator(self.pad_token_id)
        if self.multitask:
            data = MixedRows(
                [], {j: self._train[t] for j, t in enumerate(self.task_names)}, self.joint_slice(k)
            )
        if self.replay is None or k == 0:
            sampler = ShardedBatchSampler(len(data), self.batch_size, self.seed, epoch, rank, world_size)
            return ResumableDataLoader(data, sampler, collate, task, self.num_workers)
        kept = self.replay_buffer(k)
        replayed = self.replay.replayed(self.batch_size)
        sampler = ReplayBatchSampler(
            len(data), self.batch_size, len(kept), replayed, self.seed, epoch, rank, world_size
        )
        rows = MixedRows(data, {j: self._train[self.task_names[j]] for j in range(k)}, kept)
        return ResumableDataLoader(rows, sampler, collate, task, self.num_workers, replay_buffer=kept)

    def joint_slice(self, stage: int) -> list[tuple[int, int]]:
        """``data.multitask``: the ``(task index, example index)`` pairs stage ``stage`` trains on."""
        self.setup()
        return joint_slice([len(self._train[t]) for t in self.task_names], stage, self.seed)

    def replay_buffer(self, task_index: int) -> list[tuple[int, int]]:
        """``(task index, example index)`` pairs of the replay buffer while task ``task_index`` trains."""
        if self.replay is None:
            return []
        self.setup()
        return replay_buffer_of(
            self.replay, [len(self._train[t]) for t in self.task_names[:task_index]], self.seed
        )

    def num_train_examples(self, task: str) -> int:
        """Examples in the training set of ``task``."""
        self._require(task)
        return len(self._train[task])

    def train_batches_per_epoch(self, task_index: int, world_size: int = 1) -> int:
        """Batches each rank yields in one epoch of task ``task_index``."""
        task = self.task_names[task_index]
        self._require(task)
        if self.multitask:
            return math.ceil(len(self.joint_slice(task_index)) / (self.batch_size * world_size))
        per_batch = self.batch_size
        if self.replay is not None and task_index > 0:
            per_batch -= self.replay.replayed(self.batch_size)  # the rest of each batch is replay
        return math.ceil(len(self._train[task]) / (per_batch * world_size))

    def holdout_batches(
        self,
        task: str,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int | None = None,
        split: str = "validation",
        by_length: bool = True,
    ) -> list[dict[str, Tensor]]:
        """The validation (holdout) or ``test`` set of ``task``, ordered by length (longest first;
        ``by_length=False``: in stored order), examples ``rank::world_size``, batched
        (:func:`~crma_lightning.data.loading.sharded_batches`: every rank the same batch sizes,
        ``example_weight`` 0 on padding examples, ``target`` for classification)."""
        data = self.held_out(task, split)
        size = batch_size or self.eval_batch_size
        return sharded_batches(data, size, rank, world_size, self.pad_token_id, by_length=by_length)

    def train_batches(
        self,
        task: str,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Tensor]]:
        """The training set of ``task`` in a fixed order (not the epoch's shuffle), batched by
        ``batch_size`` (default ``data.batch_size``), global batches ``rank::world_size``, at most
        ``limit`` global batches: the same batches whatever the number of ranks (EWC's Fisher)."""
        self._require(task)
        return striped_batches(
            self._train[task], batch_size or self.batch_size, rank, world_size, self.pad_token_id, limit
        )

    def train_examples(
        self,
        task: str,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Tensor]]:
        """The first ``limit`` (default all) training examples of ``task``, in the training set's
        stored order (records shuffled by the seed, not by epoch), sharded and batched as
        :meth:`holdout_batches`: the same examples whatever the world size, each once. For
        statistics of a task's data (routing); training itself uses :meth:`train_dataloader`."""
        self._require(task)
        data = self._train[task]
        if limit is not None and limit < len(data):
            data = data.select(range(limit))
        return sharded_batches(data, batch_size or self.eval_batch_size, rank, world_size, self.pad_token_id)

    def _holdout_loaders(self, split: str) -> list[DataLoader]:
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == "fit":
            # During fit the evaluation callback scores every task at task boundaries; a per-epoch
            # validation loop would only repeat that work.
            return []
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return [
            DataLoader(self.holdout_batches(task, rank, world, split=split), batch_size=None, shuffle=False)
            for task in self.task_names
        ]

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per task over its validation set (rank shard), for ``validate``; empty during fit."""
        return self._holdout_loaders("validation")

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per task over its test set (rank shard), for the ``test`` subcommand."""
        return self._holdout_loaders("test")
