"""ANIL (Raghu, Raghu, Bengio & Vinyals 2020, "Rapid Learning or Feature Reuse? Towards
Understanding the Effectiveness of MAML").

Almost No Inner Loop: only the head adapts to each task; the body is meta-learned in the
outer loop (second order through the head's steps unless ``first_order``). It is MAML with
the shared option ``adapt: head``; BOIL (boil.py) is its mirror, ``adapt: body``.
"""
from __future__ import annotations

from typing import Any

from lit_meta.algorithms.base import MetaLearner


class ANIL(MetaLearner):
    algorithm = "anil"

    fixed_adapt = "head"

    def __init__(self, adapt: str = "head", **kwargs: Any) -> None:  # the default LightningCLI shows
        super().__init__(adapt=adapt, **kwargs)
