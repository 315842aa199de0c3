"""The sine-regression network of Finn et al. 2017: 1-40-40-1 with ReLU."""
from __future__ import annotations

from torch import Tensor, nn

from lit_meta.models.layers import BATCH, Norm


class MLP(nn.Module):
    def __init__(self, in_features: int, out_features: int, hidden: tuple[int, ...] = (40, 40),
                 with_head: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.feature_dim = width
        self.head = nn.Linear(width, out_features) if with_head else None  # without: an embedding

    def features(self, x: Tensor, step: int = 0, norm: Norm = BATCH) -> Tensor:
        """The body's output: what the head reads."""
        return self.body(x)

    def forward(self, x: Tensor, step: int = 0, norm: Norm = BATCH) -> Tensor:
        # `step` is the inner-loop step and `norm` how BatchNorm normalises: per-step and
        # normalising layers (conv4's) read them; an MLP has neither.
        z = self.body(x)
        return z if self.head is None else self.head(z)
