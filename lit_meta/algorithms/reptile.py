"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

Each task takes ``inner_steps`` steps of Adam (β1 = 0, as the paper) or SGD on its support
set; the task contributes θ − θ'_i, which the shared meta-step weights (uniform or
Gradient Agreement) and hands to the meta-optimizer as a gradient. With SGD at
``meta_lr`` = ε this is θ ← θ + ε Σ_i w_i (θ'_i − θ); ``lr_schedule: linear`` anneals ε
to 0 as the paper does. No backward pass: Reptile is first order by construction.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from lit_meta.algorithms.base import MetaLearner
from lit_meta.tasks import TaskBatch
from lit_meta.update_rules import SGD, Adam, UpdateRule

INNER_OPTIMIZERS = ("adam", "sgd")


class Reptile(MetaLearner):
    algorithm = "reptile"

    def __init__(self, inner_optimizer: str = "adam", inner_betas: tuple[float, float] = (0.0, 0.999),
                 first_order: bool = True, meta_optimizer: str = "sgd", meta_lr: float = 1.0,
                 **kwargs: Any) -> None:
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {inner_optimizer!r}")
        if not first_order:
            raise ValueError("Reptile is first order by construction: set first_order: true (or leave it out)")
        super().__init__(first_order=True, meta_optimizer=meta_optimizer, meta_lr=meta_lr, **kwargs)
        self.inner_optimizer = inner_optimizer
        self.inner_betas = tuple(inner_betas)

    def update_rule(self, training: bool) -> UpdateRule:
        if self.inner_optimizer == "adam":
            return Adam(self.inner_lr, betas=self.inner_betas)
        return SGD(self.inner_lr)

    def outer_update(self, batch: TaskBatch) -> dict[str, Tensor]:
        out = self.run_tasks(batch, self.inner_steps, first_order=True, training=True, differentiable=False)
        # θ − θ'_i, keyed by the module's parameter names
        self.meta_step(self, out["updates"], task_grads={f"net.{n}": u for n, u in out["updates"].items()})
        return out
