"""Meta-SGD (Li, Zhou, Chen & Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning").

θ'_i = θ − α ⊙ ∇L_support_i(θ) with α a learned tensor of the same shape as each
parameter, initialised to ``inner_lr`` and meta-learned with θ through the query loss.
"""
from __future__ import annotations

from typing import Any

import torch

from lit_meta.algorithms.base import MetaLearner
from lit_meta.algorithms.learned_rates import LearnedRates
from lit_meta.update_rules import SGD, UpdateRule


class MetaSGD(MetaLearner):
    algorithm = "metasgd"

    def __init__(self, learn_inner_lr: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inner_lrs = LearnedRates({n: torch.full_like(p, self.inner_lr) for n, p in self.net.named_parameters()},
                                      learn=learn_inner_lr)

    def update_rule(self, training: bool) -> UpdateRule:
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
