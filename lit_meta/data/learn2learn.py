"""Train on learn2learn task datasets: an adapter from its ``TaskDataset`` to our ``TaskBatch``.

Optional extra: learn2learn 0.2.0 does not ``pip install`` on Python >= 3.11, so install
it with ``bash benchmarks/install_learn2learn.sh``. It is imported only when an adapter
is built.

Give it learn2learn tasksets, one per split (``train`` / ``validation`` / ``test``, or a
``BenchmarkTasksets`` from ``l2l.vision.benchmarks.get_tasksets``). Each sampled task is
``(data, labels)`` with ``shots + queries`` samples of each of ``ways`` classes, in any
order (as ``NWays`` / ``KShots`` / ``LoadData`` / ``RemapLabels`` build it); the adapter
splits it per class the way learn2learn's examples do: of each class's samples, in the
order the task lists them, the first ``shots`` are support and the next ``queries`` query.
Labels become episode-local: the ``k``-th smallest label of the task is class ``k``
(after ``RemapLabels`` that is the label learn2learn gave). Support and query are
class-major (all of class 0, then class 1, ...), as our own samplers emit them.

Seeding: learn2learn samples with Python's ``random`` (and, in some transforms, numpy's
and torch's global generators), not with a ``torch.Generator``. So for every meta-batch
the adapter draws one 63-bit seed from the step's generator (``derive_seed(seed, split,
step)``, see ``lit_meta.data.base``), seeds ``random``, ``numpy.random`` and torch's CPU
generator with it, samples the meta-batch's tasks one after another, and then restores
all three generators' previous states. A step's tasks are therefore a function of
``(seed, split, step)``: resumes and reruns draw the same tasks, and the rest of the
program's randomness is untouched. A DDP rank draws the whole global meta-batch and keeps
its share, as every EpisodicDataModule does. Two caveats: a ``TaskDataset`` with
``num_tasks > 0`` caches the descriptions it has sampled, so its tasks also depend on which
indices were drawn before; and transforms that keep their own generator are not seeded.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from lit_meta.data.base import FewShotDataModule
from lit_meta.tasks import TaskBatch, task_spec

INSTALL_HINT = ("learn2learn is not installed; it is an optional extra: run "
                "`bash benchmarks/install_learn2learn.sh` (learn2learn 0.2.0 does not pip-install on Python >= 3.11)")
_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}


def require_learn2learn() -> Any:
    """``import learn2learn``, or a one-line ImportError saying how to install it."""
    try:
        import learn2learn
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error})") from None
    return learn2learn


def split_task(data: Tensor, labels: Tensor, ways: int, shots: int, queries: int) -> tuple[Tensor, ...]:
    """One learn2learn task -> (support_x, support_y, query_x, query_y), class-major, labels 0..ways-1."""
    labels = torch.as_tensor(labels).reshape(-1)
    classes = labels.unique(sorted=True)
    if len(classes) != ways:
        raise ValueError(f"a learn2learn task has {len(classes)} classes, the adapter expects ways={ways}")
    support, query = [], []
    for c in classes:
        where = (labels == c).nonzero().flatten()
        if len(where) != shots + queries:
            raise ValueError(f"a learn2learn task has {len(where)} samples of class {int(c)}, the adapter expects "
                             f"shots + queries = {shots} + {queries}")
        support.append(where[:shots])
        query.append(where[shots:])
    support_idx, query_idx = torch.cat(support), torch.cat(query)
    local = torch.arange(ways)
    return (data[support_idx], local.repeat_interleave(shots), data[query_idx], local.repeat_interleave(queries))


class Learn2LearnDataModule(FewShotDataModule):
    """Episodes from learn2learn tasksets, as our ``TaskBatch``.

    ``tasksets`` is anything with ``.train`` / ``.validation`` / ``.test`` (learn2learn's
    ``BenchmarkTasksets``); or pass ``train``, ``validation``, ``test`` one by one
    (``validation`` and ``test`` may be omitted if you never validate or test).
    ``eval_*`` default to the training values. ``input_shape`` defaults to the shape of
    one sample of a train task (drawn once, with the generators' states restored).
    """

    name = "learn2learn"

    def __init__(
        self,
        tasksets: Any = None,
        train: Any = None,
        validation: Any = None,
        test: Any = None,
        input_shape: Sequence[int] | None = None,
        dataset: str = "learn2learn",
        queries: int = 1,
        meta_batch_size: int = 32,
        **kwargs: Any,
    ) -> None:
        require_learn2learn()
        super().__init__(queries=queries, meta_batch_size=meta_batch_size, **kwargs)
        if tasksets is not None:
            if any(t is not None for t in (train, validation, test)):
                raise ValueError("give either tasksets or train/validation/test, not both")
            train, validation, test = tasksets.train, tasksets.validation, tasksets.test
        if train is None:
            raise ValueError("Learn2LearnDataModule needs a train taskset")
        self.tasksets = {"train": train, "val": validation, "test": test}
        self.dataset = dataset
        self._input_shape = list(input_shape) if input_shape is not None else None

    @property
    def task_spec(self) -> dict[str, Any]:
        if self._input_shape is None:
            batch = self.sample_tasks("train", torch.Generator().manual_seed(0), 1)
            self._input_shape = list(batch.support_x.shape[2:])
        return task_spec(self.dataset, "classification", self._input_shape, self.num_outputs)

    def sample_tasks(self, split: str, generator: torch.Generator, num_tasks: int) -> TaskBatch:
        taskset = self.tasksets[split]
        if taskset is None:
            raise ValueError(f"Learn2LearnDataModule was given no {_SPLIT_NAMES[split]} taskset")
        ways, shots, queries = self.episode(split)
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        with _seeded(seed):
            tasks = [split_task(*taskset.sample()[:2], ways, shots, queries) for _ in range(num_tasks)]
        return TaskBatch(*(torch.stack([t[i] for t in tasks]) for i in range(4)))


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """``random``, ``numpy.random`` and torch's CPU generator seeded from ``seed`` inside;
    their previous states restored on the way out (also on error)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
