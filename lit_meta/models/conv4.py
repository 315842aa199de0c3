"""The conv4 backbone of Finn et al. 2017 (after Vinyals et al. 2016).

- Omniglot: 4 blocks of 3x3 conv with 64 filters and stride 2, no pooling.
- miniImageNet: 4 blocks of 3x3 conv with 32 filters, stride 1, then 2x2 max-pool.

Each block is conv -> BatchNorm -> ReLU; a linear head gives ``ways`` logits.
BatchNorm uses batch statistics: transductive, as the MAML papers evaluated, and safe
inside ``vmap`` (no buffer is written). It is built from basic tensor ops
(``PerStepBatchNorm``, whose per-step switches MAML++ turns on), because
``nn.BatchNorm2d``'s vmap batching rule gives wrong second-order gradients.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_meta.models.layers import PerStepBatchNorm


class Conv4(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_features: int,
        image_size: int,
        filters: int = 64,
        max_pool: bool = False,
        blocks: int = 4,
        bn_steps: int = 0,
        bn_per_step_weights: bool = False,
        bn_per_step_stats: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(blocks):
            stride = 1 if max_pool else 2
            # Not nn.BatchNorm2d: under vmap its second-order gradient is wrong
            # (pytorch/functorch#534, the batch_norm backward batching rule). Basic ops are exact.
            norm = PerStepBatchNorm(filters, bn_steps, bn_per_step_weights, bn_per_step_stats)
            layers += [nn.Conv2d(channels, filters, 3, stride=stride, padding=1), norm, nn.ReLU()]
            if max_pool:
                layers.append(nn.MaxPool2d(2))
            channels = filters
        self.body = nn.ModuleList(layers)
        with torch.no_grad():
            features = self._features(torch.zeros(2, in_channels, image_size, image_size), 0).shape[1]
        self.head = nn.Linear(features, out_features)

    def _features(self, x: Tensor, step: int) -> Tensor:
        for layer in self.body:
            x = layer(x, step) if isinstance(layer, PerStepBatchNorm) else layer(x)
        return x.flatten(1)

    def forward(self, x: Tensor, step: int = 0) -> Tensor:
        return self.head(self._features(x, step))
