"""ResNet-12, the backbone of MetaOptNet (Lee et al. 2019, "Meta-Learning with Differentiable
Convex Optimization", after TADAM, Oreshkin et al. 2018), used by nearly every few-shot table
since 2019.

Four residual blocks of 64-160-320-640 channels. A block is three 3x3 convolutions, each
followed by BatchNorm and LeakyReLU(0.1) (the third's activation after the shortcut is
added), a 1x1 convolution + BatchNorm shortcut, then 2x2 max-pooling; so 84x84 inputs give a
5x5x640 map. MetaOptNet's ``resnet12.py`` regularises with dropout in the first two blocks
and DropBlock (Ghiasi et al. 2018, block size 5) in the last two, at ``drop_rate`` (0.1 on
miniImageNet), in training only; its rate ramps up over the first 40k batches, here it is
constant (the network does not know the training step). The head reads the map averaged
(``head_pool: mean``, 640 features, as TADAM and Meta-Baseline) or flattened (``flatten``,
16000 features, as MetaOptNet's SVM).

BatchNorm is lit_meta's ``PerStepBatchNorm`` (exact second-order gradients under ``vmap``),
with MAML++'s per-step options, so every algorithm can use this backbone as it uses conv4.
Dropout and DropBlock draw random numbers: a network with ``drop_rate > 0`` says so
(``random_forward``), which inner checkpointing (a step recomputed must draw the same
numbers) refuses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_meta.models.layers import BATCH, Norm, PerStepBatchNorm

HEAD_POOLS = ("mean", "flatten")


def drop_block(x: Tensor, rate: float, block: int) -> Tensor:
    """DropBlock (Ghiasi et al. 2018): zero ``block`` x ``block`` squares of each channel, their
    centres drawn so that a fraction ``rate`` of the map is dropped, and rescale the rest."""
    size = x.shape[-1]
    block = min(block, size)
    gamma = rate / block ** 2 * size ** 2 / (size - block + 1) ** 2
    valid = size - block + 1
    centres = torch.bernoulli(torch.full((*x.shape[:-2], valid, valid), gamma, device=x.device, dtype=x.dtype))
    pad = block // 2
    centres = F.pad(centres, (pad, size - valid - pad, pad, size - valid - pad))
    dropped = F.max_pool2d(centres.reshape(-1, 1, size, size), block, stride=1, padding=block // 2)
    keep = 1 - dropped[..., :size, :size].reshape(x.shape)
    return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))


class Block(nn.Module):
    def __init__(self, in_channels: int, channels: int, drop_rate: float, drop_block_size: int | None,
                 norm_options: dict) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(c, channels, 3, padding=1, bias=False)
                                    for c in (in_channels, channels, channels)])
        self.norms = nn.ModuleList([PerStepBatchNorm(channels, **norm_options) for _ in range(3)])
        self.shortcut = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.shortcut_norm = PerStepBatchNorm(channels, **norm_options)
        self.drop_rate, self.drop_block_size = drop_rate, drop_block_size

    def forward(self, x: Tensor, step: int, norm: Norm) -> Tensor:
        out = x
        for i, (conv, bn) in enumerate(zip(self.convs, self.norms)):
            out = bn(conv(out), step, norm)
            if i < 2:
                out = F.leaky_relu(out, 0.1)
        out = F.leaky_relu(out + self.shortcut_norm(self.shortcut(x), step, norm), 0.1)
        out = F.max_pool2d(out, 2)
        if self.training and self.drop_rate > 0:
            out = drop_block(out, self.drop_rate, self.drop_block_size) if self.drop_block_size else \
                F.dropout(out, self.drop_rate, training=True)
        return out


class ResNet12(nn.Module):
    def __init__(self, in_channels: int, out_features: int, image_size: int,
                 channels: tuple[int, ...] = (64, 160, 320, 640), drop_rate: float = 0.0, drop_block_size: int = 5,
                 head_pool: str = "mean", with_head: bool = True, bn_steps: int = 0,
                 bn_per_step_weights: bool = False, bn_per_step_stats: bool = False,
                 bn_query_slot: bool = True) -> None:
        if head_pool not in HEAD_POOLS:
            raise ValueError(f"head_pool must be one of {HEAD_POOLS}, got {head_pool!r}")
        if not 0 <= drop_rate < 1:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        if len(channels) != 4:
            raise ValueError(f"channels must be the four blocks' widths, got {list(channels)}")
        super().__init__()
        norm_options = {"steps": bn_steps, "per_step_weights": bn_per_step_weights,
                        "per_step_stats": bn_per_step_stats, "query_slot": bn_query_slot}
        blocks, width = [], in_channels
        for i, c in enumerate(channels):
            # dropout in the first two blocks, DropBlock in the last two (MetaOptNet)
            blocks.append(Block(width, c, drop_rate, drop_block_size if i >= 2 else None, norm_options))
            width = c
        self.body = nn.ModuleList(blocks)
        self.head_pool = head_pool
        self.random_forward = drop_rate > 0
        with torch.no_grad():  # (in eval mode: the size probe draws no dropout masks)
            self.eval()
            self.feature_dim = self.features(torch.zeros(2, in_channels, image_size, image_size)).shape[1]
            self.train()
        self.head = nn.Linear(self.feature_dim, out_features) if with_head else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # MetaOptNet's initialisation
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def features(self, x: Tensor, step: int = 0, norm: Norm = BATCH) -> Tensor:
        for block in self.body:
            x = block(x, step, norm)
        return x.mean((-2, -1)) if self.head_pool == "mean" else x.flatten(1)

    def forward(self, x: Tensor, step: int = 0, norm: Norm = BATCH) -> Tensor:
        z = self.features(x, step, norm)
        return z if self.head is None else self.head(z)
