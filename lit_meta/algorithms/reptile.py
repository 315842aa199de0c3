"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

Each task takes ``inner_steps`` steps of Adam (β1 = 0, as the paper) or SGD on its support
set; the task contributes θ − θ'_i, which the shared meta-step weights (uniform or
Gradient Agreement) and hands to the meta-optimizer as a gradient. With SGD at
``meta_lr`` = ε this is θ ← θ + ε Σ_i w_i (θ'_i − θ); ``lr_schedule: linear`` anneals ε
to 0 as the paper does. No backward pass and no query forward: Reptile is first order by
construction and its outer step reads only the adapted weights.

As the reference code (openai/supervised-reptile) trains, behind options whose defaults
keep lit_meta's first behaviour:

- ``inner_batch_size``: each inner iteration trains on a mini-batch of the task's training
  set (the DataModule's ``shots``, e.g. 10 per class), not on all of it
  (``MetaLearner.inner_schedule``); ``eval_inner_batch_size`` the same at test.
- ``persistent_inner_state``: the inner Adam's moments and step count are not reset per
  task. supervised-reptile builds one ``AdamOptimizer`` for the inner loop and resets only
  the model's trainable variables between tasks (``Reptile.train_step`` imports
  ``_model_state``, the trainable variables; its optimizer slots are global variables), so
  the Adam state runs on across tasks and meta-iterations, and evaluation starts from it
  (``evaluate`` saves and restores the full state around each test task). Here the tasks of
  a meta-batch adapt in parallel: each starts from the carried state, and the carried state
  becomes their mean, with the step count advanced by steps × tasks (the updates the
  reference's one optimizer makes per meta-iteration). Evaluation starts from it and leaves
  it alone. It is a buffer of the module, so checkpoints hold it and a resume is exact.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lit_meta.algorithms.base import MetaLearner
from lit_meta.algorithms.learned_rates import lr_key
from lit_meta.episode import EpisodeContext, run_tasks
from lit_meta.tasks import TaskBatch
from lit_meta.update_rules import SGD, Adam, Params, UpdateRule

INNER_OPTIMIZERS = ("adam", "sgd")


class AdamState(nn.Module):
    """The inner Adam's moments (one buffer per adapted parameter) and update count."""

    def __init__(self, params: Params) -> None:
        super().__init__()
        self.names = list(params)
        for name, p in params.items():
            self.register_buffer(f"m__{lr_key(name)}", torch.zeros_like(p, requires_grad=False))
            self.register_buffer(f"v__{lr_key(name)}", torch.zeros_like(p, requires_grad=False))
        self.register_buffer("t", torch.zeros(()))

    def get(self) -> tuple[Params, Params, Tensor]:
        return ({n: getattr(self, f"m__{lr_key(n)}") for n in self.names},
                {n: getattr(self, f"v__{lr_key(n)}") for n in self.names}, self.t)

    @torch.no_grad()
    def set_mean(self, per_task: tuple[Params, Params, Tensor], tasks_per_step: int) -> None:
        """The mean of the tasks' final states (over every DDP rank), t advanced by steps × tasks
        (``tasks_per_step`` on this rank, as many on each of the others)."""
        m, v, t = per_task
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        values = [m[n].mean(0) for n in self.names] + [v[n].mean(0) for n in self.names]
        if world > 1:
            for value in values:
                dist.all_reduce(value)
                value /= world
        for n, value in zip(self.names, values[:len(self.names)]):
            getattr(self, f"m__{lr_key(n)}").copy_(value)
        for n, value in zip(self.names, values[len(self.names):]):
            getattr(self, f"v__{lr_key(n)}").copy_(value)
        self.t.copy_(self.t + (t.mean() - self.t) * tasks_per_step * world)


class Reptile(MetaLearner):
    algorithm = "reptile"

    def __init__(self, inner_optimizer: str = "adam", inner_betas: tuple[float, float] = (0.0, 0.999),
                 first_order: bool = True, meta_optimizer: str = "sgd", meta_lr: float = 1.0,
                 persistent_inner_state: bool = False, **kwargs: Any) -> None:
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {inner_optimizer!r}")
        if not first_order:
            raise ValueError("Reptile is first order by construction: set first_order: true (or leave it out)")
        if persistent_inner_state and inner_optimizer != "adam":
            raise ValueError("persistent_inner_state carries the inner Adam's state: set inner_optimizer: adam")
        super().__init__(first_order=True, meta_optimizer=meta_optimizer, meta_lr=meta_lr, **kwargs)
        self.inner_optimizer = inner_optimizer
        self.inner_betas = tuple(inner_betas)
        self.persistent_inner_state = persistent_inner_state
        adapted = {n: p for n, p in self.net.named_parameters() if n in set(self.adapt_names())}
        self.inner_state = AdamState(adapted) if persistent_inner_state else None

    def update_rule(self, ctx: EpisodeContext) -> UpdateRule:
        if self.inner_optimizer == "adam":
            return Adam(self.inner_lr, betas=self.inner_betas)
        return SGD(self.inner_lr)

    def initial_rule_state(self, ctx: EpisodeContext) -> Any:
        return None if self.inner_state is None else self.inner_state.get()

    def extra_task_outputs(self, adapted: Any, support_x: Tensor, ctx: EpisodeContext) -> dict[str, Any]:
        return {"inner_state": adapted.state} if ctx.training and self.inner_state is not None else {}

    def absorb_task_outputs(self, out: dict[str, Any]) -> None:
        if "inner_state" in out:
            self.inner_state.set_mean(out["inner_state"], tasks_per_step=out["updates"][self.adapt_names()[0]].shape[0])

    def outer_update(self, batch: TaskBatch, ctx: EpisodeContext | None = None) -> dict[str, Tensor]:
        ctx = self.context(True, batch) if ctx is None else ctx
        out = run_tasks(self, batch, ctx, self.inner_steps, first_order=True, differentiable=False, query=False)
        # θ − θ'_i, keyed by the module's parameter names
        self.meta_step(self, out["updates"], task_grads={f"net.{n}": u for n, u in out["updates"].items()})
        return out
