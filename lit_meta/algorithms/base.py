"""``MetaLearner``: the LightningModule every algorithm inherits.

It owns what algorithms share: the network (built from the data's ``task_spec``), the
vmapped per-task computation around the one inner-loop engine (``lit_meta.inner``),
the shared meta-step, the meta-optimizer and its schedule, and episodic evaluation
(pre/post-adaptation loss and accuracy with a 95% CI over the fixed test tasks).

An algorithm overrides only what differs: ``adapt_names`` (what adapts),
``update_rule`` (how it adapts) and ``outer_update`` (what it contributes).
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, vmap

from lit_meta.compile import TaskCompiler
from lit_meta.inner import SGD, Adapted, Params, UpdateRule, adapt
from lit_meta.meta_step import MetaStep
from lit_meta.models import build_network
from lit_meta.tasks import TaskBatch

META_OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine", "linear")


class MetaLearner(pl.LightningModule):
    algorithm = "base"

    @property
    def algorithm_name(self) -> str:
        """The name used in results.json and config file names."""
        return self.algorithm

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
        compile_tasks: str | None = None,
    ) -> None:
        super().__init__()
        if inner_steps < 0 or (eval_inner_steps is not None and eval_inner_steps < 0):
            raise ValueError(f"inner_steps/eval_inner_steps must be >= 0, got {inner_steps}/{eval_inner_steps}")
        if inner_lr <= 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr}")
        if meta_lr <= 0:
            raise ValueError(f"meta_lr must be > 0, got {meta_lr}")
        if meta_batch_size < 1:
            raise ValueError(f"meta_batch_size must be >= 1, got {meta_batch_size}")
        if meta_optimizer not in META_OPTIMIZERS:
            raise ValueError(f"meta_optimizer must be one of {META_OPTIMIZERS}, got {meta_optimizer!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if task_chunk_size is not None and task_chunk_size < 1:
            raise ValueError(f"task_chunk_size must be >= 1 or null, got {task_chunk_size}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.task_spec = task_spec
        self.net = build_network(backbone, task_spec, **(backbone_kwargs or {}))
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.first_order = first_order
        self.meta_batch_size = meta_batch_size
        self.meta_step = MetaStep(weighting, grad_clip)
        # Tasks adapted (and, in training, back-propagated) together. None: the whole
        # meta-batch in one vmap, fastest; k: peak memory of k tasks' graphs, same gradient.
        self.task_chunk_size = task_chunk_size
        # Transductive: the query set is normalised with its own batch statistics (as the
        # MAML papers evaluated). Otherwise each query example is predicted alone beside
        # the support set (Nichol et al. 2018), or with per-step running statistics.
        self.transductive = transductive
        # torch.compile of the paths with no backward through the inner gradients (lit_meta.compile)
        self.task_compiler = TaskCompiler(compile_tasks)
        self.regression = task_spec["kind"] == "regression"
        self._eval_sums: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ hooks
    def adapt_names(self) -> list[str]:
        """Names (in ``inner_params``) that the inner loop adapts. All, for MAML."""
        return [n for n, _ in self.net.named_parameters()]

    def update_rule(self, training: bool) -> UpdateRule:
        return SGD(self.inner_lr)

    def first_order_at(self, training: bool) -> bool:
        return self.first_order or not training

    def outer_update(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Adapt the batch's tasks and step the meta-optimizer. MAML: query losses.

        With ``task_chunk_size`` k below the meta-batch, each chunk of k tasks is adapted
        and back-propagated before the next, so only one chunk's second-order graph is
        alive; ``.grad`` accumulates the same Σ_i w_i ∇L_i."""
        steps, first_order = self.inner_steps, self.first_order_at(True)
        chunk = self.task_chunk_size
        if chunk is None or chunk >= batch.num_tasks:
            out = self.run_tasks(batch, steps, first_order=first_order, training=True)
            self.meta_step(self, out["updates"], query_losses=out["query_loss"])
            return out
        updates = None
        if self.meta_step.weighting != "uniform":
            # Gradient Agreement needs every task's update before the first backward. The
            # updates' values do not depend on the graph, so a graph-free pass finds them.
            updates = self.run_tasks(batch, steps, first_order=True, training=True, differentiable=False,
                                     absorb=False)["updates"]
        weights = self.meta_step.weights(updates, batch.num_tasks, batch.query_x)
        optimizer = self.meta_step.begin(self)
        outs = []
        for start in range(0, batch.num_tasks, chunk):
            out = self.run_tasks(batch.slice(start, start + chunk), steps, first_order=first_order, training=True,
                                 absorb=False)
            self.meta_step.accumulate(self, weights[start:start + chunk], query_losses=out["query_loss"])
            out["query_loss"] = out["query_loss"].detach()
            outs.append(out)
        out = _cat_task_outputs(outs)
        self.absorb_task_outputs(out)
        self.meta_step.finish(self, optimizer, weights)
        return out

    # ------------------------------------------------------------------ the per-task function
    def inner_params(self) -> Params:
        return dict(self.net.named_parameters())

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

    def adapt_task(self, params: Params, support_x: Tensor, support_y: Tensor, steps: int,
                   first_order: bool, training: bool, trace: bool = False) -> Adapted:
        def support_loss(p: Params, step: int) -> Tensor:
            return self.loss_fn(self.forward_fn(p, support_x, step), support_y)

        with self.inner_precision():
            return adapt(support_loss, params, steps, self.update_rule(training), first_order,
                         self.adapt_names(), trace=trace)

    def inner_precision(self) -> AbstractContextManager:
        """Under 16-mixed the inner loop runs in fp32: Lightning's GradScaler scales only
        ``manual_backward``, so fp16 inner gradients (``torch.func.grad``) could underflow.
        The query forward stays in fp16 and the outer backward is scaled as usual. bf16
        has fp32's range, so under bf16-mixed the inner loop stays in autocast."""
        trainer = self._trainer
        if trainer is not None and str(trainer.precision).startswith("16"):
            return torch.autocast(device_type=self.device.type, enabled=False)
        return nullcontext()

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
        return {}

    def absorb_task_outputs(self, out: dict[str, Any]) -> None:
        """Called once per training meta-batch, outside vmap (e.g. running statistics)."""

    def task_outputs(self, params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                     query_y: Tensor, steps: int, first_order: bool, training: bool) -> dict[str, Any]:
        """Everything one task contributes; ``vmap``-ed over the meta-batch by ``run_tasks``."""
        adapted = self.adapt_task(params, support_x, support_y, steps, first_order, training,
                                  trace=self.trace_inner(training))
        prediction = self.predict(adapted.params, support_x, query_x, steps, training)
        final_loss = self.loss_fn(prediction, query_y)
        out: dict[str, Any] = {
            "query_loss": self.query_objective(adapted, support_x, query_x, query_y, final_loss, training),
            "final_query_loss": final_loss.detach(),
            "query_acc": self.accuracy(prediction, query_y),
            "updates": {n: (params[n] - adapted.params[n]).detach() for n in self.adapt_names()},
            **self.extra_task_outputs(adapted, support_x, training),
        }
        if not training:
            before = self.predict(params, support_x, query_x, 0, training)
            out["before_loss"] = self.loss_fn(before, query_y).detach()
            out["before_acc"] = self.accuracy(before, query_y)
        return out

    def run_tasks(self, batch: TaskBatch, steps: int, first_order: bool, training: bool,
                  differentiable: bool | None = None, absorb: bool = True) -> dict[str, Any]:
        """vmap ``task_outputs`` over the tasks. ``differentiable`` (default: ``training``)
        keeps the graph to θ; algorithms whose outer step needs no backward turn it off.
        ``absorb``: hand training outputs to ``absorb_task_outputs`` (once per meta-batch)."""
        params = self.inner_params()
        differentiable = training if differentiable is None else differentiable
        if not differentiable:
            params = {n: p.detach() for n, p in params.items()}

        def build():
            fn = partial(self.task_outputs, steps=steps, first_order=first_order, training=training)
            return vmap(fn, in_dims=(None, 0, 0, 0, 0), randomness="different", chunk_size=self.task_chunk_size)

        # second order (a double backward) and step-dependent orders run eagerly
        capturable = not differentiable or first_order is True
        batched = self.task_compiler((steps, first_order, training, differentiable), build, capturable)
        out = batched(params, batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        if training and absorb:
            self.absorb_task_outputs(out)
        return out

    # ------------------------------------------------------------------ Lightning
    def on_fit_start(self) -> None:
        self._check_grad_mode()

    def _check_grad_mode(self) -> None:
        if self.trainer is not None and getattr(self.trainer, "_inference_mode", False):
            raise ValueError("evaluation adapts with gradients: run the Trainer with inference_mode=False")

    def logging_step(self) -> bool:
        """Whether this training step's values reach a logger or the progress bar.

        ``self.log`` costs ~0.7 ms a call whether or not the value is written: on sine,
        five calls a step were half the Trainer's time. Steps whose values only the
        logger would see (every ``log_every_n_steps``-th is written) skip them."""
        trainer = self._trainer
        if trainer is None:
            return False
        if trainer.progress_bar_callback is not None:
            return True
        # called after the meta-optimizer stepped, so global_step counts this step
        return trainer.global_step % max(trainer.log_every_n_steps, 1) == 0 or trainer.should_stop

    def training_step(self, batch: TaskBatch, batch_idx: int) -> None:
        out = self.outer_update(batch)
        if self.logging_step():
            metric = "mse" if self.regression else "loss"
            self.log(f"train/{metric}", out["final_query_loss"].mean(), prog_bar=True)
            if not self.regression:
                self.log("train/acc", out["query_acc"].mean(), prog_bar=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def _eval_step(self, batch: TaskBatch, split: str) -> None:
        with torch.enable_grad():
            out = self.run_tasks(batch, self.eval_inner_steps, first_order=True, training=False)
        values = {"loss_after": out["final_query_loss"], "loss_before": out["before_loss"]}
        if not self.regression:
            values.update(acc=out["query_acc"], acc_before=out["before_acc"])
        for key, v in values.items():
            v = v.double()
            s = torch.stack([v.sum(), (v * v).sum(), torch.tensor(float(v.numel()), device=v.device, dtype=v.dtype)])
            self._eval_sums[key] = self._eval_sums.get(key, 0) + s

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._check_grad_mode()
        self._eval_sums = {}

    on_test_epoch_start = on_validation_epoch_start

    def _eval_epoch_end(self, split: str) -> None:
        metrics: dict[str, float] = {}
        for key, sums in self._eval_sums.items():
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(sums)
            total, squares, n = sums.tolist()
            mean = total / n
            var = max(squares - n * mean * mean, 0.0) / max(n - 1, 1)
            name = {"loss_after": "mse_after" if self.regression else "loss",
                    "loss_before": "mse_before" if self.regression else "loss_before"}.get(key, key)
            metrics[f"{split}/{name}"] = mean
            if key in ("acc", "loss_after"):
                metrics[f"{split}/{name}_ci95"] = 1.96 * math.sqrt(var / n)
            metrics[f"{split}/tasks"] = n
        self._eval_sums = {}
        metrics[f"{split}/adapt_steps"] = float(self.eval_inner_steps)
        # Already reduced over ranks above, so no sync_dist.
        self.log_dict(metrics, rank_zero_only=False)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning's own message for this is a multi-line RuntimeError after partial loading.
        own = self.state_dict()
        for name, value in checkpoint.get("state_dict", {}).items():
            if name in own and tuple(own[name].shape) != tuple(value.shape):
                raise ValueError(f"checkpoint {name} has shape {list(value.shape)} but this model's is "
                                 f"{list(own[name].shape)}: the model/data options differ from the checkpoint's")

    def results_extra(self) -> dict[str, Any]:
        """Protocol facts recorded in results.json beside the metrics."""
        return {"bn": "transductive" if self.transductive else "non-transductive",
                "test/adapt_steps": self.eval_inner_steps}

    @property
    def monitor(self) -> tuple[str, str]:
        return ("val/mse_after", "min") if self.regression else ("val/acc", "max")

    def meta_parameters(self):
        return self.parameters()

    def _meta_optimizer(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.meta_optimizer == "adam":
            return torch.optim.Adam(self.meta_parameters(), lr=hp.meta_lr)
        return torch.optim.SGD(self.meta_parameters(), lr=hp.meta_lr)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = self._meta_optimizer()
        if hp.lr_schedule == "constant":
            return optimizer
        total = self._total_steps()
        if hp.lr_schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def standalone_optimizer(self) -> torch.optim.Optimizer:
        """The meta-optimizer when no Trainer is attached (tests, benchmarks, notebooks);
        without a Trainer there is no step budget, so no learning-rate schedule."""
        if getattr(self, "_standalone_optimizer", None) is None:
            self._standalone_optimizer = self._meta_optimizer()
        return self._standalone_optimizer

    def _total_steps(self) -> int:
        trainer = self._trainer
        if trainer is not None and trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        if trainer is not None and trainer.max_epochs and trainer.datamodule is not None:
            return trainer.max_epochs * trainer.datamodule.steps_per_epoch
        raise ValueError("lr_schedule needs trainer.max_steps (or max_epochs with an episodic datamodule)")

    def configure_callbacks(self) -> list[pl.Callback]:
        from pytorch_lightning.callbacks import ModelCheckpoint

        if not self.trainer.checkpoint_callbacks:  # Trainer(enable_checkpointing=False)
            return []
        metric, mode = self.monitor
        return [ModelCheckpoint(monitor=metric, mode=mode, save_last=True,
                                filename="best-{step}", auto_insert_metric_name=False)]


def _cat_task_outputs(outs: list[Any]) -> Any:
    """Concatenate per-chunk ``run_tasks`` outputs (nested dicts of [tasks, ...] tensors)."""
    first = outs[0]
    if isinstance(first, dict):
        return {k: _cat_task_outputs([o[k] for o in outs]) for k in first}
    return torch.cat(outs)
