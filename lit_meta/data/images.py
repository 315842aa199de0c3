"""What the image DataModules share: the input pipeline and the episode sampler (the cache is
:mod:`lit_meta.data.cache`'s).

Input pipeline (recorded in ``task_spec``, so a checkpoint can turn raw files into the
tensors it was trained on; :func:`images_from_files` is that path)::

    file -> PIL "L" (channels=1) or "RGB" (channels=3) -> uint8 [C, H, W]
         -> 255 - x if invert
         -> resize to S x S, S = resize_size or image_size (aspect ratio not kept), with
            ``resize`` (default "bilinear-antialias": torch bilinear, antialias=True,
            = PIL BILINEAR within 1 gray level), on x/255 in float32, then rounded back
            to uint8 (skipped when already that size)
         -> centre crop image_size x image_size when resize_size > image_size
            (torchvision CenterCrop's offsets; the CloserLook CUB transform)
    ---- cached once as uint8 ----
         -> x/255 -> (x - mean[c]) / std[c]      (at sampling time, on the device)

Sampling never touches files: a split is a :class:`ClassPool`, one uint8 tensor of all
its images (on the training GPU when there is one), and a meta-batch is a handful of
batched ops on it (:func:`sample_episodes`): random classes and items per task from the
step's generator, then a single gather.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lit_meta.data.base import SPLITS, FewShotDataModule, check_positive
from lit_meta.devices import to_device
from lit_meta.tasks import LabelledTaskBatch, TaskBatch, task_spec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes with one channel of colour
RESIZE = "bilinear-antialias"
# name -> (torch interpolate mode, antialias); "area" is torch's box average (close to cv2 INTER_AREA)
RESIZE_MODES = {"bilinear-antialias": ("bilinear", True), "bilinear": ("bilinear", False),
                "bicubic-antialias": ("bicubic", True), "bicubic": ("bicubic", False), "area": ("area", False)}
_CHUNK = 2048  # images per resize batch: bounds the float32 copy while preprocessing


# ---------------------------------------------------------------------------- decoding
def decode_image(source: str | os.PathLike | bytes, channels: int, name: str | None = None) -> np.ndarray:
    """One image file (path or bytes) as uint8 ``[C, H, W]``; a one-line ValueError naming it if unreadable."""
    return _decode(source, channels, name)[0]


def _decode(source: str | os.PathLike | bytes, channels: int, name: str | None) -> tuple[np.ndarray, bool]:
    """:func:`decode_image`, and whether the file's own colour mode had another channel count."""
    from PIL import Image, UnidentifiedImageError

    name = name or str(source)
    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
        with handle, Image.open(handle) as image:
            converted = (image.mode in GRAY_MODES) == (channels == 3)
            image = image.convert("L" if channels == 1 else "RGB")
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"cannot read image {name}: {reason}") from None
    return (array[None] if channels == 1 else array.transpose(2, 0, 1)), converted


def check_resize(resize: str, image_size: int, resize_size: int | None) -> None:
    """One-line errors for the resize options (``--data.interpolation``, ``--data.resize_size``)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"interpolation must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if resize_size is not None and (not isinstance(resize_size, int) or resize_size < image_size):
        raise ValueError(f"resize_size must be an integer >= image_size={image_size}, got {resize_size!r}")


def pipeline_options(spec: dict[str, Any]) -> dict[str, Any]:
    """The resize options recorded in a task_spec (checkpoints from before they existed used the defaults)."""
    return {"resize": spec.get("resize", RESIZE), "resize_size": spec.get("resize_size")}


def preprocess(images: Tensor | np.ndarray, image_size: int, invert: bool = False, resize: str = RESIZE,
               resize_size: int | None = None) -> Tensor:
    """uint8 ``[N, C, H, W]`` -> uint8 ``[N, C, image_size, image_size]`` (invert, resize, centre crop)."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"preprocess expects uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}")
    target = resize_size or image_size
    mode, antialias = RESIZE_MODES[resize]
    top = left = int(round((target - image_size) / 2.0))  # torchvision CenterCrop's offsets
    out = []
    for chunk in images.split(_CHUNK):
        if invert:
            chunk = 255 - chunk
        if chunk.shape[-2:] != (target, target):
            extra = {} if mode == "area" else {"antialias": antialias, "align_corners": False}
            x = F.interpolate(chunk.float() / 255, size=(target, target), mode=mode, **extra)
            chunk = (x * 255).round_().clamp_(0, 255).to(torch.uint8)
        if target != image_size:
            chunk = chunk[..., top:top + image_size, left:left + image_size]
        out.append(chunk.contiguous())
    if not out:
        return torch.empty(0, images.shape[1], image_size, image_size, dtype=torch.uint8)
    return torch.cat(out)


