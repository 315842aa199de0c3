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

from lit_meta.algorithms.base import MetaLearner


class BOIL(MetaLearner):
    algorithm = "boil"

    def __init__(self, adapt: str = "body", **kwargs: Any) -> None:
        if adapt != "body":
            raise ValueError(f"BOIL adapts the body only (adapt: body), got adapt: {adapt}; MAML with adapt: "
                             f"{adapt} is that algorithm")
        super().__init__(adapt=adapt, **kwargs)
