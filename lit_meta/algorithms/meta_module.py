"""``MetaModule``: the LightningModule plumbing every lit_meta model shares.

Both kinds of model extend it: :class:`~lit_meta.algorithms.base.MetaLearner` (few-shot
algorithms: a network adapted per task) and
:class:`~lit_meta.algorithms.learning_to_learn.LearningToLearn` (a learned optimizer
meta-trained on optimizee functions). It owns

- the meta-optimizer (Adam or SGD over ``meta_parameters()``) and its learning-rate
  schedule (constant; cosine to ``min_lr`` over the steps; ``cosine_epochs``: cosine to
  ``min_lr`` in steps of whole epochs, as HowToTrainYourMAMLPytorch anneals; linear to 0;
  stepped once per meta-step), also without a Trainer (``standalone_optimizer``);
- the shared meta-step (``self.meta_step``, :class:`~lit_meta.meta_step.MetaStep`):
  task weighting, gradient clipping (by norm, ``grad_clip``, or by value,
  ``grad_clip_value``), the one backward, and the divergence guard
  (:mod:`lit_meta.nonfinite`), whose counters it reads on logging steps and when training
  ends (``divergence``, ``divergence_report`` for results.json);
- the wall-clock time of fit (``elapsed_seconds``), carried across a resume in the
  checkpoint and logged as ``train/wall_s`` with every validation, so a validation curve
  can be drawn against time;
- evaluation epochs: the gradient-mode check (evaluation adapts with gradients), the
  per-epoch metric sums (``self.eval_sums``, :mod:`lit_meta.metrics`) and their logging;
- checkpointing: the best (by ``monitor``) and last checkpoint, and a one-line error when
  a checkpoint's tensors do not fit the model.

Subclasses implement ``outer_update`` (one meta-step), ``validation_step`` /
``test_step`` (add to ``eval_sums``; a batch of zero tasks, which a DDP rank gets when
there are fewer evaluation tasks than ranks, adds nothing), ``evaluation_metrics`` and
``monitor``; they may override ``begin_evaluation``, ``results_extra``,
``meta_parameters``, ``algorithm_name``, ``divergence_cause`` and ``before_load_state``.
"""
from __future__ import annotations

import math
import time
from typing import Any, Iterator

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from lit_meta.checkpoint import remove_orphans
from lit_meta.internals import attached_trainer, lightning_logs_this_step, trainer_inference_mode
from lit_meta.meta_step import MetaStep
from lit_meta.metrics import MetricSums

META_OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine", "cosine_epochs", "linear")


