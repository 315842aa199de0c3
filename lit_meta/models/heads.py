"""Heads that are computed from a task's support set instead of learned per task: class
prototypes (Snell et al. 2017), their cosine form (Chen et al. 2021) and ridge regression
solved in closed form (Bertinetto et al. 2019). Pure functions of embeddings, differentiable,
and safe under ``vmap`` (no data-dependent shapes: an episode with fewer classes than the
model's ``ways`` leaves the other classes' logits at a large negative value)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def class_mask(labels: Tensor, ways: int) -> tuple[Tensor, Tensor]:
    """(one-hot ``[n, ways]`` of ``labels``, ``[ways]`` bool: the class has a support example)."""
    onehot = F.one_hot(labels, ways).to(torch.get_default_dtype())
    return onehot, onehot.sum(0) > 0


def absent_classes_out(logits: Tensor, present: Tensor) -> Tensor:
    """Logits of classes without support examples pushed far below the others."""
    low = torch.finfo(logits.dtype).min / 4  # finite: its gradient is zero, not NaN
    return torch.where(present, logits, torch.full_like(logits, low))


def prototypes(support: Tensor, labels: Tensor, ways: int) -> tuple[Tensor, Tensor]:
    """Class means of the support embeddings ``[n, d]`` -> (``[ways, d]``, present mask)."""
    onehot, present = class_mask(labels, ways)
    onehot = onehot.to(support.dtype)
    counts = onehot.sum(0).clamp_min(1.0)
    return (onehot.T @ support) / counts[:, None], present


def euclidean_logits(query: Tensor, centres: Tensor) -> Tensor:
    """−‖q − c‖² for every query embedding and centre (Snell et al. 2017, eq. 2)."""
    return -(query[:, None, :] - centres[None, :, :]).pow(2).sum(-1)


def cosine_logits(query: Tensor, centres: Tensor, scale: Tensor | float) -> Tensor:
    """τ · cos(q, c) (Chen et al. 2021's Meta-Baseline; Gidaris & Komodakis 2018)."""
    return scale * (F.normalize(query, dim=-1) @ F.normalize(centres, dim=-1).T)


def ridge_logits(support: Tensor, labels: Tensor, query: Tensor, ways: int, lam: Tensor | float,
                 scale: Tensor | float, bias: Tensor | float) -> Tensor:
    """R2-D2's head (Bertinetto et al. 2019, eq. 5 and its Woodbury form): ridge regression of
    one-hot targets on the support embeddings with a bias column, both divided by √n as the
    reference code does, solved in the dual, W = Xᵀ (X Xᵀ + λI)⁻¹ Y: an n x n system, cheap
    in the shot count whatever the embedding size. The query's scores are then α (q W) + β."""
    n = support.shape[0]
    ones = torch.ones(n, 1, dtype=support.dtype, device=support.device)
    x = torch.cat([support, ones], 1) / n ** 0.5
    onehot, present = class_mask(labels, ways)
    y = onehot.to(support.dtype) / n ** 0.5
    eye = torch.eye(n, dtype=support.dtype, device=support.device)
    w = x.T @ torch.linalg.solve(x @ x.T + lam * eye, y)  # [d + 1, ways]
    q = torch.cat([query, torch.ones(query.shape[0], 1, dtype=query.dtype, device=query.device)], 1)
    return absent_classes_out(scale * (q @ w) + bias, present)
