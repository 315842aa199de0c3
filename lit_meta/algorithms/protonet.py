"""Prototypical Networks (Snell, Swersky & Zemel 2017, "Prototypical Networks for Few-shot
Learning").

Each class's prototype is the mean of its support embeddings, and a query example's logits
are −‖f(x) − c_k‖² (squared Euclidean, the paper's eq. 2); the meta-objective is the query
cross-entropy, back-propagated through the embedding (``EmbeddingLearner``, embedding.py:
no inner loop, support and query embedded together). ``distance: cosine`` scores
τ · cos(f(x), c_k) with a learned temperature τ (Meta-Baseline's head, Chen et al. 2021;
``scale``, its initial value).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lit_meta.algorithms.embedding import EmbeddingLearner
from lit_meta.models.heads import absent_classes_out, cosine_logits, euclidean_logits, prototypes

DISTANCES = ("euclidean", "cosine")


class ProtoNet(EmbeddingLearner):
    algorithm = "protonet"

    def __init__(self, distance: str = "euclidean", scale: float = 10.0, learn_scale: bool = True,
                 **kwargs: Any) -> None:
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        super().__init__(**kwargs)
        self.distance = distance
        # the cosine head's temperature τ, as a log so it stays positive (the Euclidean head has none)
        self.log_scale = nn.Parameter(torch.tensor(float(scale)).log(),
                                      requires_grad=learn_scale and distance == "cosine")

    def logits(self, support: Tensor, support_y: Tensor, query: Tensor) -> Tensor:
        centres, present = prototypes(support, support_y, self.ways)
        if self.distance == "euclidean":
            scores = euclidean_logits(query, centres)
        else:
            scores = cosine_logits(query, centres, self.log_scale.exp())
        return absent_classes_out(scores, present)
