"""The transfer-learning baseline that MAML (Finn et al. 2017, §5.1 "pretrained") and
Reptile compare against: one network trained on all training tasks' data pooled, with no
inner loop, then fine-tuned on each test task's support set with the same inner-loop
engine, steps and rate as the meta-learners, and reported with the same metrics.

Its outer contribution is each task's loss on its pooled support and query data at θ,
through the shared meta-step with uniform weights (the mean: plain pooled training).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_meta.algorithms.base import MetaLearner
from lit_meta.tasks import TaskBatch


class Transfer(MetaLearner):
    algorithm = "transfer"

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("weighting", "uniform") != "uniform":
            raise ValueError("the transfer baseline has no inner updates to weight: use weighting: uniform")
        super().__init__(**kwargs)

    def outer_update(self, batch: TaskBatch) -> dict[str, Tensor]:
        pooled = TaskBatch(batch.support_x, batch.support_y,
                           torch.cat([batch.support_x, batch.query_x], 1),
                           torch.cat([batch.support_y, batch.query_y], 1))
        out = self.run_tasks(pooled, 0, first_order=True, training=True)
        self.meta_step(self, None, query_losses=out["query_loss"])
        return out
