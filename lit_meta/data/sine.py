"""Sine-wave regression (Finn et al. 2017, section 5.1).

A task is y = A sin(x − φ) with amplitude A ~ U[0.1, 5.0], phase φ ~ U[0, π] and
inputs x ~ U[−5, 5]; K support and K query points per task, MSE loss.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from lit_meta.data.base import EpisodicDataModule, check_positive
from lit_meta.tasks import TaskBatch, task_spec


def sine_tasks(generator: torch.Generator, num_tasks: int, shots: int, queries: int,
               amplitude: tuple[float, float] = (0.1, 5.0), phase: tuple[float, float] = (0.0, math.pi),
               x_range: tuple[float, float] = (-5.0, 5.0)) -> tuple[TaskBatch, torch.Tensor, torch.Tensor]:
    """``num_tasks`` sine tasks; also returns each task's amplitude and phase."""
    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=generator)

    amp = uniform(*amplitude, num_tasks)
    ph = uniform(*phase, num_tasks)
    x = uniform(*x_range, num_tasks, shots + queries, 1)
    y = amp[:, None, None] * torch.sin(x - ph[:, None, None])
    batch = TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])
    return batch, amp, ph


class SineDataModule(EpisodicDataModule):
    name = "sine"

    def __init__(self, shots: int = 10, queries: int | None = None, meta_batch_size: int = 25,
                 eval_batch_size: int | None = 100, **kwargs: Any) -> None:
        # K support (``shots``) and query points per task (``queries``, default K); the
        # rest of the task stream's options are :class:`EpisodicDataModule`'s.
        super().__init__(meta_batch_size=meta_batch_size, eval_batch_size=eval_batch_size, **kwargs)
        check_positive("shots", shots)
        if queries is not None:
            check_positive("queries", queries)
        self.shots = shots
        self.queries = shots if queries is None else queries

    @property
    def task_spec(self) -> dict[str, Any]:
        return task_spec("sine", "regression", [1], ways=1)

    def sample_tasks(self, split: str, generator: torch.Generator, num_tasks: int) -> TaskBatch:
        return sine_tasks(generator, num_tasks, self.shots, self.queries)[0]
