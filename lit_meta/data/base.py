"""Episodic sampling shared by every DataModule.

Seeding (documented in the README): the tasks of training step ``s`` come from a
``torch.Generator`` seeded with ``derive_seed(seed, "train", s)``. A meta-batch is
always drawn for the *global* ``meta_batch_size``; DDP rank ``r`` of ``W`` keeps tasks
``[r*B/W, (r+1)*B/W)``. So

- a resumed run draws exactly the tasks an uninterrupted run would (the sampler state
  *is* the global step, restored by Lightning with the checkpoint),
- ``W`` ranks together adapt exactly the tasks one process would, which is what makes
  the DDP meta-gradient equal the single-process one, and
- every batch says where its tasks come from (:class:`~lit_meta.tasks.Origin`: split, step,
  index of its first task, seed, epoch of the stream), which is all a model needs to know
  of its data's position (the inner mini-batch schedule, epoch-based schedules).

Validation and test tasks are fixed: chunk ``c`` (``eval_batch_size`` tasks, the last one
shorter) is drawn from ``derive_seed(seed, split, c)``, and the split's tasks are the chunks
end to end, the same in every run whatever the world size. Rank ``r`` of ``W`` evaluates
the contiguous range ``[r*N//W, (r+1)*N//W)`` of those ``N`` tasks (:meth:`eval_pieces`;
a chunk that straddles two ranks is drawn by both, each keeping its part), so every rank
has work whenever ``N >= W``, and the ranks together evaluate every task exactly once. A
rank left without tasks (``N < W``) gets one empty batch: it evaluates nothing but still
takes part in the epoch's metric all-reduce (:class:`lit_meta.metrics.MetricSums`).

Constructor arguments: the options every DataModule shares are keyword-only, with their
defaults, in the base classes here (:class:`EpisodicDataModule`: the task stream;
:class:`FewShotDataModule`: N-way K-shot episode sizes). A dataset's ``__init__`` states
only its own options (and any shared one whose default it changes, e.g. Omniglot's
``meta_batch_size: int = 32``) and passes ``**kwargs`` on to ``super().__init__``.
LightningCLI (jsonargparse) follows that ``**kwargs`` into the base signatures by reading
the source, so ``--data.init_args.<shared option>`` and its type and default stay on the
command line and in configs.

Where sampling runs: in-process by default, on the training device (in-memory pools live
there; see ``lit_meta.data.class_pools.sample_episodes``). With ``loader_workers`` N > 0 (data
that stays on the host, e.g. memory-mapped), N forked DataLoader workers draw the training
meta-batches, worker ``w`` steps ``start + w, start + w + N, ...`` (the loader returns them
in step order), into pinned memory; ``TaskBatch.to`` then copies them non-blocking. The
episodes are the same either way: a step's tasks depend only on ``(seed, step)``.
"""
from __future__ import annotations

import hashlib
import multiprocessing
from typing import Any, Iterator

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lit_meta.tasks import Origin, TaskBatch

SPLITS = ("train", "val", "test")


