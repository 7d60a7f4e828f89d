"""LightningCLI for continual fine-tuning: one ``fit`` runs the whole task sequence.

Links shared values once (task names and seed from ``data`` to ``model``; ``trainer.max_epochs``
from the tasks and ``data.epochs_per_task``), sets the trainer defaults the task loop depends on and
adds the callbacks the method needs (``callbacks.METHOD_CALLBACKS``, each with its own config
section). ``--ckpt_path last`` (or a path inside a run directory) resumes in the same run directory.
"""

from __future__ import annotations

import logging
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from crma_lightning.callbacks import METHOD_CALLBACKS
from crma_lightning.callbacks.adapters import RanksDivergedError
from crma_lightning.core.atomic import atomic_write_text
from crma_lightning.core.dist import (
    check_fsdp1_device,
    end_distributed_run,
    peer_lost,
    require_find_unused_parameters,
    stop_local_ranks,
)
from crma_lightning.core.errors import ConfigError
from crma_lightning.data import ContinualDataModule
from crma_lightning.runs.record import record, write_record
from crma_lightning.runs.rundir import RUN_DIR_LINE, SHARDED_META, RunDir, init_args, is_checkpoint, versions
from crma_lightning.training.module import ContinualLM, NonFiniteError


def _task_name(task) -> str:
    # Parsed tasks are TaskSpec objects, or Namespaces (with or without class_path/init_args).
    if isinstance(task, dict):
        return task["name"]
    args = getattr(task, "init_args", task)
    return args["name"] if isinstance(args, dict) else args.name


def _task_names(tasks) -> list[str]:
    return [_task_name(t) for t in tasks or []]


def _max_epochs(tasks, epochs_per_task: int) -> int:
    return len(tasks or []) * epochs_per_task


class AtomicSaveConfig(SaveConfigCallback):
    """Lightning's config saver, writing ``config.yaml`` atomically (a kill while it writes leaves
    no half a config, which ``load_run`` would then refuse as damaged)."""

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if self.already_saved:
            return
        run = RunDir(trainer.log_dir)  # a collective: every rank
        if trainer.is_global_zero:
            if not self.overwrite and run.config_file.is_file():
                raise ConfigError(f"{run.config_file} exists: this run directory belongs to another run")
            atomic_write_text(run.config_file, self.parser.dump(self.config, skip_none=False))
            self.save_config(trainer, pl_module, stage)
        self.already_saved = trainer.strategy.broadcast(True)


