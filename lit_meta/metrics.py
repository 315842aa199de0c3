"""Evaluation metrics over a fixed set of tasks: a mean and its 95% confidence interval.

Each rank adds up, per metric, Σx, Σx² and n over the tasks it evaluated (float64, on
the device); at the end of the epoch the sums are all-reduced once, so the mean and the
CI are over exactly the global task set whatever the world size, and nothing is
averaged twice. A rank that evaluated no task (fewer tasks than ranks) adds zeros: the
ranks first exchange which sums they hold, so it still joins the all-reduce. The CI is the
normal approximation 1.96·s/√n with the sample standard deviation s, as the few-shot
papers report it (e.g. Finn et al. 2017, Nichol et al. 2018).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def moments(values: Tensor) -> Tensor:
    """``[Σx, Σx², n]`` of all entries of ``values``, in float64."""
    v = values.detach().double()
    # n filled on the device: torch.tensor(n, device=...) would copy from the host, and wait
    return torch.stack([v.sum(), (v * v).sum(), torch.full((), float(v.numel()), device=v.device, dtype=v.dtype)])


def mean_ci95(moment_sums: Tensor) -> tuple[float, float, float]:
    """``(mean, 95% CI half-width, n)`` from ``[Σx, Σx², n]``; the CI is NaN when the spread is not finite."""
    total, squares, n = moment_sums.tolist()
    mean = total / n
    var = max(squares - n * mean * mean, 0.0) / max(n - 1, 1)
    return mean, (1.96 * math.sqrt(var / n) if math.isfinite(var) else math.nan), n


class MetricSums:
    """Named running sums (any shape, float64): ``add`` per batch, ``reduce`` once per epoch."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}

    def add(self, key: str, sums: Tensor) -> None:
        self.sums[key] = sums if key not in self.sums else self.sums[key] + sums

    def add_moments(self, key: str, values: Tensor) -> None:
        self.add(key, moments(values))

    def reset(self) -> None:
        self.sums = {}

    def reduce(self, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """The sums over every DDP rank; resets. Every rank must call it. A key some rank never
        added counts as zeros there; ``device`` holds those (the collective backend's device,
        e.g. the rank's GPU under NCCL)."""
        sums, self.sums = self.sums, {}
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return sums
        held = [(key, tuple(value.shape)) for key, value in sums.items()]
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, held)
        shapes: dict[str, tuple[int, ...]] = {}
        for key, shape in (entry for rank_held in everyone for entry in rank_held):
            if shapes.setdefault(key, shape) != shape:
                raise RuntimeError(f"metric {key!r} has shape {list(shape)} on one rank, {list(shapes[key])} on another")
        if not shapes:
            return sums
        if device is None:
            device = next(iter(sums.values())).device if sums else torch.device("cpu")
        # one all-reduce for all metrics: every rank lays them out in the same (gathered) order
        flat = torch.cat([sums[key].reshape(-1).to(device, torch.float64) if key in sums
                          else torch.zeros(math.prod(shape), dtype=torch.float64, device=device)
                          for key, shape in shapes.items()])
        dist.all_reduce(flat)
        reduced, offset = {}, 0
        for key, shape in shapes.items():
            size = math.prod(shape)
            reduced[key] = flat[offset:offset + size].reshape(shape)
            offset += size
        return reduced