def preprocess_list(arrays: Sequence[np.ndarray], image_size: int, invert: bool = False, resize: str = RESIZE,
                    resize_size: int | None = None) -> Tensor:
    """Like :func:`preprocess` for ``[C, H, W]`` arrays of possibly different sizes (runs of one size are batched)."""
    out, run = [], []
    for array in arrays:
        if run and array.shape != run[0].shape:
            out.append(preprocess(np.stack(run), image_size, invert, resize, resize_size))
            run = []
        run.append(array)
    if run:
        out.append(preprocess(np.stack(run), image_size, invert, resize, resize_size))
    return torch.cat(out) if out else torch.empty(0, 1, image_size, image_size, dtype=torch.uint8)


def channel_constants(values: Sequence[float], device: torch.device) -> Tensor:
    """float32 ``[C, 1, 1]`` on ``device``, filled there: ``torch.tensor(values, device=cuda)``
    would copy from pageable host memory and wait for it (a host sync every sampled batch)."""
    return torch.stack([torch.full((), float(v), device=device) for v in values]).view(len(values), 1, 1)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``[..., C, H, W]`` -> float32 ``(x/255 - mean) / std`` per channel.

    The divisor is a 0-dim tensor on the images' device, not a Python number: CUDA divides
    by a host scalar as a multiply by its reciprocal, which puts about half of the 256 gray
    levels one ulp away from the CPU's x/255; tensor by tensor, both devices divide exactly
    (IEEE division is correctly rounded), so a step's tasks are the same bits on any device."""
    x = images.float().div_(torch.full((), 255.0, device=images.device))
    if any(m != 0 for m in mean) or any(s != 1 for s in std):
        x = (x - channel_constants(mean, x.device)) / channel_constants(std, x.device)
    return x


@dataclass
class ImageFiles:
    """What :func:`images_from_files` read."""

    images: Tensor  # float [N, C, S, S], normalised
    files: list[Path]  # the files of ``images``, in order
    unreadable: dict[str, str] = field(default_factory=dict)  # skipped file -> one-line reason
    converted: int = 0  # files whose colour mode had another channel count (RGB into gray, or back)


def images_from_files(paths: Iterable[str | os.PathLike], spec: dict[str, Any],
                      skip_unreadable: bool = False) -> ImageFiles:
    """Raw image files -> float ``[N, C, S, S]``, exactly as the data behind ``spec`` (a task_spec)
    was made. An undecodable file raises a one-line ValueError naming it, or with
    ``skip_unreadable`` is left out and listed in ``unreadable``."""
    channels, size = spec["channels"], spec["image_size"]
    arrays, files, unreadable, converted = [], [], {}, 0
    for path in map(Path, paths):
        try:
            array, other_mode = _decode(path, channels, None)
        except ValueError as error:
            if not skip_unreadable:
                raise
            unreadable[str(path)] = str(error)
            continue
        arrays.append(array)
        files.append(path)
        converted += other_mode
    if not arrays:
        return ImageFiles(torch.empty(0, channels, size, size), files, unreadable, converted)
    images = preprocess_list(arrays, size, spec.get("invert", False), **pipeline_options(spec))
    x = normalize(images, spec["mean"], spec["std"])
    return ImageFiles(x, files, unreadable, converted)