def derive_seed(seed: int, split: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def check_positive(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class EpisodicDataModule(pl.LightningDataModule):
    """Base class: subclasses implement :meth:`sample_tasks` and :attr:`task_spec`.

    ``meta_batch_size`` is the global number of tasks per meta-step (linked from the
    model). ``steps_per_epoch`` only sets how often Lightning's epoch-based hooks fire;
    the task stream itself is endless.
    """

    name: str = "episodic"

    def __init__(
        self,
        *,
        meta_batch_size: int = 4,
        eval_batch_size: int | None = None,
        val_tasks: int = 100,
        test_tasks: int = 600,
        steps_per_epoch: int = 500,
        seed: int = 0,
        loader_workers: int = 0,
    ) -> None:
        super().__init__()
        check_positive("meta_batch_size", meta_batch_size)
        check_positive("val_tasks", val_tasks)
        check_positive("test_tasks", test_tasks)
        check_positive("steps_per_epoch", steps_per_epoch)
        if eval_batch_size is not None:
            check_positive("eval_batch_size", eval_batch_size)
        check_positive("loader_workers", loader_workers, minimum=0)
        if loader_workers and "fork" not in multiprocessing.get_all_start_methods():
            raise ValueError(f"loader_workers={loader_workers} needs the 'fork' start method (Linux); use 0")
        self.meta_batch_size = meta_batch_size
        self.eval_batch_size = eval_batch_size or meta_batch_size
        self.val_tasks = val_tasks
        self.test_tasks = test_tasks
        self.steps_per_epoch = steps_per_epoch
        self.seed = seed
        self.loader_workers = loader_workers

    # -- to implement -------------------------------------------------------------
    @property
    def task_spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def sample_tasks(self, split: str, generator: torch.Generator, num_tasks: int) -> TaskBatch:
        """Draw ``num_tasks`` tasks of ``split`` in batched tensor ops, using only ``generator``."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def data_device(self) -> torch.device:
        """Where this DataModule's batches are made and in-memory datasets live: the training GPU if
        there is one, else the CPU (always the CPU with ``loader_workers``: the workers sample on
        the host). The same for every DataModule; data kept elsewhere (tieredImageNet's pools on
        the host) has its own name for that place (``ImageEpisodicDataModule.pool_location``)."""
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        return device if device.type == "cuda" and not self.loader_workers else torch.device("cpu")

    def _start_step(self) -> int:
        return self.trainer.global_step if self.trainer is not None else 0

    def train_batch(self, step: int) -> TaskBatch:
        rank, world = self._rank_world()
        if self.meta_batch_size % world:
            raise ValueError(
                f"meta_batch_size={self.meta_batch_size} must be divisible by the world size {world}"
            )
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "train", step))
        origin = Origin("train", step, 0, self.seed, step // self.steps_per_epoch)
        batch = self.sample_tasks("train", generator, self.meta_batch_size).with_origin(origin)
        share = self.meta_batch_size // world
        return batch.slice(rank * share, (rank + 1) * share) if world > 1 else batch

    def eval_chunks(self, split: str) -> list[int]:
        """Sizes of the fixed evaluation chunks of ``split`` (their sum is the task count)."""
        total = self.val_tasks if split == "val" else self.test_tasks
        size = self.eval_batch_size
        return [min(size, total - start) for start in range(0, total, size)]

    def eval_batch(self, split: str, chunk: int) -> TaskBatch:
        sizes = self.eval_chunks(split)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, split, chunk))
        origin = Origin(split, 0, sum(sizes[:chunk]), self.seed)
        return self.sample_tasks(split, generator, sizes[chunk]).with_origin(origin)

    def eval_pieces(self, split: str, rank: int = 0, world: int = 1) -> list[tuple[int, int, int]]:
        """``(chunk, start, stop)``: the tasks ``start:stop`` of each chunk that rank ``rank`` of
        ``world`` evaluates, in order. The ranks' pieces partition the split's tasks."""
        sizes = self.eval_chunks(split)
        total = sum(sizes)
        low, high = rank * total // world, (rank + 1) * total // world
        pieces, offset = [], 0
        for chunk, size in enumerate(sizes):
            start, stop = max(low, offset), min(high, offset + size)
            if start < stop:
                pieces.append((chunk, start - offset, stop - offset))
            offset += size
        return pieces

    def eval_piece(self, split: str, chunk: int, start: int, stop: int) -> TaskBatch:
        """Tasks ``start:stop`` of evaluation chunk ``chunk`` (the whole chunk is drawn: its tasks
        come from one generator, so a part cannot be drawn alone)."""
        batch = self.eval_batch(split, chunk)
        return batch if (start, stop) == (0, batch.num_tasks) else batch.slice(start, stop)

    def _pin(self) -> bool:
        """Whether loaders pin host batches: training on CUDA. A batch drawn on the host (sine,
        optimizee functions, loader workers) then reaches the GPU by a non-blocking copy
        (``TaskBatch.to``) instead of a pageable one the host waits for; episodes drawn on
        the GPU stay where they are (``TaskBatch.pin_memory`` pins host fields only)."""
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self) -> DataLoader:
        if not self.loader_workers:
            return _StepLoader(_TrainStream(self), batch_size=None, num_workers=0, pin_memory=self._pin())
        # fork: the workers inherit the pools (memory-mapped ones stay shared) and the
        # trainer's rank; they never touch CUDA, so forking a CUDA process is safe.
        return _StepLoader(_TrainStream(self), batch_size=None, num_workers=self.loader_workers,
                           pin_memory=self._pin(), multiprocessing_context="fork")

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_EvalTasks(self, "val"), batch_size=None, num_workers=0, pin_memory=self._pin())

    def test_dataloader(self) -> DataLoader:
        return DataLoader(_EvalTasks(self, "test"), batch_size=None, num_workers=0, pin_memory=self._pin())


class FewShotDataModule(EpisodicDataModule):
    """N-way K-shot classification episodes: ``ways`` classes per task, ``shots`` support and
    ``queries`` query examples per class. Validation and test use ``eval_ways`` /
    ``eval_shots`` / ``eval_queries``, each defaulting to its training value; the network
    gets ``max(ways, eval_ways)`` outputs (:attr:`num_outputs`)."""

    def __init__(
        self,
        *,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        eval_ways: int | None = None,
        eval_shots: int | None = None,
        eval_queries: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for option, value in (("ways", ways), ("shots", shots), ("queries", queries)):
            check_positive(option, value)
        for option, value in (("eval_ways", eval_ways), ("eval_shots", eval_shots), ("eval_queries", eval_queries)):
            if value is not None:
                check_positive(option, value)
        self.ways, self.shots, self.queries = ways, shots, queries
        self.eval_ways = ways if eval_ways is None else eval_ways
        self.eval_shots = shots if eval_shots is None else eval_shots
        self.eval_queries = queries if eval_queries is None else eval_queries

    @property
    def num_outputs(self) -> int:
        return max(self.ways, self.eval_ways)

    def episode(self, split: str) -> tuple[int, int, int]:
        """``(ways, shots, queries)`` of ``split``'s tasks."""
        if split == "train":
            return self.ways, self.shots, self.queries
        return self.eval_ways, self.eval_shots, self.eval_queries

    def protocol(self) -> dict[str, Any]:
        """The evaluation protocol of the validation and test tasks (recorded in results.json)."""
        return {"ways": self.eval_ways, "shots": self.eval_shots, "queries_per_class": self.eval_queries,
                "test_tasks": self.test_tasks, "val_tasks": self.val_tasks, "seed": self.seed}


class _StepLoader(DataLoader):
    """Resumable by construction (the stream restarts at the restored global step), so
    there is no loader state to save; having the interface tells Lightning so."""

    def __iter__(self):
        # With workers, read the start step here, in the main process: the workers forked
        # below copy it (their copy of the trainer would not follow a later resume).
        if isinstance(self.dataset, _TrainStream):
            self.dataset.start = self.dataset.dm._start_step() if self.num_workers else None
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class _TrainStream(IterableDataset):
    """Yields the meta-batches of the current epoch, starting at the trainer's global step."""

    def __init__(self, dm: EpisodicDataModule) -> None:
        self.dm = dm
        self.start: int | None = None

    def __len__(self) -> int:
        return self.dm.steps_per_epoch

    def __iter__(self) -> Iterator[TaskBatch]:
        start = self.dm._start_step() if self.start is None else self.start
        # On a mid-epoch resume only the rest of the epoch is left.
        stop = start + self.dm.steps_per_epoch - start % self.dm.steps_per_epoch
        worker = get_worker_info()
        # Worker w of N takes every N-th step; the loader interleaves them back into order.
        first, stride = (start, 1) if worker is None else (start + worker.id, worker.num_workers)
        for step in range(first, stop, stride):
            yield self.dm.train_batch(step)


class _EvalTasks(IterableDataset):
    """This rank's evaluation pieces; a rank without tasks yields one empty batch, so that it
    runs the epoch (and its metric all-reduce) like the others: Lightning rejects a loader
    of length 0 on one rank, and a rank that skipped the epoch would leave the others
    waiting in the all-reduce."""

    def __init__(self, dm: EpisodicDataModule, split: str) -> None:
        self.dm, self.split = dm, split

    def _my_pieces(self) -> list[tuple[int, int, int]]:
        rank, world = self.dm._rank_world()
        return self.dm.eval_pieces(self.split, rank, world)

    def __len__(self) -> int:
        return max(len(self._my_pieces()), 1)

    def __iter__(self) -> Iterator[TaskBatch]:
        pieces = self._my_pieces()
        if not pieces:
            yield self.dm.eval_piece(self.split, 0, 0, 0)
        for piece in pieces:
            yield self.dm.eval_piece(self.split, *piece)
