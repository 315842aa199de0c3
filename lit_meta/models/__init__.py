"""Networks only: no training logic. Every network has a ``head`` (nn.Linear) and takes
``forward(x, step=0, norm=BATCH)``: the inner step (per-step layers, MAML++) and how its
BatchNorm normalises (``lit_meta.models.layers.Norm``), both passed with each call."""
from __future__ import annotations

from typing import Any

from torch import nn

from lit_meta.models.conv4 import Conv4
from lit_meta.models.mlp import MLP
from lit_meta.models.resnet12 import ResNet12

BACKBONES = ("auto", "mlp", "conv4", "resnet12")


def build_network(backbone: str, task_spec: dict[str, Any], **kwargs: Any) -> nn.Module:
    """Build ``backbone`` for the data described by ``task_spec`` (see lit_meta.tasks.task_spec)."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    shape = task_spec["input_shape"]
    if backbone == "auto":
        backbone = "mlp" if len(shape) == 1 else "conv4"
    if backbone == "mlp":
        if len(shape) != 1:
            raise ValueError(f"backbone 'mlp' needs flat inputs, the data gives shape {shape}")
        return MLP(shape[0], task_spec["ways"], **kwargs)
    if len(shape) != 3:
        raise ValueError(f"backbone {backbone!r} needs [channels, H, W] inputs, the data gives shape {shape}")
    cls = ResNet12 if backbone == "resnet12" else Conv4
    return cls(shape[0], task_spec["ways"], image_size=shape[-1], **kwargs)


__all__ = ["BACKBONES", "Conv4", "MLP", "ResNet12", "build_network"]