# ---------------------------------------------------------------------------- class pools
@dataclass
class ClassPool:
    """The images of one split, grouped by class: class ``k`` is ``images[offsets[k] : offsets[k] + counts[k]]``.

    With ``rotations`` every class also appears rotated by 90°, 180° and 270°, as three
    more classes (Santoro et al. 2016; Finn et al. 2017): class ``k + r*K`` is class ``k``
    rotated ``r`` quarter turns. With ``random_turns`` each class of an episode is turned a
    random number of quarter turns instead (the same for all its images), without more
    classes: cbfinn/maml's data generator does this in every split, its validation and test
    episodes included. The rotations are applied to the sampled images only.
    """

    images: Tensor  # uint8 [N, C, H, W], on the sampling device
    counts: Tensor  # int64 [K], on the CPU (indices are drawn there, from the step's generator)
    names: list[str]
    rotations: bool = False
    random_turns: bool = False

    def __post_init__(self) -> None:
        self.counts = self.counts.cpu().long()
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        if int(self.counts.sum()) != self.images.shape[0]:
            raise ValueError(f"class counts sum to {int(self.counts.sum())}, there are {self.images.shape[0]} images")

    @property
    def num_classes(self) -> int:
        return len(self.counts) * (4 if self.rotations else 1)

    @property
    def min_count(self) -> int:
        return int(self.counts.min()) if len(self.counts) else 0

    def to(self, device: torch.device | str) -> "ClassPool":
        return ClassPool(self.images.to(device), self.counts, self.names, self.rotations, self.random_turns)

    def subset(self, classes: Sequence[int] | Tensor, rotations: bool = False) -> "ClassPool":
        """The pool of the given classes, in that order (one gather)."""
        classes = torch.as_tensor(classes, dtype=torch.long)
        counts = self.counts[classes]
        index = torch.cat([torch.arange(int(o), int(o) + int(c)) for o, c in zip(self.offsets[classes], counts)]) \
            if len(classes) else torch.empty(0, dtype=torch.long)
        return ClassPool(self.images[index.to(self.images.device)], counts,
                         [self.names[i] for i in classes.tolist()], rotations)


def sample_episodes(pool: ClassPool, generator: torch.Generator, num_tasks: int, ways: int, shots: int,
                    queries: int, mean: Sequence[float], std: Sequence[float],
                    device: torch.device | None = None, labels: bool = False) -> TaskBatch:
    """``num_tasks`` ways-way episodes from ``pool``: ``shots`` support and ``queries`` query images per class.

    Per task, ``ways`` distinct classes (in random order, which is the label permutation)
    and ``shots + queries`` distinct images of each. Labels are episode-local ``0..ways-1``;
    with ``labels`` the batch is a :class:`~lit_meta.tasks.LabelledTaskBatch` that also
    holds each example's class index in the pool (``0..pool.num_classes-1``).

    Where the numbers come from (the data path on a GPU): every random number is drawn on
    the CPU from ``generator`` (the step's ``torch.Generator``), and only the resulting
    ``[T, W, n]`` indices (a few KB) go to the pool's device, pinned and non-blocking;
    the images never leave it. So the tasks of a step are the same on every device, every
    GPU model and every DDP rank (a CUDA generator's numbers depend on the device and its
    launch configuration, and cannot reproduce the CPU's), resume and DDP shares stay exact
    by construction, and nothing after the draw reads a device value on the host: the
    gather, the rotations, normalisation and labels are device ops with no host sync.
    With ``device`` (a pool kept on the host, e.g. memory-mapped), the gathered uint8
    images are copied there before anything else is done to them.
    """
    per_class = shots + queries
    base_classes = len(pool.counts)
    # A random ``ways``-subset per task: the top-k of i.i.d. uniform keys.
    classes = torch.rand(num_tasks, pool.num_classes, generator=generator).topk(ways, dim=1).indices
    base, turns = classes % base_classes, classes // base_classes
    counts = pool.counts[base]
    width = int(counts.max())  # host tensors: no device involved
    keys = torch.rand(num_tasks, ways, width, generator=generator)
    keys.masked_fill_(torch.arange(width) >= counts[..., None], -1.0)  # past the class's end: never drawn
    items = keys.topk(per_class, dim=-1).indices
    index = pool.offsets[base][..., None] + items  # [T, W, shots + queries]
    x = pool.images[to_device(index, pool.images.device)]  # the one gather: [T, W, n, C, H, W]
    # A pool kept on the host (e.g. memory-mapped): uint8 crosses the bus (4x less than float), pinned
    device = x.device if device is None else device
    x = to_device(x, device)
    if pool.random_turns:
        # drawn after everything else, so the episodes' classes and images are those without it
        turns = torch.randint(0, 4, (num_tasks, ways), generator=generator)
    if pool.rotations or pool.random_turns:
        x = rotate_quarters(x, to_device(turns, device))
    x = normalize(x, mean, std)
    image_shape = x.shape[3:]
    support_x = x[:, :, :shots].reshape(num_tasks, ways * shots, *image_shape)
    query_x = x[:, :, shots:].reshape(num_tasks, ways * queries, *image_shape)
    # expand, not repeat_interleave: older torch builds its repeats tensor on the device and reads it back
    local = torch.arange(ways, device=x.device)[:, None]
    support_y = local.expand(ways, shots).reshape(-1).expand(num_tasks, -1).contiguous()
    query_y = local.expand(ways, queries).reshape(-1).expand(num_tasks, -1).contiguous()
    if not labels:
        return TaskBatch(support_x, support_y, query_x, query_y)
    index = to_device(classes, device)[:, :, None]  # [T, W, 1]: the pool's class index (rotations included)
    support_classes = index.expand(num_tasks, ways, shots).reshape(num_tasks, -1)
    query_classes = index.expand(num_tasks, ways, queries).reshape(num_tasks, -1)
    return LabelledTaskBatch(support_x, support_y, query_x, query_y, support_classes, query_classes)


