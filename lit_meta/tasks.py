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

from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

import torch
from torch import Tensor

from lit_meta.devices import pin, to_device


Batch = TypeVar("Batch", bound="TaskBatch")


@dataclass(frozen=True)
class Origin:
    """Where a batch's tasks come from, set by the DataModule that drew them: the split, the
    training step (0 for evaluation), the index of the batch's first task (in the global
    meta-batch in training, among the split's fixed tasks in evaluation), the data seed and
    the task stream's epoch. What a step computes may depend on these (the inner mini-batch
    schedule, MAML++'s epoch schedules): the model reads them here, from the data it is
    given, and never from the DataModule or the Trainer."""

    split: str
    step: int = 0
    first_task: int = 0
    seed: int = 0
    epoch: int = 0


@dataclass
class TaskBatch:
    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    # not a tensor: kept as is by ``to`` / ``pin_memory``, moved along by ``slice``
    origin: Origin | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        n = self.support_x.shape[0]
        for name, t in self.tensors().items():
            if t.shape[0] != n:
                raise ValueError(f"TaskBatch.{name} has {t.shape[0]} tasks, support_x has {n}")

    def tensors(self) -> dict[str, Tensor]:
        """The batch's tensor fields by name, in order (every one with the leading ``tasks`` dimension)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "origin"}

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def _with(self: Batch, tensors: Any, origin: Origin | None) -> Batch:
        return type(self)(*tensors, origin=origin)

    def to(self: Batch, device: torch.device | str, non_blocking: bool = False) -> Batch:
        # Lightning calls .to(device) on a batch object without non_blocking: host fields go
        # through pinned memory, non-blocking (lit_meta.devices), so the host never waits.
        return self._with((to_device(t, device) for t in self.tensors().values()), self.origin)

    def pin_memory(self: Batch) -> Batch:
        """Page-locked copies of the host fields (DataLoader's ``pin_memory=True`` calls this);
        fields already on a device (episodes drawn from a pool on the GPU) stay there."""
        return self._with((pin(t) for t in self.tensors().values()), self.origin)

    def slice(self: Batch, start: int, stop: int) -> Batch:
        """Tasks ``start:stop``; used to give each DDP rank its share of a global meta-batch."""
        origin = None if self.origin is None else replace(self.origin, first_task=self.origin.first_task + start)
        return self._with((t[start:stop] for t in self.tensors().values()), origin)

    def with_origin(self: Batch, origin: Origin) -> Batch:
        return self._with(self.tensors().values(), origin)

    @classmethod
    def cat(cls: type[Batch], batches: list[Batch]) -> Batch:
        """The tasks of ``batches`` in order (the origin of the first)."""
        names = list(batches[0].tensors())
        return cls(*(torch.cat([getattr(b, n) for b in batches]) for n in names), origin=batches[0].origin)


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
