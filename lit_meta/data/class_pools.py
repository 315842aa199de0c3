"""The class-pool episode sampler: N-way K-shot episodes drawn from one split's images in memory.

A split is a :class:`ClassPool`, one uint8 tensor of all its images grouped by class (on
the training GPU when there is one), and a meta-batch is a handful of batched ops on it
(:func:`sample_episodes`): random classes and items per task from the step's generator
(N-way K-shot episodes, Vinyals et al. 2016), then a single gather. Sampling never touches
files. Rotations as new classes follow Santoro et al. 2016 and Finn et al. 2017.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from lit_meta.data.base import SPLITS
from lit_meta.data.preprocessing import normalize
from lit_meta.devices import to_device
from lit_meta.tasks import LabelledTaskBatch, TaskBatch


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



def split_pools(data: Mapping[str, Any]) -> dict[str, ClassPool]:
    """The pools of a cache laid out per split, ``{split: {"images", "counts", "names"}}``."""
    return {s: ClassPool(data[s]["images"], data[s]["counts"], list(data[s]["names"])) for s in SPLITS}


def contiguous_pools(images: Tensor, counts: Tensor, names: Sequence[str],
                     classes_per_split: Mapping[str, int]) -> dict[str, ClassPool]:
    """The pools of one array whose splits' classes are contiguous blocks, train then val then test
    (``classes_per_split[s]`` classes each): views of ``images``, not copies (a memory map stays one)."""
    pools, first_class, first_image = {}, 0, 0
    for split in SPLITS:
        n = classes_per_split[split]
        block = counts[first_class:first_class + n]
        end = first_image + int(block.sum())
        pools[split] = ClassPool(images[first_image:end], block, list(names[first_class:first_class + n]))
        first_class, first_image = first_class + n, end
    return pools

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
