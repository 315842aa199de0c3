"""``MetaLearner``: the LightningModule every few-shot algorithm inherits.

It holds the network (built from the data's ``task_spec``) and the inner-loop settings,
and defines, as overridable hooks, what one task does; the per-task computation that
calls them, ``vmap``-ed over a meta-batch, is :mod:`lit_meta.algorithms.episodic`. The
meta-optimizer, schedule, meta-step and checkpoint plumbing come from
:class:`~lit_meta.algorithms.meta_module.MetaModule`; evaluation reports the mean and
95% CI over the fixed test tasks (:mod:`lit_meta.metrics`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from lit_meta.algorithms.episodic import adapt_task, outer_update_in_chunks, run_tasks
from lit_meta.algorithms.meta_module import MetaModule
from lit_meta.compile import TaskCompiler
from lit_meta.inner import Adapted, Params
from lit_meta.inner_checkpoint import recompute_problem
from lit_meta.metrics import mean_ci95
from lit_meta.models import build_network
from lit_meta.tasks import TaskBatch
from lit_meta.update_rules import SGD, UpdateRule


class MetaLearner(MetaModule):
    """A few-shot meta-learning algorithm: MAML as it stands; the others override hooks.

    Hooks an algorithm may override (MAML overrides none but ``algorithm_name``):

    - what adapts: ``adapt_names()`` (ANIL: the head), ``inner_params()``;
    - how it adapts: ``update_rule(training)`` (Meta-SGD, MAML++, Reptile, Meta-LSTM),
      ``first_order_at(training)`` (MAML++: derivative-order annealing);
    - what a task contributes: ``trace_inner(training)``, ``query_objective(...)`` (MAML++:
      multi-step loss), ``extra_task_outputs(...)`` and ``absorb_task_outputs(out)`` (MAML++:
      per-step BN statistics out of vmap, into the buffers), ``predict(...)`` (MAML++: BNRS),
      ``forward_fn``, ``loss_fn``, ``accuracy``;
    - the meta-step: ``outer_update(batch)`` (Reptile, Transfer);
    - evaluation and adaptation to a new task (``lit_meta.adapt``): ``evaluation_mode(on)``
      (MAML++: per-step running statistics), ``set_inner_lr(lr)`` (Meta-SGD, MAML++: the
      learned rates; Meta-LSTM: refuses), ``resize_head(ways)`` (Meta-SGD: the head's rates);
    - reporting: ``algorithm_name`` (MAML: fomaml when first order), ``results_extra()``,
      ``monitor``, ``meta_parameters()``, ``divergence_cause(step)``.

    No algorithm overrides a Lightning hook or a private method.
    """

    def __init__(
        self,
        task_spec: dict[str, Any],
        backbone: str = "auto",
        backbone_kwargs: dict[str, Any] | None = None,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        meta_batch_size: int = 4,
        meta_optimizer: str = "adam",
        meta_lr: float = 1e-3,
        lr_schedule: str = "constant",
        weighting: str = "uniform",
        grad_clip: float | None = None,
        task_chunk_size: int | None = None,
        transductive: bool = True,
        inner_checkpointing: bool = False,
        compile_tasks: str | None = None,
        max_nonfinite: int = 10,
    ) -> None:
        if inner_steps < 0 or (eval_inner_steps is not None and eval_inner_steps < 0):
            raise ValueError(f"inner_steps/eval_inner_steps must be >= 0, got {inner_steps}/{eval_inner_steps}")
        if inner_lr <= 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr}")
        if meta_batch_size < 1:
            raise ValueError(f"meta_batch_size must be >= 1, got {meta_batch_size}")
        if task_chunk_size is not None and task_chunk_size < 1:
            raise ValueError(f"task_chunk_size must be >= 1 or null, got {task_chunk_size}")
        super().__init__(task_spec, meta_optimizer, meta_lr, lr_schedule, weighting, grad_clip, max_nonfinite)
        self.save_hyperparameters()
        self.net = build_network(backbone, task_spec, **(backbone_kwargs or {}))
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.first_order = first_order
        self.meta_batch_size = meta_batch_size
        # Tasks adapted (and, in training, back-propagated) together. None: the whole
        # meta-batch in one vmap, fastest; k: peak memory of k tasks' graphs, same gradient.
        self.task_chunk_size = task_chunk_size
        # Steps along the inner loop: keep only each step's parameters and recompute a
        # second-order step in the outer backward; the same gradient, memory flat in steps.
        self.inner_checkpointing = inner_checkpointing
        # Transductive: the query set is normalised with its own batch statistics (as the
        # MAML papers evaluated). Otherwise each query example is predicted alone beside
        # the support set (Nichol et al. 2018), or with per-step running statistics.
        self.transductive = transductive
        # torch.compile of the paths with no backward through the inner gradients (lit_meta.compile)
        self.task_compiler = TaskCompiler(compile_tasks)
        self.regression = task_spec["kind"] == "regression"

    # ------------------------------------------------------------------ what adapts, and how
    def adapt_names(self) -> list[str]:
        """Names (in ``inner_params``) that the inner loop adapts. All, for MAML."""
        return [n for n, _ in self.net.named_parameters()]

    def inner_params(self) -> Params:
        return dict(self.net.named_parameters())

    def update_rule(self, training: bool) -> UpdateRule:
        return SGD(self.inner_lr)

    def first_order_at(self, training: bool) -> bool:
        return self.first_order or not training

    # ------------------------------------------------------------------ what one task computes
    def forward_fn(self, params: Params, x: Tensor, step: int = 0) -> Tensor:
        buffers = dict(self.net.named_buffers())
        return functional_call(self.net, (params, buffers), (x,), {"step": step})

    def loss_fn(self, prediction: Tensor, target: Tensor) -> Tensor:
        if self.regression:
            return F.mse_loss(prediction, target)
        return F.cross_entropy(prediction, target)

    def accuracy(self, prediction: Tensor, target: Tensor) -> Tensor:
        if self.regression:
            return torch.zeros((), device=prediction.device)
        return (prediction.argmax(-1) == target).float().mean()

    def predict(self, params: Params, support_x: Tensor, query_x: Tensor, step: int, training: bool) -> Tensor:
        """Query predictions of (adapted) ``params``; non-transductive at evaluation if asked."""
        if self.transductive or training:
            return self.forward_fn(params, query_x, step)

        def one(x: Tensor) -> Tensor:
            # BatchNorm sees the support set plus this one query example.
            return self.forward_fn(params, torch.cat([support_x, x[None]]), step)[-1]

        return vmap(one)(query_x)

    def trace_inner(self, training: bool) -> bool:
        """Whether ``query_objective`` needs the parameters after every inner step."""
        return False

    def query_objective(self, adapted: Adapted, support_x: Tensor, query_x: Tensor, query_y: Tensor,
                        final_loss: Tensor, training: bool) -> Tensor:
        """The per-task loss the meta-step minimises. MAML: the query loss after adaptation."""
        return final_loss

    def extra_task_outputs(self, adapted: Adapted, support_x: Tensor, training: bool) -> dict[str, Any]:
        """More per-task outputs (tensors) to carry out of vmap."""
        return {}

    def absorb_task_outputs(self, out: dict[str, Any]) -> None:
        """Called once per training meta-batch, outside vmap (e.g. running statistics)."""

    # ------------------------------------------------------------------ the meta-batch
    def adapt_task(self, params: Params, support_x: Tensor, support_y: Tensor, steps: int,
                   first_order: bool, training: bool, trace: bool = False) -> Adapted:
        """One task's inner loop (:func:`lit_meta.algorithms.episodic.adapt_task`)."""
        return adapt_task(self, params, support_x, support_y, steps, first_order, training, trace)

    def run_tasks(self, batch: TaskBatch, steps: int, first_order: bool, training: bool,
                  differentiable: bool | None = None, absorb: bool = True) -> dict[str, Any]:
        """Every task of ``batch``, vmapped (:func:`lit_meta.algorithms.episodic.run_tasks`)."""
        return run_tasks(self, batch, steps, first_order, training, differentiable, absorb)

    def outer_update(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Adapt the batch's tasks and step the meta-optimizer. MAML: query losses.

        With ``task_chunk_size`` k below the meta-batch, k tasks at a time
        (:func:`lit_meta.algorithms.episodic.outer_update_in_chunks`), the same update."""
        chunk = self.task_chunk_size
        if chunk is not None and chunk < batch.num_tasks:
            return outer_update_in_chunks(self, batch, chunk)
        out = self.run_tasks(batch, self.inner_steps, first_order=self.first_order_at(True), training=True)
        self.meta_step(self, out["updates"], query_losses=out["query_loss"])
        return out

    # ------------------------------------------------------------------ Lightning
    def setup(self, stage: str) -> None:
        # Here, not in __init__: the rule is built from what the subclass's __init__ adds.
        if self.inner_checkpointing and (problem := recompute_problem(self.update_rule(True))):
            raise ValueError(f"inner_checkpointing: {problem}")

    def training_step(self, batch: TaskBatch, batch_idx: int) -> None:
        out = self.outer_update(batch)
        if self.logging_step():
            metric = "mse" if self.regression else "loss"
            self.log(f"train/{metric}", out["final_query_loss"].mean(), prog_bar=True)
            if not self.regression:
                self.log("train/acc", out["query_acc"].mean(), prog_bar=True)
        self.step_lr_schedule()

    def on_train_epoch_start(self) -> None:
        self.evaluation_mode(False)

    def begin_evaluation(self, split: str) -> None:
        self.evaluation_mode(True)

    def evaluate_batch(self, batch: TaskBatch) -> None:
        """Adapt each task for ``eval_inner_steps`` and add its query loss/accuracy before and after."""
        if not batch.num_tasks:  # a DDP rank with no evaluation task: nothing to add
            return
        with torch.enable_grad():
            out = self.run_tasks(batch, self.eval_inner_steps, first_order=True, training=False)
        values = {"loss_after": out["final_query_loss"], "loss_before": out["before_loss"]}
        if not self.regression:
            values.update(acc=out["query_acc"], acc_before=out["before_acc"])
        for key, v in values.items():
            self.eval_sums.add_moments(key, v)

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self.evaluate_batch(batch)

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self.evaluate_batch(batch)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.evaluation_mode(False)  # training may resume mid-epoch

    def evaluation_metrics(self, split: str, sums: dict[str, Tensor]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for key, moment_sums in sums.items():
            mean, ci95, n = mean_ci95(moment_sums)
            name = {"loss_after": "mse_after" if self.regression else "loss",
                    "loss_before": "mse_before" if self.regression else "loss_before"}.get(key, key)
            metrics[f"{split}/{name}"] = mean
            if key in ("acc", "loss_after"):
                metrics[f"{split}/{name}_ci95"] = ci95
            metrics[f"{split}/tasks"] = n
        metrics[f"{split}/adapt_steps"] = float(self.eval_inner_steps)
        return metrics

    def results_extra(self) -> dict[str, Any]:
        return {"bn": "transductive" if self.transductive else "non-transductive",
                "test/adapt_steps": self.eval_inner_steps}

    @property
    def monitor(self) -> tuple[str, str]:
        return ("val/mse_after", "min") if self.regression else ("val/acc", "max")

    def divergence_cause(self, step: int) -> str:
        """Replays step ``step``'s tasks from the current (last finite) weights: a loss that is
        finite at θ but not after the inner steps points at the inner rate, else the meta rate."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "train_batch"):
            return super().divergence_cause(step)
        with torch.enable_grad():
            out = self.run_tasks(datamodule.train_batch(step), self.inner_steps, first_order=True, training=False)
        if not bool(torch.isfinite(out["before_loss"]).all()):
            return (f"the weights give a non-finite loss before adaptation: the meta learning rate "
                    f"(meta_lr={self.meta_lr}) is too large")
        if not bool(torch.isfinite(out["final_query_loss"]).all()):
            return (f"the loss is finite at the weights but not after {self.inner_steps} inner step(s): the inner "
                    f"learning rate (inner_lr={self.inner_lr}) is too large")
        return (f"the tasks adapt to finite losses, but the meta-gradient or the meta-update is not finite: the meta "
                f"learning rate (meta_lr={self.meta_lr}) is too large, or set grad_clip")

    # ------------------------------------------------------------------ evaluation and new tasks
    def evaluation_mode(self, on: bool) -> None:
        """Switch between meta-training and evaluation behaviour: on for val/test epochs and
        for ``adapt_and_predict``, off for training. MAML: nothing differs."""

    def set_inner_lr(self, inner_lr: float) -> bool:
        """Adapt with ``inner_lr`` from now on; True if that replaced meta-learned rates."""
        if inner_lr <= 0 or not math.isfinite(inner_lr):
            raise ValueError(f"inner_lr must be > 0, got {inner_lr}")
        self.inner_lr = inner_lr
        return False

    def resize_head(self, ways: int) -> int:
        """Replace the head by a zero-initialised one with ``ways`` outputs if it has another
        width (with zero weights every class starts equal and the first inner step moves
        each row towards its class's mean feature). Returns the old width."""
        head = self.net.head
        old = head.out_features
        if old != ways:
            new = nn.Linear(head.in_features, ways, device=head.weight.device, dtype=head.weight.dtype)
            nn.init.zeros_(new.weight)
            nn.init.zeros_(new.bias)
            self.net.head = new
        return old

    def adapt_and_predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                          steps: int | None = None) -> Tensor:
        """One new task through the model's own inner loop and evaluation-mode prediction:
        query outputs ``[n, ...]``, after ``steps`` (default ``eval_inner_steps``) steps."""
        steps = self.eval_inner_steps if steps is None else steps
        self.evaluation_mode(True)
        params = {n: p.detach() for n, p in self.inner_params().items()}
        with torch.enable_grad():
            adapted = self.adapt_task(params, support_x, support_y, steps, first_order=True, training=False)
            out = self.predict(adapted.params, support_x, query_x, steps, training=False)
        return out.detach()
