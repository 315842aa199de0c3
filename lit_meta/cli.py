"""``train.py``: LightningCLI with lit_meta's defaults, links and end-of-fit meta-test.

- ``python train.py`` alone is ``fit --config configs/sine/maml.yaml``.
- ``data.task_spec`` is linked into ``model.task_spec`` (so the checkpoint knows its
  data), and ``model.meta_batch_size`` into ``data.meta_batch_size``.
- Every fit ends by meta-testing the best checkpoint (``--test_after_fit false`` to
  skip), writes ``results.json`` beside the checkpoints and prints ``results: <path>``
  last; a fit the divergence guard stopped (:mod:`lit_meta.nonfinite`) records that in
  ``results.json``, then ends with one ``error:`` line. results.json holds the test
  metrics with the test curve (``test/acc_by_step`` or ``test/mse_by_step``: after each
  inner step 0..eval_inner_steps, the last entry the reported metric), the evaluation
  ``protocol`` (queries per class, BN mode, test-time steps, ...) and the validation curve
  over training (``val_curve``: step, wall-clock seconds, metrics). Under W&B the two
  curves are also logged as W&B line plots.
- Progress: a bar in an interactive terminal; otherwise (a SLURM log, a pipe) or with
  ``trainer.enable_progress_bar: false``, plain lines (``lit_meta.callbacks.ProgressLog``).
- Checkpoints are written by :class:`lit_meta.checkpoint.AtomicCheckpointIO`, whatever
  ``--trainer.plugins`` add, unless they bring a checkpoint writer of their own.
- ``--ckpt_path`` must hold a lit_meta checkpoint of the configured algorithm and task
  shapes; anything else is one line saying what the file holds and what was expected (a
  damaged one, e.g. truncated, also names the newest intact checkpoint beside it).
- A SIGTERM (a cluster's notice before its SIGKILL) stops fit after the current step or
  validation batch with a ``last.ckpt`` that resumes exactly
  (:class:`lit_meta.callbacks.SaveOnSigterm`), then one ``error:`` line naming it and exit
  code 143 (128 + SIGTERM).
- Each run claims its ``version_N`` folder with ``os.mkdir`` before it starts
  (:func:`claim_log_versions`): two runs started at once in one ``default_root_dir`` never
  share a folder (nor overwrite each other's checkpoints and results.json).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lit_meta.algorithms.meta_module import MetaModule
from lit_meta.callbacks import ProgressLog, SaveOnSigterm
from lit_meta.checkpoint import (
    SPECIAL_PATHS,
    atomic_write,
    check_same_class,
    check_task_spec,
    describe_os_error,
    read_hparams,
    saved_class,
    signature_defaults,
    use_atomic_checkpoints,
)
from lit_meta.config_compose import KEY as COMPOSE_KEY
from lit_meta.config_compose import expand_config_args
from lit_meta.data.base import EpisodicDataModule
from lit_meta.internals import CheckpointHparamsHook, logger_version_unset, set_logger_version
from lit_meta.loggers import slurm_run_id

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "sine" / "maml.yaml"
# The logger's save_dir unless a config or flag sets one: ``<trainer.default_root_dir>/logs``
# (``logs`` in the working directory without a root dir), filled in by resolve_log_dirs.
ROOT_LOGS = "<default_root_dir>/logs"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


class MetaCLI(CheckpointHparamsHook, LightningCLI):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", {})
        defaults = {
            # Evaluation adapts with gradients: inference_mode would forbid them.
            "inference_mode": False,
            "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": ROOT_LOGS}},
            "max_steps": 1000,
            "num_sanity_val_steps": 0,
        }
        kwargs["trainer_defaults"] = {**defaults, **kwargs["trainer_defaults"]}
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(MetaModule, EpisodicDataModule, *args, subclass_mode_model=True,
                         subclass_mode_data=True, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.task_spec", "model.init_args.task_spec", apply_on="instantiate")
        parser.link_arguments("model.init_args.meta_batch_size", "data.init_args.meta_batch_size")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="meta-test the best checkpoint when fit ends and write results.json")
        parser.add_argument(f"--{COMPOSE_KEY}", type=Optional[list[str]], default=None,
                            help="in a config file: the config files it builds on, applied before it "
                                 "(expanded by lit_meta.config_compose before parsing)")

    def parse_arguments(self, parser: Any, args: Any) -> None:
        # A config's `compose:` parts become --config arguments before it (lit_meta.config_compose);
        # only after the subcommand, whose parser is the one that knows --compose.
        if args is not None and not isinstance(args, list):  # a dict or Namespace: no files
            return super().parse_arguments(parser, args)
        argv = sys.argv[1:] if args is None else args
        start = next((i + 1 for i, a in enumerate(argv) if a in SUBCOMMANDS), 0)
        argv = argv[:start] + expand_config_args(argv[start:])
        if args is None:  # what LightningCLI does with sys.argv, now expanded
            self.config = parser.parse_args(argv)
        else:
            super().parse_arguments(parser, argv)

    def parse_ckpt_hparams(self) -> None:
        """As LightningCLI does: the checkpoint's hparams (the model's class and arguments) override
        the config. Read through lit_meta.checkpoint: a bad file is one line, a moved class is found."""
        subcommand = self.config.get("subcommand")
        path = self._subcommand_arg("ckpt_path") if subcommand else None
        if path is None or path in SPECIAL_PATHS:
            return
        hparams = read_hparams(path)
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            cls = saved_class(path, hparams)  # importable, or one line saying why
            check_same_class(path, hparams["_class_path"], self.config[subcommand].get("model"))
            # options newer than the checkpoint: their defaults (its behaviour), not the config's
            hparams = {**{k: v for k, v in signature_defaults(cls).items() if k != "task_spec"}, **hparams}
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        # without a subcommand (MetaCLI(run=False)) the trainer's options are at the top
        trainer = (self.config[subcommand] if subcommand else self.config).trainer
        resolve_log_dirs(trainer)
        # Under SLURM the run directory is named after the job, so a requeued job (same
        # id) writes to the same directory and W&B run instead of a new version_N.
        job = slurm_run_id()
        if job is None:
            return
        logger = trainer.get("logger")
        for entry in logger if isinstance(logger, list) else [logger]:
            init = getattr(entry, "init_args", None)
            if init is not None and "version" in init and init.get("version") is None:
                init["version"] = f"slurm_{job}"

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        # A bar only where someone watches it: in a log file it is noise (and on a GPU it
        # reads the logged values every step); plain progress lines there instead.
        if not (sys.stdout.isatty() and sys.stderr.isatty()):
            kwargs["enable_progress_bar"] = False
        trainer = super().instantiate_trainer(**kwargs)
        if trainer.progress_bar_callback is None:
            trainer.callbacks.append(ProgressLog())
        trainer.callbacks.append(SaveOnSigterm())  # a SIGTERM stops fit with a last.ckpt to resume from
        # here, not as a default plugin: a user's --trainer.plugins list would replace that
        # (a kill -9 mid-save must not destroy the last complete checkpoint)
        use_atomic_checkpoints(trainer)
        return trainer

    # ---------------------------------------------------------------- fit / validate / test
    def before_fit(self) -> None:
        self._check_task_spec()
        check_world_size(self.trainer, self.datamodule)
        claim_log_versions(self.trainer)
        self._fit_start = time.perf_counter()

    def before_validate(self) -> None:
        self._check_task_spec()
        claim_log_versions(self.trainer)

    def before_test(self) -> None:
        self._check_task_spec()
        claim_log_versions(self.trainer)

    def _check_task_spec(self) -> None:
        path = self._subcommand_arg("ckpt_path")
        if path is not None and path not in SPECIAL_PATHS:
            check_task_spec(path, self.model.task_spec)

    def after_fit(self) -> None:
        trainer, model, dm = self.trainer, self.model, self.datamodule
        seconds = time.perf_counter() - self._fit_start
        checkpoint = self._checkpoint_callback()
        last = Path(checkpoint.dirpath) / "last.ckpt"
        # A last checkpoint whatever the step count: fit may stop between validations.
        # Every rank calls it (a collective under DDP); Lightning writes from rank 0.
        trainer.save_checkpoint(last)
        best = checkpoint.best_model_path or str(last)
        metrics: dict[str, float] = {}
        if self._subcommand_arg("test_after_fit", default=True):
            results = trainer.test(model, datamodule=dm, ckpt_path=best, verbose=True)
            metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
        if not trainer.is_global_zero:
            return
        run_dir = Path(checkpoint.dirpath).parent
        extra = model.results_extra()
        if metrics:
            metrics.update(getattr(model, "curves", {}))  # test/acc_by_step: the last entry is test/acc
        protocol = {key: extra[key] for key in ("bn", "test/adapt_steps", "test/inner_batch_size") if key in extra}
        if hasattr(dm, "protocol"):
            protocol.update(dm.protocol())
        payload = {
            "algorithm": model.algorithm_name,
            "dataset": model.task_spec.get("dataset"),
            "metrics": metrics,
            "protocol": protocol,
            "train/steps": trainer.global_step,
            "train/seconds": round(seconds, 3),
            "best_checkpoint": str(Path(best).resolve()),
            "last_checkpoint": str(last.resolve()),
            "val_curve": list(getattr(model, "val_history", [])),
        }
        payload.update(extra)
        payload.update(model.divergence_report())
        path = run_dir / "results.json"
        atomic_write(path, lambda handle: handle.write(json.dumps(payload, indent=2).encode()))
        _log_curves_to_wandb(trainer, payload)
        for logger in trainer.loggers:
            logger.finalize("success")
        _finish_wandb()
        sys.stdout.flush()
        print(f"results: {path.resolve()}", flush=True)

    # ---------------------------------------------------------------- helpers
    def _subcommand_arg(self, name: str, default: Any = None) -> Any:
        subcommand = self.config.get("subcommand")
        return self.config.get(subcommand, {}).get(name, default)

    def _checkpoint_callback(self) -> ModelCheckpoint:
        callback = self.trainer.checkpoint_callback
        if callback is None:
            raise ValueError("fit needs checkpointing: do not set trainer.enable_checkpointing=false")
        return callback


def resolve_log_dirs(trainer: Any) -> None:
    """Put the run under ``trainer.default_root_dir`` as Lightning users expect: a logger whose
    ``save_dir`` no config or flag set (so still :data:`ROOT_LOGS`) writes to
    ``<default_root_dir>/logs``, and so do the checkpoints and results.json that live in its
    run directory. Without a root dir that is ``logs`` in the working directory."""
    root = trainer.get("default_root_dir")
    logger = trainer.get("logger")
    for entry in logger if isinstance(logger, list) else [logger]:
        init = getattr(entry, "init_args", None)
        if init is not None and init.get("save_dir") == ROOT_LOGS:
            init["save_dir"] = str(Path(root) / "logs") if root is not None else "logs"


def claim_log_versions(trainer: Any) -> None:
    """Give each CSV / TensorBoard logger without a version its ``version_N`` folder now, created
    with ``os.mkdir`` (which fails if the folder exists). Lightning's loggers take the next
    number by listing the folders and create theirs later, so two runs started at once in one
    ``default_root_dir`` could both take ``version_N`` and write their checkpoints, config and
    results.json over each other's; the one that finds its number taken takes the next. Only
    the launching process (rank 0) claims: DDP re-runs the command line for the other ranks,
    which write no logs (and take their checkpoint folder from rank 0)."""
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) != 0:
        return
    for logger in trainer.loggers:
        if isinstance(logger, (CSVLogger, TensorBoardLogger)) and logger_version_unset(logger) \
                and "://" not in str(logger.root_dir):  # a local folder (not an fsspec URL)
            set_logger_version(logger, claim_version(Path(logger.root_dir)))


def claim_version(root: Path) -> int:
    """The number of a ``version_N`` folder newly created in ``root`` (Lightning's next number,
    or the first after it that no other process created first)."""
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(entry.name.removeprefix("version_")) for entry in root.iterdir()
             if entry.is_dir() and entry.name.startswith("version_") and entry.name.removeprefix("version_").isdigit()]
    version = max(taken, default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir()
        except FileExistsError:
            version += 1
            continue
        return version


def check_world_size(trainer: Any, datamodule: Any) -> None:
    """One line before any process starts, instead of an error inside every rank at the first
    step: each of the W processes adapts meta_batch_size / W tasks of the global meta-batch."""
    world = trainer.world_size
    tasks = getattr(datamodule, "meta_batch_size", None)
    if world > 1 and tasks is not None and tasks % world:
        raise ValueError(f"model.meta_batch_size={tasks} is not divisible by the {world} processes "
                         f"(trainer.devices x trainer.num_nodes): each process adapts an equal share of the meta-batch")
def _log_curves_to_wandb(trainer: Any, results: dict[str, Any]) -> None:
    """The test adaptation curve and the validation curve as W&B tables and line plots."""
    from pytorch_lightning.loggers import WandbLogger

    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if not loggers:
        return
    import wandb

    for logger in loggers:
        run, plots = logger.experiment, {}
        for key, values in results["metrics"].items():
            if key.endswith("_by_step"):
                metric = key.split("/")[1].removesuffix("_by_step")
                table = wandb.Table(columns=["inner step", metric], data=[[k, v] for k, v in enumerate(values)])
                plots[f"{key}_plot"] = wandb.plot.line(table, "inner step", metric,
                                                       title=f"test {metric} after k inner steps")
        val = results.get("val_curve") or []
        if val:
            names = sorted({k for row in val for k in row} - {"step", "wall_s"})
            table = wandb.Table(columns=["step", "wall_s", *names],
                                data=[[row.get("step"), row.get("wall_s"), *(row.get(n) for n in names)] for row in val])
            plots["val/curve"] = table
            for name in names:
                if name.endswith(("acc", "mse_after")):
                    plots[f"{name}_vs_time"] = wandb.plot.line(table, "wall_s", name, title=f"{name} over training")
        if plots:
            run.log(plots)


def _finish_wandb() -> None:
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass


def _root_value_error(error: BaseException) -> BaseException:
    """jsonargparse wraps a constructor's ValueError in a multi-line one; report the original."""
    root, seen = error, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ValueError):
            root = error
        error = error.__cause__ or error.__context__
    return root


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if not argv:
        argv = ["fit", "--config", str(DEFAULT_CONFIG)]
    torch.set_float32_matmul_precision("high")
    try:
        if argv[0] == "adapt":  # not a Trainer subcommand: lit_meta/adapt.py has its own parser
            from lit_meta.adapt import main as adapt_main

            return adapt_main(argv[1:])
        # args=None lets LightningCLI read sys.argv itself (it warns when given both).
        cli = MetaCLI(args=None if args is None and sys.argv[1:] else argv)
        stop_if_diverged(cli.model)
    except SIGTERMException as error:  # Lightning's, at the step boundary after the signal
        from pytorch_lightning.utilities.rank_zero import rank_zero_only

        if getattr(rank_zero_only, "rank", 0) == 0:  # under DDP every rank stops here: one line
            print(f"error: {interrupted(error)}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGTERM) from None
    except (ValueError, OSError) as error:
        if os.environ.get("LIT_META_TRACEBACK") or (isinstance(error, OSError) and error.filename is None):
            raise  # an OSError that names no file is no bad input or full disk: show where it came from
        message = one_line(error)
        print(f"error: {message} (set LIT_META_TRACEBACK=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def interrupted(error: BaseException) -> str:
    """The line ``main`` prints when a SIGTERM stopped the run (:class:`lit_meta.callbacks.SaveOnSigterm`
    left the checkpoint it names)."""
    step, during = getattr(error, "lit_meta_step", None), getattr(error, "lit_meta_during", None)
    where = f" at step {step}" if step is not None else ""
    if during and during != "fit":
        where += f", during {during}"
    checkpoint = getattr(error, "lit_meta_checkpoint", None)
    if checkpoint is None:
        return f"interrupted by SIGTERM{where}, before any checkpoint was written: start the run again"
    again = f" (it validates step {step} again)" if during == "validation" else ""
    return f"interrupted by SIGTERM{where}: resume with --ckpt_path {Path(checkpoint).resolve()}{again}"


def one_line(error: BaseException) -> str:
    """The line ``main`` prints for a ValueError, or an OSError naming a file (an unwritable log folder)."""
    if isinstance(error, OSError):
        return f"{describe_os_error(error, error.filename)}: {error.filename}"
    return str(_root_value_error(error)).strip().splitlines()[0]


def stop_if_diverged(model: Any) -> None:
    """After the results are written: a fit that the divergence guard stopped fails with its line."""
    divergence = getattr(model, "divergence", None)
    if divergence:
        raise ValueError(divergence["message"])
