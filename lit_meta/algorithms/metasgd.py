"""Meta-SGD (Li, Zhou, Chen & Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning").

θ'_i = θ − α ⊙ ∇L_support_i(θ) with α a learned tensor of the same shape as each
parameter, initialised to ``inner_lr`` (default) or, with ``inner_lr_range: [lo, hi]``,
each entry drawn uniformly from [lo, hi] (the paper: "randomly from [0.005, 0.1]"), and
meta-learned with θ through the query loss. The paper takes one inner step in training
and at test.
"""
from __future__ import annotations

from typing import Any

import torch

from lit_meta.algorithms.base import MetaLearner
from lit_meta.algorithms.learned_rates import LearnedRates
from lit_meta.episode import EpisodeContext
from lit_meta.update_rules import SGD, UpdateRule


class MetaSGD(MetaLearner):
    algorithm = "metasgd"

    def __init__(self, learn_inner_lr: bool = True, inner_lr_range: tuple[float, float] | None = None,
                 **kwargs: Any) -> None:
        if inner_lr_range is not None and not 0 < inner_lr_range[0] <= inner_lr_range[1]:
            raise ValueError(f"inner_lr_range must be [low, high] with 0 < low <= high, got {list(inner_lr_range)}")
        super().__init__(**kwargs)
        if inner_lr_range is None:
            rates = {n: torch.full_like(p, self.inner_lr) for n, p in self.net.named_parameters()}
        else:
            low, high = inner_lr_range
            rates = {n: torch.empty_like(p).uniform_(low, high) for n, p in self.net.named_parameters()}
        self.inner_lrs = LearnedRates(rates, learn=learn_inner_lr)

    def update_rule(self, ctx: EpisodeContext) -> UpdateRule:
        return SGD({n: self.inner_lrs.of(n) for n in self.adapt_names()})

    def set_inner_lr(self, inner_lr: float) -> bool:
        super().set_inner_lr(inner_lr)
        self.inner_lrs.fill_(inner_lr)
        return True

    def resize_head(self, ways: int) -> int:
        """The head's rates get one row per new class: the mean of the learned rows."""
        old = super().resize_head(ways)
        if old != ways:
            for name in ("head.weight", "head.bias"):
                row = self.inner_lrs.of(name).detach().mean(0, keepdim=True)
                self.inner_lrs.replace(name, row.expand(ways, *row.shape[1:]).clone())
        return old
