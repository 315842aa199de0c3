"""MAML and first-order MAML (Finn, Abbeel & Levine 2017, "Model-Agnostic Meta-Learning
for Fast Adaptation of Deep Networks").

θ'_i = θ − α ∇_θ L_support_i(θ) (``inner_steps`` times), and the meta-update descends
Σ_i w_i L_query_i(θ'_i). Second order differentiates through the inner steps;
``first_order=True`` (FOMAML) drops the second-derivative terms. Everything lives in
``MetaLearner``: MAML is the default behaviour.
"""
from __future__ import annotations

from lit_meta.algorithms.base import MetaLearner


class MAML(MetaLearner):
    algorithm = "maml"

    @property
    def algorithm_name(self) -> str:
        return "fomaml" if self.first_order else "maml"
