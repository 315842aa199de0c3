"""Small Trainer callbacks: ``TorchThreads`` (configs name it under ``trainer.callbacks``) and
``ProgressLog`` (``train.py`` adds it when there is no progress bar)."""
from __future__ import annotations

import time

import pytorch_lightning as pl
import torch


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
