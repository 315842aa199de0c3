"""tieredImageNet (Ren et al. 2018) built from an ILSVRC-2012 train folder (``--data.imagenet_root``).

Every image of each of the 608 synsets of the shipped split (351 / 97 / 160, ~779k
images), with its high-level category (20 / 6 / 8). ``labels: fine`` (the default) makes
episodes of synsets, ``labels: category`` of categories. Synsets are ordered by
(category, synset): Ren's label indices came from ``os.listdir`` and dict order and cannot
be reproduced. The source is read by :mod:`lit_meta.data.imagenet_train` (which also says
how the codebases resized).

Cache (under ``--data.root``): the 16.5 GB (at 84x84) as a raw uint8 array
(``tieredimagenet_<size>px.u8``, memory-mapped when read, so episodes load only the
images they gather) with its index ``tieredimagenet_<size>px.pt``; the array is built
in chunks with a progress bar, optionally in ``build_workers`` processes, and resumes
after an interruption (:func:`lit_meta.data.image_cache.build_array_resumably`). It is
keyed on every source file's name, size and modification time (or its tar's), the split
and the options.
"""
from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any

import torch

from lit_meta.data.base import check_positive
from lit_meta.data.cache import CACHE_VERSION, cache_file, cached, fingerprint
from lit_meta.data.class_pools import ClassPool, contiguous_pools
from lit_meta.data.image_cache import build_array_resumably, open_array, serves_run, stamp_digest
from lit_meta.data.image_datamodule import ImageEpisodicDataModule
from lit_meta.data.imagenet_train import ImageNetTrain
from lit_meta.data.splits import SPLITS, check_disjoint, read_tiered, split_digest, split_files

MEAN = (0.485, 0.456, 0.406)  # ImageNet, per channel (tieredImageNet's default normalisation)
STD = (0.229, 0.224, 0.225)
LABELS = ("fine", "category")
POOL_DEVICES = ("auto", "device", "host")


def tiered_split(split_dir: str | None) -> tuple[dict[str, list[tuple[str, str]]], dict[str, Path]]:
    """``split -> [(synset, category)]`` sorted by (category, synset), and the split files."""
    files = split_files("tieredimagenet", split_dir)
    rows = {s: sorted(read_tiered(files[s]), key=lambda r: (r[1], r[0])) for s in SPLITS}
    check_disjoint({s: [w for w, _ in rows[s]] for s in SPLITS}, files, lambda wnid: f"synset {wnid}")
    return rows, files


def load_tiered(imagenet: str, root: Path, cache_dir: str | None, split_dir: str | None,
                options: dict[str, Any], on_bad_image: str, workers: int = 0) -> dict[str, Any]:
    """The tieredImageNet index (synsets, categories, counts, split sizes) with ``images``: the
    memory-mapped uint8 array of every image, synsets in split then (category, synset) order."""
    source = ImageNetTrain(imagenet)
    rows, files = tiered_split(split_dir)
    ordered = [r for s in SPLITS for r in rows[s]]
    wnids = [w for w, _ in ordered]
    source.check(wnids, "tieredImageNet")
    listing = [source.files(w) for w in wnids]
    stamps = [s for f in listing for s in f.stamps]
    resume_key = fingerprint("tieredimagenet", options, split_digest(files))
    key = fingerprint(resume_key, stamp_digest(stamps).hexdigest())
    root.mkdir(parents=True, exist_ok=True)
    index_path = cache_file(root, cache_dir, f"tieredimagenet_{options['image_size']}px")
    index_path.parent.mkdir(parents=True, exist_ok=True)  # a --data.cache_dir not made yet
    array_path = index_path.with_suffix(".u8")
    shape = (options["channels"], options["image_size"], options["image_size"])

    def usable(data: dict[str, Any]) -> bool:  # an index counts only with the array it describes
        return (serves_run(data, on_bad_image)
                and open_array(array_path, int(data["counts"].sum()), shape) is not None)

    def build() -> dict[str, Any]:
        index_path.unlink(missing_ok=True)  # never an index beside an array it does not describe
        entries = [(n, s) for f in listing for n, s in zip(f.names, f.sources)]
        skipped = build_array_resumably(array_path, resume_key, entries, stamps, options, on_bad_image,
                                        f"building the tieredImageNet cache {array_path.name}", workers)
        owner = torch.repeat_interleave(torch.arange(len(wnids)), torch.tensor([len(f.sources) for f in listing]))
        counts = torch.bincount(owner, minlength=len(wnids))
        if skipped:
            counts -= torch.bincount(owner[torch.tensor(skipped)], minlength=len(wnids))
        return {"options": options, "names": wnids, "categories": [c for _, c in ordered],
                "counts": counts, "splits": {s: len(rows[s]) for s in SPLITS},
                "skipped": [entries[i][0] for i in skipped]}

    data = cached(index_path, key, build, usable)
    images = open_array(array_path, int(data["counts"].sum()), shape)
    assert images is not None, f"{array_path} was just built"
    return {**data, "images": images}


