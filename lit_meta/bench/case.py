"""What a benchmark measures: a :class:`Case`, and our side of it.

A case is a dataset shape (:data:`DATASETS`), an algorithm (second-order MAML, FOMAML or
Reptile), the episode sizes, the meta-batch, the number of inner steps and a device.
:func:`build_data` gives its tasks: for ``omniglot`` the real pack in
``../shared/data/omniglot`` through ``OmniglotDataModule`` when it is there, else (and
for ``miniimagenet``, and with ``random_images``) random images of the dataset's shape,
all in memory on the case's device. :func:`build_ours` gives one lit_meta meta-step on
them, Trainer-free: ``dm.train_batch(step)`` (the DataModule's own sampler) then
``MetaLearner.outer_update(batch)`` (the vmapped inner loop and the shared ``MetaStep``
with the module's standalone meta-optimizer): all of ``training_step`` but ``self.log``
and the LR scheduler.

Network shapes follow Finn et al. 2017: Omniglot conv4 with 64 filters and stride-2
convolutions on 1x28x28; miniImageNet conv4 with 32 filters and 2x2 max-pool on 3x84x84.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from lit_meta.algorithms import MAML, Reptile
from lit_meta.algorithms.base import MetaLearner
from lit_meta.data.base import EpisodicDataModule
from lit_meta.tasks import TaskBatch, task_spec

OMNIGLOT_PACK = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "omniglot"
ALGORITHMS = ("maml", "fomaml", "reptile")
BASELINE_SAMPLERS = ("tensor", "taskdataset")


@dataclass(frozen=True)
class DatasetShape:
    """A dataset as a benchmark sees it: image shape, the random-image pool's size
    (``classes`` x ``per_class``), the network and MAML's inner learning rate for it."""

    channels: int
    image_size: int
    classes: int
    per_class: int
    backbone_kwargs: dict[str, Any]
    maml_inner_lr: float


DATASETS = {
    "omniglot": DatasetShape(1, 28, 964, 20, {}, 0.4),  # the Finn split's 964 background-sized pool
    "miniimagenet": DatasetShape(3, 84, 64, 20, {"filters": 32, "max_pool": True}, 0.01),
}


@dataclass
class Case:
    """One benchmark point. ``inner_lr`` / ``meta_lr`` default to the algorithm's (MAML:
    the dataset's inner rate and Adam 1e-3; Reptile: Adam(β1=0) 1e-3 inside, SGD 1.0
    outside). ``model_kwargs`` go to the model's constructor as they are (e.g. an option
    under test); :meth:`to_dict` is the JSON form that :func:`Case.from_dict` reads back."""

    dataset: str = "omniglot"
    algorithm: str = "maml"
    ways: int = 5
    shots: int = 1
    queries: int = 1
    meta_batch_size: int = 32
    inner_steps: int = 1
    inner_lr: float | None = None
    meta_lr: float | None = None
    first_order: bool = False
    task_chunk_size: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    random_images: bool = False
    baseline_sampler: str = "tensor"
    seed: int = 0

    def __post_init__(self) -> None:
        for option, value, choices in (("dataset", self.dataset, tuple(DATASETS)),
                                       ("algorithm", self.algorithm, ALGORITHMS),
                                       ("baseline_sampler", self.baseline_sampler, BASELINE_SAMPLERS)):
            if value not in choices:
                raise ValueError(f"{option} must be one of {choices}, got {value!r}")
        reptile = self.algorithm == "reptile"
        if self.inner_lr is None:
            self.inner_lr = 0.001 if reptile else DATASETS[self.dataset].maml_inner_lr
        if self.meta_lr is None:
            self.meta_lr = 1.0 if reptile else 1e-3

    @property
    def shape(self) -> DatasetShape:
        return DATASETS[self.dataset]

    @property
    def is_first_order(self) -> bool:
        return self.first_order or self.algorithm in ("fomaml", "reptile")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Case":
        return cls(**values)


# ----------------------------------------------------------------------------- data
class TensorTasks(EpisodicDataModule):
    """Tasks from an in-memory pool ``images`` ``[classes, per_class, C, H, W]``: per task
    ``ways`` distinct classes and ``shots + queries`` distinct samples of each, drawn in
    batched tensor ops from the step's generator; class-major, labels ``0..ways-1``."""

    def __init__(self, images: Tensor, ways: int, shots: int, queries: int, meta_batch_size: int,
                 dataset: str = "random") -> None:
        super().__init__(meta_batch_size=meta_batch_size)
        self.images, self.ways, self.shots, self.queries = images, ways, shots, queries
        self.name = dataset

    @property
    def task_spec(self) -> dict[str, Any]:
        return task_spec(self.name, "classification", list(self.images.shape[2:]), ways=self.ways)

    def draw(self, generator: torch.Generator, num_tasks: int) -> Tensor:
        """``[num_tasks, ways, shots + queries, C, H, W]``, class-major."""
        classes, per_class = self.images.shape[:2]
        cls = torch.rand(num_tasks, classes, generator=generator).argsort(1)[:, : self.ways]
        idx = torch.rand(num_tasks, self.ways, per_class, generator=generator).argsort(2)[..., : self.shots + self.queries]
        return self.images[cls[..., None].to(self.images.device), idx.to(self.images.device)]

    def sample_tasks(self, split: str, generator: torch.Generator, num_tasks: int) -> TaskBatch:
        x = self.draw(generator, num_tasks)
        t, w, s, q = num_tasks, self.ways, self.shots, self.queries
        labels = torch.arange(w, device=x.device)
        sx = x[:, :, :s].reshape(t, w * s, *x.shape[3:])
        qx = x[:, :, s:].reshape(t, w * q, *x.shape[3:])
        return TaskBatch(sx, labels.repeat_interleave(s).expand(t, -1),
                         qx, labels.repeat_interleave(q).expand(t, -1))


