"""The meta-batch contract every DataModule emits and every algorithm consumes.

A meta-batch holds ``tasks`` independent few-shot problems stacked on a leading
dimension, so the inner loop can ``vmap`` over it:

- ``support_x``: ``[tasks, n_support, *input_shape]``
- ``support_y``: ``[tasks, n_support]`` (class ids, int64) or ``[tasks, n_support, out]`` (regression)
- ``query_x``:   ``[tasks, n_query, *input_shape]``
- ``query_y``:   ``[tasks, n_query]`` or ``[tasks, n_query, out]``

Class ids are episode-local (``0..ways-1``), as in Finn et al. 2017.

Subclasses add fields with the same leading ``tasks`` dimension (e.g.
``lit_meta.data.optimizees.OptimizeeBatch``'s starting points, or
:class:`LabelledTaskBatch`'s global class indices); ``to``, ``slice`` and ``cat`` act on
every field and return the subclass.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypeVar

import torch
from torch import Tensor

from lit_meta.devices import pin, to_device


Batch = TypeVar("Batch", bound="TaskBatch")


@dataclass
class TaskBatch:
    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __post_init__(self) -> None:
        n = self.support_x.shape[0]
        for f in fields(self):
            t = getattr(self, f.name)
            if t.shape[0] != n:
                raise ValueError(f"TaskBatch.{f.name} has {t.shape[0]} tasks, support_x has {n}")

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def to(self: Batch, device: torch.device | str, non_blocking: bool = False) -> Batch:
        # Lightning calls .to(device) on a batch object without non_blocking: host fields go
        # through pinned memory, non-blocking (lit_meta.devices), so the host never waits.
        return type(self)(*(to_device(getattr(self, f.name), device) for f in fields(self)))

    def pin_memory(self: Batch) -> Batch:
        """Page-locked copies of the host fields (DataLoader's ``pin_memory=True`` calls this);
        fields already on a device (episodes drawn from a pool on the GPU) stay there."""
        return type(self)(*(pin(getattr(self, f.name)) for f in fields(self)))

    def slice(self: Batch, start: int, stop: int) -> Batch:
        """Tasks ``start:stop``; used to give each DDP rank its share of a global meta-batch."""
        return type(self)(*(getattr(self, f.name)[start:stop] for f in fields(self)))

    @classmethod
    def cat(cls: type[Batch], batches: list[Batch]) -> Batch:
        return cls(*(torch.cat([getattr(b, f.name) for b in batches]) for f in fields(cls)))


@dataclass
class LabelledTaskBatch(TaskBatch):
    """A :class:`TaskBatch` that also says which class of the split each example is: the
    index of its class among the split's classes (rotated copies counting as classes of
    their own), ``[tasks, n_support]`` and ``[tasks, n_query]``, int64. An image DataModule
    gives these training batches when its ``global_labels`` is set: the transfer baseline
    pre-trains one classifier over all training classes with them (Ravi & Larochelle 2017)."""

    support_classes: Tensor
    query_classes: Tensor


def task_spec(
    dataset: str,
    kind: str,
    input_shape: list[int],
    ways: int,
    **pipeline: Any,
) -> dict[str, Any]:
    """What a model must know about its data, saved in every checkpoint's hparams.

    ``kind`` is ``"regression"`` or ``"classification"``; ``ways`` is the output width
    (1 for sine). ``pipeline`` holds what turns raw files into the tensors training saw
    (image_size, channels, invert, mean, std), so a checkpoint can be adapted from files.
    """
    if kind not in ("regression", "classification"):
        raise ValueError(f"task kind must be 'regression' or 'classification', got {kind!r}")
    return {"dataset": dataset, "kind": kind, "input_shape": list(input_shape), "ways": int(ways), **pipeline}
