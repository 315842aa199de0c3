"""The transfer-learning baseline: train one network on the training data without an
inner loop, then fine-tune it on each test task's support set with the same inner-loop
engine, steps and rate as the meta-learners, and report the same metrics.

- Classification (Ravi & Larochelle 2017's "Baseline-finetune", the pre-trained-SGD
  baseline of twitter/meta-learning-lstm): one classifier over *all* training classes
  with their global labels (64-way on miniImageNet; on Omniglot each of the 1100 training
  characters' four rotations is a class, 4400-way, as the episodes treat them). Its batches
  are the training episodes' images with their class indices (the DataModule's
  ``global_labels``, :class:`~lit_meta.tasks.LabelledTaskBatch`), through the body and a
  classifier head of its own (``classifier``, ``task_spec["train_classes"]`` outputs). At
  test every episode starts from the trained body and a new ``ways``-way head, the same
  for every episode (``net.head``, never trained: its initialisation, or zeros with
  ``episode_head: zero``), and all of it is fine-tuned on the support set.
- Regression (Finn et al. 2017 §5.1 "pretrained"): the network trained on all training
  tasks' points pooled, each task's loss on its pooled support and query data at θ.

Either way the per-task losses go through the shared meta-step with uniform weights (the
mean: plain training).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_meta.algorithms.base import MetaLearner
from lit_meta.episode import EpisodeContext, run_tasks
from lit_meta.tasks import LabelledTaskBatch, TaskBatch

EPISODE_HEADS = ("random", "zero")


class Transfer(MetaLearner):
    algorithm = "transfer"

    def __init__(self, episode_head: str = "random", **kwargs: Any) -> None:
        if kwargs.get("weighting", "uniform") != "uniform":
            raise ValueError("the transfer baseline has no inner updates to weight: use weighting: uniform")
        if episode_head not in EPISODE_HEADS:
            raise ValueError(f"episode_head must be one of {EPISODE_HEADS}, got {episode_head!r}")
        super().__init__(**kwargs)
        if episode_head == "zero":
            with torch.no_grad():
                self.net.head.weight.zero_()
                self.net.head.bias.zero_()
        classes = self.task_spec.get("train_classes")
        self.classifier = nn.Linear(self.net.feature_dim, classes) if classes else None

    def outer_update(self, batch: TaskBatch, ctx: EpisodeContext | None = None) -> dict[str, Tensor]:
        ctx = self.context(True, batch) if ctx is None else ctx
        if self.regression:
            pooled = TaskBatch(batch.support_x, batch.support_y,
                               torch.cat([batch.support_x, batch.query_x], 1),
                               torch.cat([batch.support_y, batch.query_y], 1))
            out = run_tasks(self, pooled, ctx, 0, first_order=True)
            self.meta_step(self, None, query_losses=out["query_loss"])
            return out
        if not isinstance(batch, LabelledTaskBatch) or self.classifier is None:
            raise ValueError("the transfer baseline pre-trains one classifier over all training classes: its data "
                             "must give global class labels (an image DataModule with --data.init_args.global_labels "
                             "true)")
        x = torch.cat([batch.support_x, batch.query_x], 1)
        classes = torch.cat([batch.support_classes, batch.query_classes], 1)
        tasks, n = classes.shape
        # one batch through the body: a classifier's batch norm sees all of it, as in plain training
        logits = self.classifier(self.net.features(x.reshape(tasks * n, *x.shape[2:])))
        losses = F.cross_entropy(logits, classes.reshape(-1), reduction="none").reshape(tasks, n)
        accuracy = (logits.argmax(-1) == classes.reshape(-1)).float().reshape(tasks, n).mean(1)
        self.meta_step(self, None, query_losses=losses.mean(1))
        return {"final_query_loss": losses.detach().mean(1), "query_acc": accuracy}

    def before_load_state(self, state_dict: dict[str, Tensor]) -> None:
        # meta-tested on data without global labels: the classifier is built from the checkpoint's shape
        weight = state_dict.get("classifier.weight")
        if weight is not None and (self.classifier is None or self.classifier.weight.shape != weight.shape):
            self.classifier = nn.Linear(weight.shape[1], weight.shape[0], device=self.net.head.weight.device)