@dataclass
class CaseData:
    """A case's tasks: ours come from ``datamodule``; ``images`` ``[classes, per_class, C, H, W]``
    holds the same images (normalised, on the device) for a baseline's own sampler."""

    datamodule: EpisodicDataModule
    images: Tensor
    source: str


def random_images(case: Case) -> Tensor:
    shape = case.shape
    per_class = max(shape.per_class, case.shots + case.queries)
    g = torch.Generator().manual_seed(0)
    return torch.rand(shape.classes, per_class, shape.channels, shape.image_size, shape.image_size, generator=g)


def build_data(case: Case) -> CaseData:
    """The case's tasks on ``case.device`` (see the module docstring for the source)."""
    device = torch.device(case.device)
    if case.dataset != "omniglot" or case.random_images or not OMNIGLOT_PACK.exists():
        if case.dataset == "omniglot" and not case.random_images:
            print(f"lit_meta.bench: no Omniglot pack at {OMNIGLOT_PACK}; timing on random images of its shape",
                  file=sys.stderr)
        images = random_images(case).to(device)
        dm = TensorTasks(images, case.ways, case.shots, case.queries, case.meta_batch_size, dataset=case.dataset)
        return CaseData(dm, images, f"random images {list(images.shape)}, TensorTasks sampler (lit_meta.bench)")
    from lit_meta.data import OmniglotDataModule
    from lit_meta.data.preprocessing import normalize

    dm = OmniglotDataModule(root=str(OMNIGLOT_PACK), ways=case.ways, shots=case.shots, queries=case.queries,
                            meta_batch_size=case.meta_batch_size, image_size=28)
    dm.setup("fit")
    dm.pools = {split: pool.to(device) for split, pool in dm.pools.items()}  # a Trainer would do this
    pool = dm.pools["train"]
    per_class = int(pool.counts[0])
    if not bool((pool.counts == per_class).all()):
        raise ValueError("the baseline sampler needs the same number of images per class")
    # The train split's images without the rotated copies (which would only cost a baseline more).
    images = normalize(pool.images, dm.mean, dm.std).reshape(len(pool.counts), per_class, *pool.images.shape[1:])
    return CaseData(dm, images, "Omniglot (../shared/data/omniglot), finn train split, 28x28; ours: OmniglotDataModule")


# ----------------------------------------------------------------------------- ours
def build_ours(case: Case, data: CaseData) -> tuple[MetaLearner, Callable[[], None]]:
    """Our model for the case (on its device, in training mode) and its meta-step: each
    call samples the next step's meta-batch and applies one outer update."""
    device = torch.device(case.device)
    kwargs: dict[str, Any] = dict(
        task_spec=data.datamodule.task_spec, backbone="conv4", inner_lr=case.inner_lr, inner_steps=case.inner_steps,
        first_order=case.is_first_order, meta_batch_size=case.meta_batch_size, meta_lr=case.meta_lr,
        task_chunk_size=case.task_chunk_size)
    if case.shape.backbone_kwargs:
        kwargs["backbone_kwargs"] = dict(case.shape.backbone_kwargs)
    kwargs.update(case.model_kwargs)
    model = (Reptile if case.algorithm == "reptile" else MAML)(**kwargs).to(device)
    model.train()
    dm, step_index = data.datamodule, [0]

    def step() -> None:
        batch = dm.train_batch(step_index[0]).to(device)
        step_index[0] += 1
        model.outer_update(batch)

    return model, step


# ----------------------------------------------------------------------------- command line
def add_case_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that make a :class:`Case` (read back by :func:`case_from_args`)."""
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="maml")
    parser.add_argument("--dataset", choices=tuple(DATASETS), default="omniglot",
                        help="shape and network: omniglot 1x28x28 conv4/64; miniimagenet 3x84x84 conv4/32 max-pool "
                             "(random images)")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--meta-batch-size", type=int, default=32)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--inner-lr", type=float, default=None,
                        help="default: 0.4 (MAML, Omniglot), 0.01 (MAML, miniImageNet), 0.001 (Reptile's Adam)")
    parser.add_argument("--meta-lr", type=float, default=None, help="default: 1e-3 (MAML, Adam), 1.0 (Reptile, SGD)")
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--task-chunk-size", type=int, default=None,
                        help="ours: adapt and back-propagate this many tasks at a time (bounds memory)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--baseline-sampler", choices=BASELINE_SAMPLERS, default="tensor")
    parser.add_argument("--random-images", action="store_true", help="skip the Omniglot pack, time on random images")
    parser.add_argument("--seed", type=int, default=0)


def case_from_args(args: argparse.Namespace, **overrides: Any) -> Case:
    values = dict(dataset=args.dataset, algorithm=args.algorithm, ways=args.ways, shots=args.shots,
                  queries=args.queries, meta_batch_size=args.meta_batch_size, inner_steps=args.inner_steps,
                  inner_lr=args.inner_lr, meta_lr=args.meta_lr, first_order=args.first_order,
                  task_chunk_size=args.task_chunk_size, device=args.device, random_images=args.random_images,
                  baseline_sampler=args.baseline_sampler, seed=args.seed)
    return Case(**{**values, **overrides})