class ContinualCLI(LightningCLI):
    """``python train.py fit --config configs/tiny.yaml``."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # `predict` uses a finished run directory (train.py sends it, `route` and `export` to
        # crma_lightning.cli.serve), so LightningCLI's own predict is not offered.
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_callback", AtomicSaveConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault(
            "parser_kwargs",
            {
                "default_env": False,
                "description": "Continual fine-tuning with CRMA. fit/validate/test train and evaluate; "
                "`train.py predict|route|export --run <run dir>` use a finished run (--help on each).",
            },
        )
        # Optimizer and schedule are model arguments (they need the parameter groups).
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(ContinualLM, ContinualDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key, callback in METHOD_CALLBACKS.items():
            parser.add_lightning_class_args(callback, key)
        parser.link_arguments("data.tasks", "model.task_names", compute_fn=_task_names)
        parser.link_arguments("data.seed", "model.seed")
        parser.add_argument(
            "--record",
            type=str | None,
            default=None,
            help="Also write the run's record (run directory, status, summary; as <run dir>/run.json) to "
            "this JSON file, for scripts: it is written when fit finishes or fails.",
        )
        parser.add_argument(
            "--dist_timeout",
            type=float | None,
            default=None,
            help="Seconds a collective may wait for the other ranks before the run stops with "
            "'error: a peer rank was lost' (default: the strategy's, 30 min).",
        )
        parser.link_arguments(
            ("data.tasks", "data.epochs_per_task"), "trainer.max_epochs", compute_fn=_max_epochs
        )
        parser.set_defaults(
            {
                "trainer.reload_dataloaders_every_n_epochs": 1,
                "trainer.use_distributed_sampler": False,
                "trainer.num_sanity_val_steps": 0,
                "trainer.log_every_n_steps": 1,
                # crma_lightning.callbacks.summary prints what a continual run trains instead.
                "trainer.enable_model_summary": False,
            }
        )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        check_linked_options(sys.argv[1:] if args is None else list(args))
        super().parse_arguments(parser, args)
        # Here, not in before_instantiate_classes: LightningCLI reads --ckpt_path right after parsing.
        subcommand = self.config.get("subcommand")
        if subcommand not in ("fit", "validate", "test"):
            return
        cfg = self.config[subcommand]
        ckpt = cfg.get("ckpt_path")
        if ckpt and subcommand == "fit":
            _resume_in_place(cfg, ckpt)
        if cfg.get("ckpt_path") and cfg["ckpt_path"] not in ("last", "best"):
            check_checkpoint(cfg["ckpt_path"])

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        listed = config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        sections = {cls: key for key, cls in METHOD_CALLBACKS.items()}
        twice = [(type(c), sections[type(c)]) for c in listed if type(c) in sections]
        if twice:
            raise ConfigError(
                "trainer.callbacks lists "
                + ", ".join(f"{cls.__module__}.{cls.__name__}" for cls, _ in twice)
                + ", which train.py adds itself; remove it from trainer.callbacks and set its options under "
                + ", ".join(f"`{key}:`" for _, key in twice)
            )
        if config.get("enable_progress_bar") is False:
            callbacks = [c for c in callbacks if type(c) is not METHOD_CALLBACKS["progress_bar"]]
        # The method's callbacks run first, so a callback listed in the config sees every task's
        # end already handled (adapters written, row evaluated) when its own hook runs.
        config["callbacks"] = [*callbacks, *listed]
        if self.subcommand == "fit":
            # fit's evaluation is the evaluation callback's, at task ends: no validation loop runs.
            config["limit_val_batches"] = 0
        check_fsdp1_device(config)
        trainer = super()._instantiate_trainer(config, [])
        require_find_unused_parameters(trainer)
        timeout = self.config[self.subcommand].get("dist_timeout")
        if timeout is not None and hasattr(trainer.strategy, "_timeout"):
            # DDP, FSDP and ModelParallel (FSDP2) strategies pass it to init_process_group (gloo:
            # every collective; NCCL: the watchdog), before any process group exists.
            trainer.strategy._timeout = timedelta(seconds=timeout)
        return trainer

    def before_fit(self) -> None:
        global _fresh_run_dir, _run_dir
        # Remember a run directory this invocation creates, so a failure before the first
        # checkpoint leaves no half-made run behind (see main()).
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        resuming = self.config[self.subcommand].get("ckpt_path")
        _fresh_run_dir = None if (resuming or run_dir.exists()) else run_dir
        _run_dir = run_dir
        global _launcher
        _launcher = self.trainer.strategy.launcher
        self.model.check_strategy(self.trainer.strategy)

    def after_fit(self) -> None:
        run_dir = self.trainer.log_dir or self.trainer.default_root_dir  # a collective: every rank
        if self.trainer.is_global_zero:
            write_record(record("finished", run_dir), self.config[self.subcommand].get("record"))
            print(f"{RUN_DIR_LINE}{run_dir}", flush=True)
            rank_zero_info(f"open it in TensorBoard: tensorboard --logdir {run_dir}")


#: Options the CLI computes itself, and what sets them.
LINKED = {
    "trainer.max_epochs": "is derived as len(data.tasks) x data.epochs_per_task; to train longer set "
    "--data.epochs_per_task",
    "model.task_names": "comes from the names in data.tasks; list the tasks under data.tasks",
    "model.seed": "comes from data.seed; set --data.seed",
}


def _nested(cfg: Any, dotted: str) -> bool:
    """Whether ``dotted`` (e.g. ``trainer.max_epochs``) is set in a parsed config file."""
    for part in dotted.split("."):
        cfg = init_args(cfg) if isinstance(cfg, dict) else cfg
        if not isinstance(cfg, dict) or part not in cfg:
            return False
        cfg = cfg[part]
    return True


def check_linked_options(argv: list[str]) -> None:
    """One clear line for an option the CLI sets itself (``LINKED``), given on the command line or
    in a ``--config`` file; jsonargparse would print a cryptic link error or silently override it."""
    import yaml

    for i, arg in enumerate(argv):
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if key in LINKED:
            raise ConfigError(f"--{key} cannot be set: it {LINKED[key]}")
        if key == "config":
            path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
            try:
                cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8")) if path else None
            except (OSError, yaml.YAMLError, UnicodeDecodeError):
                continue  # jsonargparse reports unreadable config files itself
            for linked, where in LINKED.items():
                if _nested(cfg, linked):
                    raise ConfigError(f"{path}: {linked} cannot be set: it {where}")


def _logger_root(cfg) -> tuple[str, str] | None:
    """(save_dir, name) of a TensorBoard/CSV logger in the parsed config, if any."""
    logger = cfg.get("trainer", {}).get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    if logger is None or isinstance(logger, bool):
        return None
    args = logger.get("init_args", {})
    return str(args.get("save_dir", ".")), str(args.get("name", "lightning_logs"))


def _resume_in_place(cfg, ckpt: str) -> None:
    """Point the logger at the run directory that holds the checkpoint (and resolve 'last')."""
    root = _logger_root(cfg)
    if root is None:
        return
    base = Path(root[0]) / root[1]
    if ckpt == "last":
        runs = [r for r in versions(base) if r.has_checkpoint()]
        if not runs:
            started = versions(base)
            if started:
                raise ConfigError(
                    f"--ckpt_path last: {started[-1].path} has no complete checkpoint yet (the run stopped "
                    "before or during its first save); start it again without --ckpt_path"
                )
            raise ConfigError(
                f"--ckpt_path last: no run under {base}/version_*/checkpoints/last.ckpt to resume"
            )
        run = runs[-1]
        cfg["ckpt_path"] = str(run.resumable_checkpoint())
    else:
        path = Path(ckpt)
        if not is_checkpoint(path):
            raise ConfigError(f"--ckpt_path {ckpt}: no such checkpoint file")
        run = RunDir(path.resolve().parent.parent)
        if run.path.parent.resolve() != base.resolve() or run.version is None:
            return  # a checkpoint from elsewhere: start a new run directory
    logger = cfg["trainer"]["logger"]
    logger = logger[0] if isinstance(logger, list) else logger
    logger["init_args"]["version"] = run.version


_fresh_run_dir: Path | None = None
_run_dir: Path | None = None  # the run directory of this invocation's fit, once the trainer has one
_launcher = None  # the strategy's launcher: on rank 0 of a node it holds the other local ranks


def _remove_unfinished_run() -> None:
    run = _fresh_run_dir
    if run is None or not run.is_dir() or any(RunDir(run).checkpoints.glob("*.ckpt")):
        return
    import shutil

    if rank_zero_only.rank == 0:
        shutil.rmtree(run, ignore_errors=True)


def check_checkpoint(path: str) -> None:
    """Fail early and clearly on a missing, truncated or foreign checkpoint (safe load, mmap).

    For a sharded checkpoint folder the metadata file is checked; the shards are read by DCP.
    """
    if not is_checkpoint(Path(path)):
        raise ConfigError(f"--ckpt_path {path}: no such checkpoint file")
    sharded = Path(path).is_dir()
    try:
        if sharded:
            ckpt = torch.load(Path(path) / SHARDED_META, map_location="cpu", weights_only=True)
            ckpt.setdefault("state_dict", {})  # the tensors are in the shards
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, not a torch file, unsafe pickle: all mean "don't trust it"
        raise ConfigError(
            f"--ckpt_path {path} is corrupted or not a safe checkpoint ({type(e).__name__}: {str(e)[:200]}); "
            "resume from an earlier file in the run's checkpoints/ folder"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"--ckpt_path {path} is not a Lightning checkpoint (no state_dict)")


#: Lightning's info lines that are not the run's own (the summary names device, precision and seed).
_NOT_OURS = (
    "💡 Tip:",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "Seed set to",
    "`Trainer.fit` stopped: `max_epochs=",
)


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOT_OURS)


def quiet_console() -> None:
    """Only the run's own lines: Lightning's tips and environment lines, and the progress bars of
    datasets' cache building and of transformers' weight loading, dropped; one third-party
    deprecation filtered."""
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _DropLines) for f in handler.filters):
                handler.addFilter(_DropLines())
    # Lightning 2.6's CombinedLoader calls torch's deprecated LeafSpec() on every dataloader reload
    # (every task epoch); nothing here can call it differently.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        module="lightning.pytorch.utilities._pytree",
    )


def _record_option(args: list[str]) -> str | None:
    """The value of ``--record`` in ``args``, read before parsing so a parse error is recorded too."""
    for i, a in enumerate(args):
        if a == "--record" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--record="):
            return a.split("=", 1)[1]
    return None


def main(args: list[str] | None = None) -> ContinualCLI | None:
    """Entry point of ``train.py``: configuration problems become one clear line, exit code 2; with
    ``--record PATH`` a failed fit writes its record (status, exit code, error) there too."""
    record_to = _record_option(list(args if args is not None else sys.argv))
    try:
        return _main(args)
    except BaseException as e:
        code = e.code if isinstance(e, SystemExit) else 1
        if code not in (0, None) and record_to is not None and rank_zero_only.rank == 0:
            cause = e.__context__ if isinstance(e, SystemExit) and e.__context__ is not None else e
            run_dir = _run_dir if _run_dir is not None and _run_dir.is_dir() else None
            write_record(
                record("failed", run_dir, exit_code=code, error=str(cause) or type(cause).__name__), record_to
            )
        raise


def _main(args: list[str] | None) -> ContinualCLI | None:
    quiet_console()
    debug = "--debug" in (args if args is not None else sys.argv)
    if debug:
        (args if args is not None else sys.argv).remove("--debug")
    try:
        cli = ContinualCLI(args=args)
    except UnicodeDecodeError as e:
        # jsonargparse reads --config files as UTF-8 and lets the decode error through.
        if debug:
            raise
        print(
            f"error: a --config file is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    except MisconfigurationException as e:  # Lightning's word for a setting the user can fix
        _remove_unfinished_run()
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (ConfigError, NonFiniteError, RanksDivergedError) as e:
        if isinstance(e, ConfigError):
            _remove_unfinished_run()
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, ConfigError) else 1) from None
    except RuntimeError as e:  # DistError (store, network) and gloo's errors are RuntimeErrors
        if debug or not peer_lost(e):
            raise
        stop_local_ranks(_launcher)
        rank = torch.distributed.get_rank()
        first = str(e).strip().splitlines()[0][:300]
        print(
            f"error: rank {rank}: a peer rank was lost (died, hung or unreachable): {first}", file=sys.stderr
        )
        raise SystemExit(1) from None
    end_distributed_run(_launcher)
    return cli