class MetaModule(pl.LightningModule):
    algorithm = "base"

    def __init__(self, task_spec: dict[str, Any], meta_optimizer: str = "adam", meta_lr: float = 1e-3,
                 lr_schedule: str = "constant", weighting: str = "uniform", grad_clip: float | None = None,
                 grad_clip_value: float | None = None, min_lr: float = 0.0, max_nonfinite: int = 10) -> None:
        if meta_lr <= 0:
            raise ValueError(f"meta_lr must be > 0, got {meta_lr}")
        if not 0 <= min_lr <= meta_lr:
            raise ValueError(f"min_lr must be in [0, meta_lr={meta_lr}], got {min_lr}")
        if meta_optimizer not in META_OPTIMIZERS:
            raise ValueError(f"meta_optimizer must be one of {META_OPTIMIZERS}, got {meta_optimizer!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        super().__init__()
        self.automatic_optimization = False
        self.task_spec = task_spec
        self.meta_optimizer_name, self.meta_lr, self.lr_schedule = meta_optimizer, meta_lr, lr_schedule
        self.min_lr = min_lr
        self.meta_step = MetaStep(weighting, grad_clip, grad_clip_value, max_nonfinite)
        self.divergence: dict[str, Any] | None = None  # set by the divergence guard when it stops training
        self.eval_sums = MetricSums()
        self._standalone_optimizer: torch.optim.Optimizer | None = None
        self._fit_started: float | None = None
        self._elapsed_before = 0.0  # seconds of fit before a resume (from the checkpoint)
        self.val_history: list[dict[str, float]] = []  # one entry per validation of this fit
        self._pending_train_values: dict[str, Tensor] | None = None  # for the bar, at the batch's end

    # ------------------------------------------------------------------ what subclasses provide
    @property
    def algorithm_name(self) -> str:
        """The name used in results.json and config file names."""
        return self.algorithm

    def outer_update(self, batch: Any) -> dict[str, Any]:
        """One meta-step on ``batch`` (a Trainer's training step, or called directly)."""
        raise NotImplementedError

    def evaluation_metrics(self, split: str, sums: dict[str, Tensor]) -> dict[str, float]:
        """The logged metrics of an evaluation epoch from ``eval_sums`` (already summed over ranks)."""
        raise NotImplementedError

    @property
    def monitor(self) -> tuple[str, str]:
        """(metric, "min" | "max") that picks the best checkpoint."""
        raise NotImplementedError

    def begin_evaluation(self, split: str) -> None:
        """Called when a ``val`` or ``test`` epoch starts, after the metric sums are reset."""

    def results_extra(self) -> dict[str, Any]:
        """Protocol facts recorded in results.json beside the metrics."""
        return {}

    def meta_parameters(self) -> Iterator[nn.Parameter]:
        return self.parameters()

    def divergence_cause(self, step: int, batch: Any = None) -> str:
        """Why the meta-steps from ``step`` on were likely non-finite (one phrase, for the stop
        line); ``batch``: the tasks of the step the divergence was found at, if known."""
        return f"the meta learning rate (meta_lr={self.meta_lr}) is too large"

    # ------------------------------------------------------------------ meta-optimizer and schedule
    def build_meta_optimizer(self) -> torch.optim.Optimizer:
        if self.meta_optimizer_name == "adam":
            return torch.optim.Adam(self.meta_parameters(), lr=self.meta_lr)
        return torch.optim.SGD(self.meta_parameters(), lr=self.meta_lr)

    def configure_optimizers(self) -> Any:
        optimizer = self.build_meta_optimizer()
        if self.lr_schedule == "constant":
            return optimizer
        total = self.total_steps()
        if self.lr_schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=self.min_lr)
        elif self.lr_schedule == "cosine_epochs":
            per_epoch = self.steps_per_epoch()
            epochs = max(math.ceil(total / per_epoch), 1)
            low = self.min_lr / self.meta_lr

            def factor(step: int) -> float:
                epoch = min(step // per_epoch, epochs)
                return low + (1 - low) * (1 + math.cos(math.pi * epoch / epochs)) / 2

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def standalone_optimizer(self) -> torch.optim.Optimizer:
        """The meta-optimizer when no Trainer is attached (tests, benchmarks, notebooks);
        without a Trainer there is no step budget, so no learning-rate schedule."""
        if self._standalone_optimizer is None:
            self._standalone_optimizer = self.build_meta_optimizer()
        return self._standalone_optimizer

    def total_steps(self) -> int:
        trainer = attached_trainer(self)
        if trainer is not None and trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        if trainer is not None and trainer.max_epochs and trainer.datamodule is not None:
            return trainer.max_epochs * trainer.datamodule.steps_per_epoch
        raise ValueError("lr_schedule needs trainer.max_steps (or max_epochs with an episodic datamodule)")

    def steps_per_epoch(self) -> int:
        trainer = attached_trainer(self)
        per_epoch = getattr(getattr(trainer, "datamodule", None), "steps_per_epoch", None)
        if not per_epoch:
            raise ValueError("lr_schedule cosine_epochs needs an episodic datamodule (its steps_per_epoch)")
        return int(per_epoch)

    def step_lr_schedule(self) -> None:
        """Advance the schedule by one meta-step (manual optimization: Lightning does not)."""
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def logging_step(self) -> bool:
        """Whether this training step's values reach a logger or the progress bar.

        ``self.log`` costs ~0.7 ms a call whether or not the value is written: on sine,
        five calls a step were half the Trainer's time. Steps whose values only the
        logger would see (every ``log_every_n_steps``-th is written) skip them. A progress
        bar does not make every step log: that would read the logged values on the host
        every step; the bar shows those of the last logging step."""
        trainer = attached_trainer(self)
        return trainer is not None and lightning_logs_this_step(trainer)

    def log_training_values(self, values: dict[str, Tensor]) -> None:
        """Log a logging step's training values (0-dim device tensors) from ``training_step``.

        Never as ``prog_bar`` values there: Lightning turns every ``prog_bar`` value into a
        Python number at *every* batch end while it stays logged (``_ResultCollection.metrics``),
        so a device tensor logged for the bar on one step was read on the host on each following
        step, a sync a step (seen on an H200 by gpu_check's sync check, 2026-12-04: steps 5-8
        after the logging step 4). The logger reads them on their logging step, and callbacks
        see them in ``callback_metrics`` as before. A progress bar, when there is one, gets host
        copies made in ``on_train_batch_end`` (one copy, where the divergence counters are read
        anyway), so the bar's later reads wait for nothing."""
        for name, value in values.items():
            self.log(name, value)
        trainer = attached_trainer(self)
        if trainer is not None and trainer.progress_bar_callback is not None:
            self._pending_train_values = {name: value.detach() for name, value in values.items()}

    def log_values_for_the_bar(self) -> None:
        """``on_train_batch_end``: the progress bar's host copies of this logging step's values
        (one copy for all of them), when ``log_training_values`` kept any."""
        values, self._pending_train_values = self._pending_train_values, None
        if not values:
            return
        host = torch.stack([value.float() for value in values.values()]).cpu()
        for name, value in zip(values, host):
            self.log(name, value, prog_bar=True, logger=False)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # the precision plugin calls this after unscaling fp16 gradients: the one place to clip
        self.meta_step.clip(self)

    # ------------------------------------------------------------------ the divergence guard
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # the guard's counters live on the device: read them only where values are logged anyway;
        # a divergence's cause is found by replaying this step's batch
        if self.logging_step():
            self.meta_step.guard.check(self, batch)
        self.log_values_for_the_bar()

    def on_train_end(self) -> None:
        self.meta_step.guard.check(self)

    def divergence_report(self) -> dict[str, Any]:
        """For results.json: the skipped steps and, if the guard stopped training, where and why."""
        report: dict[str, Any] = {"train/nonfinite_skipped": self.meta_step.guard.skipped,
                                  "diverged": self.divergence is not None}
        if self.divergence is not None:
            report.update({k: v for k, v in self.divergence.items() if k not in ("message", "nonfinite_skipped")})
            report["diverged_note"] = ("the test metrics are those of best_checkpoint, which holds weights from "
                                       f"before step {self.divergence['diverged_at_step']} (no non-finite step "
                                       "ever changes the weights)")
        return report

    # ------------------------------------------------------------------ evaluation epochs
    def check_grad_mode(self) -> None:
        trainer = attached_trainer(self)
        if trainer is not None and trainer_inference_mode(trainer):
            raise ValueError("evaluation adapts with gradients: run the Trainer with inference_mode=False")

    def on_fit_start(self) -> None:
        self.check_grad_mode()
        callback = self.trainer.checkpoint_callback
        if callback is not None and callback.dirpath and self.trainer.is_global_zero:
            # the temporary files of a run killed mid-save (kill -9, preemption)
            remove_orphans(callback.dirpath)
        self._fit_started = time.perf_counter()

    def elapsed_seconds(self) -> float:
        """Wall-clock seconds of fit so far, including the runs before a resume."""
        if self._fit_started is None:
            return self._elapsed_before
        return self._elapsed_before + time.perf_counter() - self._fit_started

    def on_validation_epoch_start(self) -> None:
        self.check_grad_mode()
        self.eval_sums.reset()
        self.begin_evaluation("val")

    def on_test_epoch_start(self) -> None:
        self.check_grad_mode()
        self.eval_sums.reset()
        self.begin_evaluation("test")

    def on_validation_epoch_end(self) -> None:
        # reduced over ranks by eval_sums, so no sync_dist
        metrics = self.evaluation_metrics("val", self.eval_sums.reduce(self.device))
        if attached_trainer(self) is not None and self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            metrics["train/wall_s"] = self.elapsed_seconds()  # the validation curve against time
            self.val_history.append({"step": self.trainer.global_step, "wall_s": round(metrics["train/wall_s"], 3),
                                     **{k: v for k, v in metrics.items() if k.startswith("val/")}})
        self.log_dict(metrics, rank_zero_only=False)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.evaluation_metrics("test", self.eval_sums.reduce(self.device)), rank_zero_only=False)

    # ------------------------------------------------------------------ checkpoints
    def configure_callbacks(self) -> list[pl.Callback]:
        from pytorch_lightning.callbacks import ModelCheckpoint

        if not self.trainer.checkpoint_callbacks:  # Trainer(enable_checkpointing=False)
            return []
        metric, mode = self.monitor
        return [ModelCheckpoint(monitor=metric, mode=mode, save_last=True,
                                filename="best-{step}", auto_insert_metric_name=False)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_guard"] = self.meta_step.guard.state_dict()
        checkpoint["lit_meta_elapsed_s"] = self.elapsed_seconds()

    def before_load_state(self, state_dict: dict[str, Tensor]) -> None:
        """Called with a checkpoint's tensors before they are loaded (modules sized by the data may be built here)."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "nonfinite_guard" in checkpoint:
            self.meta_step.guard.load_state_dict(checkpoint["nonfinite_guard"])
        self._elapsed_before = float(checkpoint.get("lit_meta_elapsed_s", 0.0))
        self.before_load_state(checkpoint.get("state_dict", {}))
        # Lightning's own message for this is a multi-line RuntimeError after partial loading.
        own = self.state_dict()
        for name, value in checkpoint.get("state_dict", {}).items():
            if name in own and tuple(own[name].shape) != tuple(value.shape):
                raise ValueError(f"checkpoint {name} has shape {list(value.shape)} but this model's is "
                                 f"{list(own[name].shape)}: the model/data options differ from the checkpoint's")
