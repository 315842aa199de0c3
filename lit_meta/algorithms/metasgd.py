"""Meta-SGD (Li, Zhou, Chen & Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning").

θ'_i = θ − α ⊙ ∇L_support_i(θ) with α a learned tensor of the same shape as each
parameter, initialised to ``inner_lr`` and meta-learned with θ through the query loss.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lit_meta.algorithms.base import MetaLearner
from lit_meta.inner import SGD, UpdateRule


def lr_key(name: str) -> str:
    """ParameterDict keys cannot hold dots."""
    return name.replace(".", "__")


class MetaSGD(MetaLearner):
    algorithm = "metasgd"

    def __init__(self, learn_inner_lr: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inner_lrs = nn.ParameterDict({
            lr_key(n): nn.Parameter(torch.full_like(p, self.inner_lr), requires_grad=learn_inner_lr)
            for n, p in self.net.named_parameters()
        })

    def update_rule(self, training: bool) -> UpdateRule:
        return SGD({n: self.inner_lrs[lr_key(n)] for n in self.adapt_names()})
