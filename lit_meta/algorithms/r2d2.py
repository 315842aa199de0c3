"""R2-D2 (Bertinetto, Henriques, Torr & Vedaldi 2019, "Meta-learning with differentiable
closed-form solvers").

An embedding (``EmbeddingLearner``, embedding.py: no inner loop, support and query embedded together),
with a ridge-regression head solved in closed form on each task's support set: W =
Xᵀ(XXᵀ + λI)⁻¹Y in the dual (Woodbury) form, an n x n system in the number of support
examples n, and query scores α (qW) + β (``lit_meta.models.heads.ridge_logits``). The solve is
differentiated exactly (``torch.linalg.solve``'s backward), so the meta-gradient reaches the
embedding through it. α and β are learned; λ is fixed by default as in the reference code
(bertinetto/r2d2, ``base_learner.learn_lambda: False``, ``init_lambda: 50``), learned with
``learn_lambda`` (as a log, so it stays positive). The reference initialises α at 1e-4 on
miniImageNet and CIFAR-FS and at 10 on Omniglot (``--base_learner.init_adj_scale``).

MetaOptNet's SVM head (Lee et al. 2019) is not here: it needs a differentiable QP solver.
The one it uses, qpth (0.0.18, 2024), pins numpy < 2 and requires cvxpy, so installing it
would downgrade a user's numpy; cvxpylayers (1.2, 2026) solves through external conic
solvers (by default diffcp and SCS, in numpy on the CPU; other backends need further
packages), a stack outside torch that was not tried here. An iterative dual solver written here
would be a second solver to maintain for one baseline. The ridge
head is MetaOptNet's own "RR" row and its closest closed-form relative.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lit_meta.algorithms.embedding import EmbeddingLearner
from lit_meta.models.heads import ridge_logits


class R2D2(EmbeddingLearner):
    algorithm = "r2d2"

    def __init__(self, lam: float = 50.0, learn_lambda: bool = False, scale: float = 1e-4, bias: float = 0.0,
                 **kwargs: Any) -> None:
        if not lam > 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        super().__init__(**kwargs)
        self.log_lam = nn.Parameter(torch.tensor(float(lam)).log(), requires_grad=learn_lambda)
        self.adjust_scale = nn.Parameter(torch.tensor(float(scale)))
        self.adjust_bias = nn.Parameter(torch.tensor(float(bias)))

    def logits(self, support: Tensor, support_y: Tensor, query: Tensor) -> Tensor:
        return ridge_logits(support, support_y, query, self.ways, self.log_lam.exp(), self.adjust_scale,
                            self.adjust_bias)
