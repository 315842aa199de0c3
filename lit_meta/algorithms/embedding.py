"""``EmbeddingLearner``: what the metric and closed-form heads share (ProtoNet, R2-D2,
Meta-Baseline): a network without a head embeds each episode, and a head computed from the
support set scores the query; there is no inner loop and no per-task update.

- The episode's support and query examples are embedded together, BatchNorm statistics the
  episode's, as the reference code of Prototypical Networks does (jakesnell/
  prototypical-networks ``protonet.py`` concatenates them into one encoder batch); evaluation
  follows ``transductive`` as for every algorithm (``support``: the support set's statistics;
  ``false``: each query example beside the support set).
- ``inner_steps`` is 0, and Gradient Agreement, which weights tasks by their inner updates,
  does not apply: either set otherwise is a one-line error.
- Training episodes may have more classes than the test ones (60-way on Omniglot): the
  network has no head, and classes an episode lacks are left out of its logits.
- ``train.py adapt`` computes the head from the support folder: no gradient steps.

A subclass implements ``logits(support, support_y, query)`` on the embeddings.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from lit_meta.algorithms.base import MetaLearner
from lit_meta.episode import EpisodeContext
from lit_meta.inner import Params
from lit_meta.models.layers import Norm


class EmbeddingLearner(MetaLearner):
    def __init__(self, inner_steps: int = 0, **kwargs: Any) -> None:
        name = type(self).algorithm
        if inner_steps != 0 or kwargs.get("eval_inner_steps") not in (None, 0):
            raise ValueError(f"{name} has no inner loop: inner_steps and eval_inner_steps must be 0 (or unset)")
        if kwargs.get("weighting", "uniform") != "uniform":
            raise ValueError(f"weighting {kwargs['weighting']!r} weights tasks by their inner updates, and {name} "
                             "has none: use weighting: uniform")
        super().__init__(inner_steps=0, **kwargs)
        if self.regression:
            raise ValueError(f"{name} classifies: its head is computed from the support set's classes, and "
                             f"{self.task_spec.get('dataset')!r} is a regression dataset")
        self.ways = int(self.task_spec["ways"])

    def backbone_options(self) -> dict[str, Any]:
        return {"with_head": False}  # an embedding: the head is computed from the support set

    def embed(self, params: Params, support_x: Tensor, query_x: Tensor, ctx: EpisodeContext) -> tuple[Tensor, Tensor]:
        """Support and query embeddings, BatchNorm as the module docstring says."""
        n = support_x.shape[0]
        if ctx.training or ctx.bn in ("transductive", "running"):
            z = self.forward_fn(params, torch.cat([support_x, query_x]))
            return z[:n], z[n:]
        if ctx.bn == "support":
            z = self.forward_fn(params, torch.cat([support_x, query_x]), 0, Norm(support_rows=n))
            return z[:n], z[n:]
        zs = self.forward_fn(params, support_x)
        return zs, vmap(lambda x: self.forward_fn(params, torch.cat([support_x, x[None]]))[-1])(query_x)

    def logits(self, support: Tensor, support_y: Tensor, query: Tensor) -> Tensor:
        raise NotImplementedError

    def predict(self, params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor, step: int,
                ctx: EpisodeContext) -> Tensor:
        support, query = self.embed(params, support_x, query_x, ctx)
        return self.logits(support, support_y, query)

    def resize_head(self, ways: int) -> int:
        """No head to resize: the head is computed for as many classes as the support set has."""
        self.ways = max(self.ways, ways)
        return ways

    def set_inner_lr(self, inner_lr: float) -> bool:
        raise ValueError(f"inner_lr does not apply to {self.algorithm}: it takes no gradient steps on a task")
