"""The image DataModule base: :class:`ImageEpisodicDataModule`, what every image dataset shares.

It owns the options every image DataModule takes (where the images are, the input
pipeline of :mod:`lit_meta.data.preprocessing`, rotations, global labels), the
``task_spec`` that records that pipeline, and the life of the split's
:class:`~lit_meta.data.class_pools.ClassPool`s: built by the dataset
(:meth:`~ImageEpisodicDataModule.build_pools`), checked against the episode sizes, moved to
:meth:`~ImageEpisodicDataModule.pool_location` (the training device, unless the dataset keeps
them on the host), and sampled by :func:`~lit_meta.data.class_pools.sample_episodes` onto
``data_device()``, the training device, as every DataModule's batches.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lit_meta.data.base import SPLITS, FewShotDataModule, check_positive
from lit_meta.data.class_pools import ClassPool, sample_episodes
from lit_meta.data.image_cache import check_on_bad_image
from lit_meta.data.preprocessing import RESIZE, check_resize
from lit_meta.tasks import TaskBatch, task_spec


class ImageEpisodicDataModule(FewShotDataModule):
    """N-way K-shot classification episodes from in-memory class pools.

    The episode sizes (``ways`` / ``shots`` / ``queries`` and their ``eval_*`` values) are
    :class:`~lit_meta.data.base.FewShotDataModule`'s, the task stream's options
    (``meta_batch_size``, ``seed``, ...) :class:`~lit_meta.data.base.EpisodicDataModule`'s;
    all keyword-only, reached through ``**kwargs``. Here, stated once for every image
    dataset (each reaches them through ``**kwargs``, which LightningCLI follows):

    - where the images are: ``root``, ``cache_dir``, ``split_dir`` (a folder of split
      files in the format of the shipped ones, ``lit_meta/data/splits/``);
    - the input pipeline (:mod:`lit_meta.data.preprocessing`): ``image_size``,
      ``channels``, ``invert``, ``interpolation`` (how images of another size are
      resized), ``mean`` / ``std`` per channel (null: the dataset's own statistics,
      :attr:`default_mean` / :attr:`default_std`, or 0 / 1 where it has none);
    - ``on_bad_image``: an undecodable source image stops the cache build (``stop``) or is
      left out with a warning (``skip``), :mod:`lit_meta.data.image_cache`;
    - train-time ``rotations`` (new classes) and ``eval_rotations`` (validation and test
      classes each turned a random number of quarter turns per episode, as cbfinn/maml
      does), and ``global_labels`` (training batches carry each example's class index in
      the split, :class:`~lit_meta.tasks.LabelledTaskBatch`, for the transfer baseline's
      classifier; the ``task_spec`` then holds ``train_classes``, which loads the pools when
      it is read).

    A dataset re-states one of these only to change its default (Omniglot's
    ``image_size: int = 28``). One for which an option has no meaning, or whose pipeline is
    fixed, passes the value to ``super().__init__`` itself (Omniglot: ``channels=1,
    invert=True``; CIFAR, read from pickles, ``on_bad_image="stop"``), so it is not an
    option of that dataset (``tests/test_data_options.py`` lists them).

    Subclasses implement :meth:`build_pools`: the three splits' pools, on the CPU, from
    the cache (built if missing). ``setup`` checks the episode sizes against them and
    moves them to :meth:`pool_location`, by default :meth:`data_device` (the training GPU
    when there is one); episodes are always made on :meth:`data_device`.
    """

    def __init__(
        self,
        *,
        root: str,
        image_size: int = 84,
        channels: int = 3,
        invert: bool = False,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        interpolation: str = RESIZE,
        split_dir: str | None = None,
        on_bad_image: str = "stop",
        rotations: bool = False,
        eval_rotations: bool = False,
        global_labels: bool = False,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_positive("image_size", image_size)
        check_resize(interpolation, image_size, None)
        check_on_bad_image(on_bad_image)
        super().__init__(**kwargs)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        mean = mean if mean is not None else self.default_mean or [0.0] * channels
        std = std if std is not None else self.default_std or [1.0] * channels
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values (one per channel), got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be > 0, got {std}")
        self.root = Path(root).expanduser()
        self.image_size, self.channels, self.invert = image_size, channels, invert
        self.mean, self.std = mean, std
        self.interpolation, self.resize_size = interpolation, None  # resize_size: CUB's crop margin
        self.split_dir, self.on_bad_image = split_dir, on_bad_image
        self.rotations, self.eval_rotations = rotations, eval_rotations
        self.global_labels = global_labels
        self.cache_dir = cache_dir
        self.pools: dict[str, ClassPool] = {}

    # -- to set and implement -----------------------------------------------------
    default_mean: tuple[float, ...] | None = None  # the dataset's channel statistics: ``mean``'s default
    default_std: tuple[float, ...] | None = None

    def build_pools(self) -> dict[str, ClassPool]:
        """``{"train", "val", "test"}`` -> CPU pools (without rotations), preprocessing and caching if needed."""
        raise NotImplementedError

    def spec_extra(self) -> dict[str, Any]:
        return {}

    # -- shared -------------------------------------------------------------------
    @property
    def task_spec(self) -> dict[str, Any]:
        shape = [self.channels, self.image_size, self.image_size]
        extra = {"train_classes": self.num_classes("train")} if self.global_labels else {}
        return task_spec(self.name, "classification", shape, self.num_outputs,
                         image_size=self.image_size, channels=self.channels, invert=self.invert,
                         mean=list(self.mean), std=list(self.std),
                         **{"resize": self.interpolation, **self.spec_extra(), **extra})

    def decode_options(self) -> dict[str, Any]:
        """How a source image becomes a cached uint8 one (:func:`lit_meta.data.image_cache.load_image`'s options)."""
        return {"channels": self.channels, "image_size": self.image_size, "resize": self.interpolation,
                "resize_size": self.resize_size}

    def resize_key(self) -> tuple[str, ...]:
        """The interpolation as a cache key part: the default stays out of it, so that caches built
        before it was an option stay valid."""
        return () if self.interpolation == RESIZE else (self.interpolation,)

    def num_classes(self, split: str) -> int:
        """How many classes ``split`` has (training rotations counted as classes); loads the pools."""
        if not self.pools:
            self.setup()
        return self.pools[split].num_classes

    def protocol(self) -> dict[str, Any]:
        return {**super().protocol(), "eval_rotations": self.eval_rotations}

    def check_root(self) -> None:
        if not self.root.exists():
            raise ValueError(f"data root not found: {self.root} (set --data.root)")
        if not self.root.is_dir():
            raise ValueError(f"data root is not a folder: {self.root}")

    def prepare_data(self) -> None:
        # Rank 0 of each node builds the cache before the other ranks' setup reads it.
        self.build_pools()

    def pool_location(self) -> torch.device:
        """Where the class pools live: :meth:`data_device`, so that an episode is gathered where it
        is used. A dataset too large for the device overrides this to keep them on the host
        (tieredImageNet's ``pool_device``); its episodes are still copied to :meth:`data_device`."""
        return self.data_device()

    def setup(self, stage: str | None = None) -> None:
        device = self.pool_location()
        if self.pools:  # already loaded (e.g. sampled from before a Trainer was attached): just follow the device
            self.pools = {s: p.to(device) if p.images.device != device else p for s, p in self.pools.items()}
            return
        pools = self.build_pools()
        for split in SPLITS:
            ways, shots, queries = self.episode(split)
            prefix = "" if split == "train" else "eval_"
            pool = pools[split]
            classes = len(pool.counts) * (4 if split == "train" and self.rotations else 1)
            if ways > classes:
                raise ValueError(f"{prefix}ways={ways} is more than the {classes} classes of the {split} split "
                                 f"of {self.root}")
            if shots + queries > pool.min_count:
                small = pool.names[int(pool.counts.argmin())]
                raise ValueError(f"{prefix}shots + {prefix}queries = {shots} + {queries} is more than the "
                                 f"{pool.min_count} images of class {small!r} ({split} split of {self.root})")
        self.pools = {s: ClassPool(p.images, p.counts, p.names, s == "train" and self.rotations,
                                   s != "train" and self.eval_rotations).to(device)
                      for s, p in pools.items()}

    def sample_tasks(self, split: str, generator: torch.Generator, num_tasks: int) -> TaskBatch:
        if not self.pools:
            self.setup()
        ways, shots, queries = self.episode(split)
        return sample_episodes(self.pools[split], generator, num_tasks, ways, shots, queries, self.mean, self.std,
                               device=self.data_device(), labels=self.global_labels and split == "train")