def rotate_quarters(x: Tensor, turns: Tensor) -> Tensor:
    """``x[t, w]`` (``[T, W, ..., S, S]``) turned ``turns[t, w]`` quarter turns (``torch.rot90``).

    All four turns of every image, then one gather: no per-turn Python branch or
    ``nonzero`` on the turn values, so no host sync (a few 28x28 copies cost nothing)."""
    every = torch.stack([torch.rot90(x, r, dims=(-2, -1)) for r in range(4)], dim=2)  # [T, W, 4, ...]
    tasks = torch.arange(x.shape[0], device=x.device)[:, None]
    ways = torch.arange(x.shape[1], device=x.device)[None, :]
    return every[tasks, ways, turns]


# ---------------------------------------------------------------------------- the DataModule base
class ImageEpisodicDataModule(FewShotDataModule):
    """N-way K-shot classification episodes from in-memory class pools.

    The episode sizes (``ways`` / ``shots`` / ``queries`` and their ``eval_*`` values) are
    :class:`~lit_meta.data.base.FewShotDataModule`'s, the task stream's options
    (``meta_batch_size``, ``seed``, ...) :class:`~lit_meta.data.base.EpisodicDataModule`'s;
    all keyword-only, reached through ``**kwargs``. Here: where the images are (``root``,
    ``cache_dir``) and the input pipeline (``image_size``, ``channels``, ``invert``,
    ``mean`` / ``std`` per channel, defaulting to 0 / 1), train-time ``rotations`` (new
    classes) and ``eval_rotations`` (validation and test classes each turned a random
    number of quarter turns per episode, as cbfinn/maml does), and ``global_labels``
    (training batches carry each example's class index in the split,
    :class:`~lit_meta.tasks.LabelledTaskBatch`, for the transfer baseline's classifier; the
    ``task_spec`` then holds ``train_classes``, which loads the pools when it is read).
    A dataset whose pipeline is fixed passes those values to ``super().__init__``
    itself (Omniglot: ``channels=1, invert=True``), so they are not options of it.

    Subclasses implement :meth:`build_pools`: the three splits' pools, on the CPU, from
    the cache (built if missing). ``setup`` checks the episode sizes against them and
    moves them to the training device when it is a GPU.
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
        rotations: bool = False,
        eval_rotations: bool = False,
        global_labels: bool = False,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_positive("image_size", image_size)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        mean = [0.0] * channels if mean is None else [float(m) for m in mean]
        std = [1.0] * channels if std is None else [float(s) for s in std]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values (one per channel), got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be > 0, got {std}")
        self.root = Path(root).expanduser()
        self.image_size, self.channels, self.invert = image_size, channels, invert
        self.mean, self.std = mean, std
        self.rotations, self.eval_rotations = rotations, eval_rotations
        self.global_labels = global_labels
        self.cache_dir = cache_dir
        self.pools: dict[str, ClassPool] = {}

    # -- to implement -------------------------------------------------------------
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
                         **{"resize": RESIZE, **self.spec_extra(), **extra})

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

    def setup(self, stage: str | None = None) -> None:
        device = self.data_device()
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
                               labels=self.global_labels and split == "train")
