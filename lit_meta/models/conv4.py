"""The conv4 backbone of Finn et al. 2017 (after Vinyals et al. 2016).

- Omniglot: 4 blocks of 3x3 conv with 64 filters and stride 2, no pooling.
- miniImageNet: 4 blocks of 3x3 conv with 32 filters, stride 1, then 2x2 max-pool.

Each block is conv -> BatchNorm -> ReLU; a linear head gives ``ways`` logits.
BatchNorm uses batch statistics: transductive, as the MAML papers evaluated, and safe
inside ``vmap`` (no buffer is written). It is built from basic tensor ops
(``PerStepBatchNorm``, whose per-step switches MAML++ turns on), because
``nn.BatchNorm2d``'s vmap batching rule gives wrong second-order gradients.

Options that match the authors' code where it differs from PyTorch's defaults (each
default keeps the original lit_meta network, so old checkpoints and configs are unchanged):

- ``head_pool``: ``flatten`` (default) feeds every position of the last map to the head;
  ``mean`` averages the map first, as ``cbfinn/maml`` does on Omniglot
  (``tf.reduce_mean(hidden4, [1, 2])``: 64 features from the 2x2 map).
- ``bn_scale``: false drops BatchNorm's weight γ (``tf.contrib.layers.batch_norm``'s
  default ``scale=False`` in cbfinn/maml); ``bn_eps``: its epsilon (TF: 1e-3).
- ``with_head``: false builds the body alone, an embedding whose ``forward`` gives the
  features (the metric and closed-form heads of ProtoNet and R2D2 need no linear head).
- ``init``: ``torch`` (default: PyTorch's); ``maml`` (cbfinn/maml: Glorot-uniform
  convolutions, zero biases, a head of N(0, 1) weights on a mean-pooled map, else
  Glorot-uniform); ``glorot`` (TensorFlow layers' defaults, as supervised-reptile uses:
  Glorot-uniform weights, zero biases); ``mamlpp`` (HowToTrainYourMAMLPytorch:
  Glorot-normal convolutions, N(0, 1) head weights, zero biases).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_meta.models.layers import BATCH, Norm, PerStepBatchNorm

HEAD_POOLS = ("flatten", "mean")
INITS = ("torch", "maml", "glorot", "mamlpp")


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
        bn_query_slot: bool = True,
        head_pool: str = "flatten",
        bn_scale: bool = True,
        bn_eps: float = 1e-5,
        init: str = "torch",
        with_head: bool = True,
    ) -> None:
        if head_pool not in HEAD_POOLS:
            raise ValueError(f"head_pool must be one of {HEAD_POOLS}, got {head_pool!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not bn_eps > 0:
            raise ValueError(f"bn_eps must be > 0, got {bn_eps}")
        super().__init__()
        self.head_pool = head_pool
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(blocks):
            stride = 1 if max_pool else 2
            # Not nn.BatchNorm2d: under vmap its second-order gradient is wrong
            # (pytorch/functorch#534, the batch_norm backward batching rule). Basic ops are exact.
            norm = PerStepBatchNorm(filters, bn_steps, bn_per_step_weights, bn_per_step_stats, eps=bn_eps,
                                    scale=bn_scale, query_slot=bn_query_slot)
            layers += [nn.Conv2d(channels, filters, 3, stride=stride, padding=1), norm, nn.ReLU()]
            if max_pool:
                layers.append(nn.MaxPool2d(2))
            channels = filters
        self.body = nn.ModuleList(layers)
        with torch.no_grad():
            self.feature_dim = self.features(torch.zeros(2, in_channels, image_size, image_size), 0).shape[1]
        # without a head the network is an embedding (metric and closed-form heads: ProtoNet, R2D2)
        self.head = nn.Linear(self.feature_dim, out_features) if with_head else None
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        """Initialise the convolutions and the head as ``init`` says (``torch`` leaves PyTorch's)."""
        if init == "torch":
            return
        convs = [m for m in self.body if isinstance(m, nn.Conv2d)]
        for conv in convs:
            (nn.init.xavier_normal_ if init == "mamlpp" else nn.init.xavier_uniform_)(conv.weight)
            nn.init.zeros_(conv.bias)
        if self.head is None:
            return
        normal_head = init == "mamlpp" or (init == "maml" and self.head_pool == "mean")
        (nn.init.normal_ if normal_head else nn.init.xavier_uniform_)(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def features(self, x: Tensor, step: int = 0, norm: Norm = BATCH) -> Tensor:
        """The body's output as ``[n, feature_dim]``: what the head reads."""
        for layer in self.body:
            x = layer(x, step, norm) if isinstance(layer, PerStepBatchNorm) else layer(x)
        return x.mean((-2, -1)) if self.head_pool == "mean" else x.flatten(1)

    def forward(self, x: Tensor, step: int = 0, norm: Norm = BATCH) -> Tensor:
        z = self.features(x, step, norm)
        return z if self.head is None else self.head(z)
