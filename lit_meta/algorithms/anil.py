"""ANIL (Raghu, Raghu, Bengio & Vinyals 2020, "Rapid Learning or Feature Reuse? Towards
Understanding the Effectiveness of MAML").

Almost No Inner Loop: only the head adapts to each task; the body is meta-learned in the
outer loop (second order through the head's steps unless ``first_order``).
"""
from __future__ import annotations

from typing import Any

from lit_meta.algorithms.base import MetaLearner


class ANIL(MetaLearner):
    algorithm = "anil"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not any(n.startswith("head.") for n, _ in self.net.named_parameters()):
            raise ValueError(f"ANIL needs a backbone with a `head` module; {type(self.net).__name__} has none")

    def adapt_names(self) -> list[str]:
        return [n for n, _ in self.net.named_parameters() if n.startswith("head.")]