def tiered_pools(data: dict[str, Any], labels: str) -> dict[str, ClassPool]:
    """Per split, a view of the memory-mapped array: classes are synsets (``fine``) or categories
    (``category``; a category's synsets are contiguous, so its images are too)."""
    pools = contiguous_pools(data["images"], data["counts"], data["names"], data["splits"])
    if labels == "fine":
        return pools
    categories = iter(data["categories"])  # in the synsets' order, split after split
    for split, pool in pools.items():
        groups: dict[str, int] = {}
        for category, count in zip(islice(categories, len(pool.counts)), pool.counts.tolist()):
            groups[category] = groups.get(category, 0) + count
        pools[split] = ClassPool(pool.images, torch.tensor(list(groups.values()), dtype=torch.long), list(groups))
    return pools


def tiered_cache_only(root: Path, cache_dir: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """Without ``--data.imagenet_root``: the tieredImageNet cache as built before (e.g. on a machine that
    had ImageNet), used as it is; its options must match."""
    index_path = cache_file(root, cache_dir, f"tieredimagenet_{options['image_size']}px")
    if not index_path.is_file():
        raise ValueError(f"no tieredImageNet cache at {index_path}: set --data.imagenet_root to the ILSVRC-2012 "
                         f"train folder to build it")
    data = torch.load(index_path, map_location="cpu", weights_only=True)
    if data.get("version") != CACHE_VERSION or data.get("options") != options:
        raise ValueError(f"the tieredImageNet cache {index_path} was built with other options "
                         f"({data.get('options')}, not {options}): set --data.imagenet_root to rebuild it")
    shape = (options["channels"], options["image_size"], options["image_size"])
    images = open_array(index_path.with_suffix(".u8"), int(data["counts"].sum()), shape)
    if images is None:
        raise ValueError(f"the tieredImageNet cache {index_path.with_suffix('.u8')} is missing or incomplete: "
                         f"set --data.imagenet_root to rebuild it")
    return {**data, "images": images}


class TieredImageNetDataModule(ImageEpisodicDataModule):
    """tieredImageNet episodes (module docstring) from ``imagenet_root``; the cache goes under ``root``.

    ``labels``: ``fine`` (synsets, 351 / 97 / 160) or ``category`` (the high-level
    categories, 20 / 6 / 8). ``pool_device``: where the memory-mapped images live while
    training on a GPU (:meth:`pool_location`): ``device`` (copied there once), ``host``
    (gathered from the memory map per meta-batch, the uint8 episode copied over), or
    ``auto`` (``device`` when they take less than half of its free memory). Either way the
    episodes are on :meth:`data_device`, the training device, as every DataModule's are.
    ``build_workers``: processes decoding images while the cache is built (0: in this process).
    """

    name = "tieredimagenet"
    default_mean, default_std = MEAN, STD

    def __init__(
        self,
        root: str = "data/tieredimagenet",
        imagenet_root: str | None = None,
        labels: str = "fine",
        pool_device: str = "auto",
        build_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        # the shared image options (``image_size``, ``split_dir``, ``interpolation``, ``mean``,
        # ``on_bad_image``, ...) come through ``kwargs``
        if labels not in LABELS:
            raise ValueError(f"labels must be one of {', '.join(LABELS)}, got {labels!r}")
        if pool_device not in POOL_DEVICES:
            raise ValueError(f"pool_device must be one of {', '.join(POOL_DEVICES)}, got {pool_device!r}")
        check_positive("build_workers", build_workers, minimum=0)
        super().__init__(root=root, channels=3, invert=False, rotations=False, **kwargs)
        self.imagenet_root, self.labels = imagenet_root, labels
        self.build_workers, self.pool_device = build_workers, pool_device
        self.loaded: dict[str, Any] | None = None  # the index and memory map, read once per process

    def load(self) -> dict[str, Any]:
        if self.loaded is None:
            if self.imagenet_root is None:
                self.loaded = tiered_cache_only(self.root, self.cache_dir, self.decode_options())
            else:
                self.loaded = load_tiered(self.imagenet_root, self.root, self.cache_dir, self.split_dir,
                                          self.decode_options(), self.on_bad_image, self.build_workers)
        return self.loaded

    def build_pools(self) -> dict[str, ClassPool]:
        return tiered_pools(self.load(), self.labels)

    def pool_location(self) -> torch.device:
        """Where the pools live (``pool_device``); the episodes still go to :meth:`data_device`."""
        device = self.data_device()
        if device.type == "cpu" or self.pool_device == "device":
            return device
        if self.pool_device == "host":
            return torch.device("cpu")
        size = self.load()["images"].numel()
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
        return device if size < free / 2 else torch.device("cpu")

    def spec_extra(self) -> dict[str, Any]:
        return {"labels": self.labels}
