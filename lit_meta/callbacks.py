"""Small Trainer callbacks: ``TorchThreads`` (configs name it under ``trainer.callbacks``),
``ProgressLog`` (``train.py`` adds it when there is no progress bar) and ``SaveOnSigterm``
(``train.py`` adds it to every Trainer)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lit_meta.internals import mark_restart_mid_validation, mark_restart_on_train_batch_end


class TorchThreads(pl.Callback):
    """Set torch's intra-op thread count when fit / validate / test starts.

    Why: the few-shot networks run many small ops, each ending in a barrier of the
    intra-op threads. On the 2-core dev machine a 5-way 1-shot meta-step took 0.17 s with
    two threads and 0.35 s with one when nothing else ran, but about 1.1 s with two when
    other jobs shared the cores (a thread waits for a core at every op). One thread is
    the predictable choice for CPU configs that must finish in a time budget.
    """

    def __init__(self, num_threads: int = 1) -> None:
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be an integer >= 1, got {num_threads!r}")
        self.num_threads = num_threads
        self._before: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._before is None:  # fit's own test (or a second fit) sets up again: keep the first
            self._before = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # the process's thread count as it was: a notebook or test session that fits twice, or
        # fits and then does other work, does not stay on this config's count
        if self._before is not None:
            torch.set_num_threads(self._before)
            self._before = None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class ProgressLog(pl.Callback):
    """Plain progress lines for logs that are not a terminal (SLURM output files, CI).

    ``train.py`` adds it when there is no progress bar (output not a terminal, or
    ``trainer.enable_progress_bar: false``). On every ``log_every_n_steps``-th step, at most
    every ``min_interval_s`` seconds (the first and last always), after each validation and
    when fit ends, rank zero prints one line: the step out of the total, the latest
    training and validation values, steps per second since the previous line and the time
    left at that rate, e.g.::

        [train] step 1000/15000 | train/loss 0.312 | train/acc 0.906 | val/acc 0.951 | 3.12 steps/s | elapsed 5m21s | ETA 1h14m
    """

    KEYS = ("train/loss", "train/mse", "train/support_loss", "train/support_mse", "train/acc", "val/acc",
            "val/mse_after", "val/loss")

    def __init__(self, min_interval_s: float = 10.0) -> None:
        self.min_interval_s = min_interval_s
        self._last: tuple[float, int] | None = None  # (time, step) of the previous line
        self._start: float | None = None
        self._printed = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()
        self._last = (self._start, trainer.global_step)
        self._printed = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object,
                           batch: object, batch_idx: int) -> None:
        step = trainer.global_step
        if step % max(trainer.log_every_n_steps, 1):
            return
        if not self._printed or self._last is None or time.monotonic() - self._last[0] >= self.min_interval_s:
            self.print_line(trainer, "train")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.print_line(trainer, "val")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.print_line(trainer, "done")

    def print_line(self, trainer: pl.Trainer, what: str) -> None:
        now, step = time.monotonic(), trainer.global_step
        last_time, last_step = self._last if self._last is not None else (now, step)
        self._last = (now, step)
        self._printed = True
        if not trainer.is_global_zero:
            return
        total = self.total_steps(trainer)
        parts = [f"[{what}] step {step}" + (f"/{total}" if total else "")]
        metrics = trainer.callback_metrics
        for key in self.KEYS:
            if key in metrics:
                parts.append(f"{key} {float(metrics[key]):.4g}")
        rate = (step - last_step) / (now - last_time) if now > last_time and step > last_step else None
        if rate:
            parts.append(f"{rate:.3g} steps/s")
        if self._start is not None:
            parts.append(f"elapsed {_duration(now - self._start)}")
        if rate and total and total > step:
            parts.append(f"ETA {_duration((total - step) / rate)}")
        print(" | ".join(parts), flush=True)

    @staticmethod
    def total_steps(trainer: pl.Trainer) -> int | None:
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        per_epoch = getattr(getattr(trainer, "datamodule", None), "steps_per_epoch", None)
        if trainer.max_epochs and trainer.max_epochs > 0 and per_epoch:
            return trainer.max_epochs * per_epoch
        return None


class SaveOnSigterm(pl.Callback):
    """A SIGTERM (what a cluster sends before its SIGKILL) stops fit with a ``last.ckpt`` to resume from.

    Lightning's handler only notes the signal, so a checkpoint being written is finished first
    (atomically, :mod:`lit_meta.checkpoint`); after the current training step, or after the
    current validation batch, its loops raise ``SIGTERMException``. ``on_exception`` then makes
    ``last.ckpt`` hold that moment and records on the exception what ``train.py`` prints
    (``lit_meta.cli.main``: one line, exit code 143). Resuming from it with ``--ckpt_path``
    ends as the uninterrupted run would (the same weights, optimizer state, validations and
    logged steps):

    - stopped after a step that validated: the ``last.ckpt`` that ModelCheckpoint wrote at the
      end of that validation is that moment already, and is kept as it is;
    - stopped after a step without validation: ``last.ckpt`` is written there (at the end of an
      epoch, with the loop state of a save from that last step's ``on_train_batch_end``, which
      Lightning resumes into the next epoch; saved as it is, the resumed epoch would count its
      batches from the old one's end and validate one step late);
    - stopped during a validation: ``last.ckpt`` is written with the loop state of a save from
      inside ``validation_step`` (a batch started, none processed), so the resumed fit runs
      that validation again from its first batch (its metrics, the best checkpoint and the
      ``last.ckpt`` of that step come from all its tasks), then trains on; saved as it is
      (every started batch completed), Lightning would skip the rest of that validation.
    """

    def __init__(self) -> None:
        self._saving: str | None = None  # while this callback writes: where fit was stopped
        self._validated_step: int | None = None  # the global step of fit's latest finished validation

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._validated_step = trainer.global_step

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        fn, step = trainer.state.fn, trainer.global_step
        mid_validation = trainer.validating or trainer.sanity_checking
        callback = trainer.checkpoint_callback
        dirpath = getattr(callback, "dirpath", None)
        last = Path(dirpath) / "last.ckpt" if dirpath else None
        saved = None
        if fn == "fit" and last is not None and step > 0 and not trainer.sanity_checking:
            written = getattr(callback, "last_model_path", "") or ""
            if not mid_validation and self._validated_step == step and written and Path(written) == last:
                saved = last  # ModelCheckpoint's, from the end of this step's validation
            else:
                epoch = trainer.fit_loop.epoch_progress.current
                epoch_end = epoch.completed == epoch.started
                self._saving = "validation" if mid_validation else "epoch end" if epoch_end else "step"
                try:
                    trainer.save_checkpoint(last)
                finally:
                    self._saving = None
                saved = last
        elif last is not None and last.is_file():
            saved = last  # fit had finished (a SIGTERM in the test after it): resuming it tests again
        during = "validation" if mid_validation else str(getattr(fn, "value", fn))
        exception.lit_meta_step = step  # type: ignore[attr-defined]
        exception.lit_meta_during = during  # type: ignore[attr-defined]
        exception.lit_meta_checkpoint = saved  # type: ignore[attr-defined]

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self._saving == "validation":
            mark_restart_mid_validation(checkpoint)
        elif self._saving == "epoch end":
            mark_restart_on_train_batch_end(checkpoint)
