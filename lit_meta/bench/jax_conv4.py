"""Our Conv4 (:mod:`lit_meta.models.conv4`) as a pure JAX function, and its weights both ways.

The JAX port (:mod:`lit_meta.bench.jax_baseline`) needs the network in functional form: the
parameters are a list in ``Conv4.parameters()`` order (per block: conv weight, conv bias,
BatchNorm γ, β; then the head's weight and bias) and :func:`apply` is the same math as
Conv4's ``forward`` in training mode: 3x3 convolutions with padding 1 (stride 2 without
pooling, 1 with 2x2 max-pool), BatchNorm on the batch's own statistics (biased variance,
centred once, Conv4's ``eps``), ReLU, a linear head on the flattened map.

Layout: NHWC, the layout of the Haiku Conv4 in tristandeleu/jax-meta-learning
(``jax_meta/modules/conv.py``) and XLA's native one on CPU. So convolution weights go
OIHW -> HWIO and the head's weight is permuted from PyTorch's (C, H, W) flatten order to
(H, W, C); :func:`to_torch` undoes both, so gradients compare entry for entry.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax
from torch import Tensor

from lit_meta.models.conv4 import Conv4
from lit_meta.models.layers import PerStepBatchNorm


@dataclass(frozen=True)
class Conv4Shape:
    """What :func:`apply` needs beyond the weights (static under ``jit``)."""

    blocks: int
    max_pool: bool
    eps: float
    final_map: tuple[int, int, int]  # (C, H, W) of the last block's output

    @classmethod
    def of(cls, net: Conv4) -> "Conv4Shape":
        norms = [m for m in net.body if isinstance(m, PerStepBatchNorm)]
        if any(n.per_step_weights or n.per_step_stats or n.weight is None for n in norms) or net.head_pool != "flatten":
            raise ValueError("the JAX port covers the benchmark's Conv4 (one BatchNorm per block, flatten head)")
        channels = norms[-1].bias.shape[0]
        side = int(round((net.feature_dim / channels) ** 0.5))
        max_pool = any(isinstance(m, torch.nn.MaxPool2d) for m in net.body)
        return cls(len(norms), max_pool, norms[0].eps, (channels, side, side))


def _kinds(shape: Conv4Shape) -> list[str]:
    return ["conv", "vector", "vector", "vector"] * shape.blocks + ["head", "vector"]


def from_torch(net: Conv4, shape: Conv4Shape) -> list[jax.Array]:
    """``net``'s weights as JAX arrays in :func:`apply`'s layout (the tensors' dtype kept)."""
    c, h, w = shape.final_map
    out = []
    for kind, p in zip(_kinds(shape), net.parameters()):
        a = p.detach().cpu().numpy()
        if kind == "conv":
            a = a.transpose(2, 3, 1, 0)
        elif kind == "head":
            a = a.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)
        out.append(jnp.asarray(a))
    return out


def to_torch(arrays: list[jax.Array], shape: Conv4Shape) -> list[Tensor]:
    """:func:`from_torch`'s inverse: torch tensors in Conv4's layout."""
    c, h, w = shape.final_map
    out = []
    for kind, a in zip(_kinds(shape), arrays):
        a = np.array(a)  # a writable copy
        if kind == "conv":
            a = a.transpose(3, 2, 0, 1)
        elif kind == "head":
            a = a.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(a.shape[-1], -1)
        out.append(torch.from_numpy(np.ascontiguousarray(a)))
    return out


def apply(params: list[jax.Array], x: jax.Array, shape: Conv4Shape) -> jax.Array:
    """Logits for ``x`` ``[n, H, W, C]`` (NHWC), as Conv4's ``forward`` in training mode."""
    stride = 1 if shape.max_pool else 2
    for b in range(shape.blocks):
        w, bias, gamma, beta = params[4 * b: 4 * b + 4]
        x = lax.conv_general_dilated(x, w, (stride, stride), [(1, 1), (1, 1)],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
        centred = x - x.mean((0, 1, 2))
        var = (centred * centred).mean((0, 1, 2))
        x = jax.nn.relu(centred * (lax.rsqrt(var + shape.eps) * gamma) + beta)
        if shape.max_pool:
            x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return x.reshape(x.shape[0], -1) @ params[-2] + params[-1]
