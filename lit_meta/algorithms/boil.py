"""BOIL (Oh, Yoo, Kim & Yun 2021, "BOIL: Towards Representation Change for Few-shot Learning").

Body Only update in Inner Loop: the mirror of ANIL. In the inner loop the body (every layer
but the head) adapts to the task while the head stays as meta-learned; the outer loop
learns both. It is MAML with the shared option ``adapt: body``, so everything MAML has
(second or first order, task chunks, inner checkpointing, Gradient Agreement, DDP) holds
for it unchanged. The paper's conv4 has BatchNorm weights and biases adapted with the
body (``adapt_bn: true``, lit_meta's default).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lit_meta.algorithms.base import MetaLearner


class BOIL(MetaLearner):
    algorithm = "boil"

    fixed_adapt = "body"

    def __init__(self, adapt: str = "body", **kwargs: Any) -> None:  # the default LightningCLI shows
        super().__init__(adapt=adapt, **kwargs)

    def resize_head(self, ways: int) -> int:
        """A task with fewer classes keeps the first ``ways`` rows of the meta-learned head: the
        inner loop cannot move a head, so a zero one (``MetaLearner.resize_head``) would give the
        body no gradient. The rows are interchangeable (training episodes permute their labels)."""
        head = self.net.head
        old = head.out_features
        if ways > old:
            raise ValueError(f"BOIL keeps its meta-learned head fixed in the inner loop: a {ways}-way task needs a "
                             f"checkpoint trained with at least {ways} classes, this one has {old}")
        if ways < old:
            new = nn.Linear(head.in_features, ways, device=head.weight.device, dtype=head.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(head.weight[:ways])
                new.bias.copy_(head.bias[:ways])
            self.net.head = new
        return old

    def resized_head_note(self, ways: int) -> str:
        return f"keeping the first {ways} rows of the meta-learned head (BOIL adapts the body only)"
