"""miniImageNet and tieredImageNet built from an ILSVRC-2012 train folder (``--data.imagenet_root``).

Source: the ILSVRC-2012 train folder; for each synset either the folder
``<synset>/<synset>_<n>.JPEG`` (as ``ILSVRC2012_img_train.tar`` unpacks) or the
per-synset tar ``<synset>.tar`` it ships inside (read in place, one seek per image).
A synset's images are its files named ``<synset>_<n>.<JPEG|jpg|png>``, in **numerical**
order of ``<n>``.

- **miniImageNet** (Vinyals et al. 2016, Ravi & Larochelle's split): each row
  ``<synset><8 digits>.jpg`` of the shipped CSVs names the image at that **1-based
  position** of the synset's files in numerical order, the rule of the community
  tools (yaoyao-liu/mini-imagenet-tools, CloserLookFewShot's
  ``write_miniImagenet_filelist.py``). Lexicographic order (torchvision's
  ``ImageFolder``) picks other files. 100 classes x 600 images.
- **tieredImageNet** (Ren et al. 2018): every image of each of the 608 synsets of the
  shipped split (351 / 97 / 160, ~779k images), with its high-level category (20 / 6 /
  8). ``labels: fine`` (the default) makes episodes of synsets, ``labels: category`` of
  categories. Synsets are ordered by (category, synset): Ren's label indices came from
  ``os.listdir`` and dict order and cannot be reproduced.

Resize: images are squashed to ``image_size`` square (aspect ratio not kept), as every
codebase does; their interpolation differs: cv2 INTER_AREA (mini-imagenet-tools), PIL
LANCZOS (cbfinn/maml), cv2 bilinear without antialiasing (the widely used pickles of
few-shot-ssl-public), cv2 INTER_CUBIC (Ren's tieredImageNet). lit_meta's default is
``bilinear-antialias`` (PIL bilinear within one gray level), the pipeline of all its
datasets; ``interpolation`` picks ``area`` (~INTER_AREA), ``bilinear`` (~cv2 bilinear),
``bicubic`` (~INTER_CUBIC) or ``bicubic-antialias`` instead.

Caches (under ``--data.root``): miniImageNet's 60,000 images (1.3 GB at 84x84) as one
tensor file written atomically. tieredImageNet's 16.5 GB as a raw uint8 array
(``tieredimagenet_<size>px.u8``, memory-mapped when read, so episodes load only the
images they gather) with its index ``tieredimagenet_<size>px.pt``; the array is built
in chunks with a progress bar, optionally in ``build_workers`` processes, and resumes
after an interruption (:func:`lit_meta.data.image_cache.build_array_resumably`). Both are keyed on every
source file's name, size and modification time (or its tar's), the split and the options.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lit_meta.data.base import check_positive
from lit_meta.data.archives import list_members, slices
from lit_meta.data.cache import CACHE_VERSION, cache_file, cached, file_stamp, fingerprint
from lit_meta.data.image_cache import (
    Source,
    build_array_resumably,
    check_on_bad_image,
    decode_all,
    open_array,
    serves_run,
    stamp_digest,
)
from lit_meta.data.class_pools import ClassPool, sample_episodes
from lit_meta.data.image_datamodule import ImageEpisodicDataModule
from lit_meta.data.preprocessing import RESIZE, check_resize
from lit_meta.data.splits import SPLITS, read_ravi, read_tiered, split_digest, split_files
from lit_meta.tasks import TaskBatch

_FILE = re.compile(r"^(n\d{8})_(\d+)\.(jpe?g|png)$", re.IGNORECASE)
MEAN = (0.485, 0.456, 0.406)  # ImageNet, per channel (tieredImageNet's default normalisation)
STD = (0.229, 0.224, 0.225)
LABELS = ("fine", "category")
POOL_DEVICES = ("auto", "device", "host")
LAYOUT = "<synset>/<synset>_<n>.JPEG folders or <synset>.tar archives (e.g. n01440764/ or n01440764.tar)"


@dataclass
class SynsetFiles:
    """One synset's images in numerical order of ``<n>``: display names, sources and stamps."""

    names: list[str] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    stamps: list[tuple[Any, ...]] = field(default_factory=list)


def numeric_order(wnid: str, names: list[str]) -> list[tuple[int, str]]:
    """``(n, name)`` of the files ``<wnid>_<n>.<ext>`` among ``names``, sorted by ``n`` (then name)."""
    found = []
    for name in names:
        match = _FILE.match(name)
        if match and match.group(1) == wnid:
            found.append((int(match.group(2)), name))
    return sorted(found)


class ImageNetTrain:
    """An ILSVRC-2012 train folder: ``<root>/<synset>/`` folders and/or ``<root>/<synset>.tar`` archives."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ValueError(f"ImageNet train folder not found: {self.root} (--data.imagenet_root: the ILSVRC-2012 "
                             f"train folder, with {LAYOUT})")

    def locate(self, wnid: str) -> Path | None:
        for path in (self.root / wnid, self.root / f"{wnid}.tar"):
            if path.is_dir() if path.suffix != ".tar" else path.is_file():
                return path
        return None

    def check(self, wnids: list[str], benchmark: str) -> None:
        """One line naming the first synset the split needs that is not here, and how many are missing."""
        missing = [w for w in wnids if self.locate(w) is None]
        if not missing:
            return
        hint = ""
        if (self.root / "train").is_dir():
            hint = f"; did you mean {self.root / 'train'}?"
        raise ValueError(f"ImageNet train folder {self.root} lacks {len(missing)} of the {len(wnids)} synsets "
                         f"{benchmark} needs, first {missing[0]} (expected {self.root / missing[0]}/ or "
                         f"{self.root / missing[0]}.tar){hint}")

    def files(self, wnid: str) -> SynsetFiles:
        path = self.locate(wnid)
        if path is None:
            raise ValueError(f"ImageNet train folder {self.root} has no synset {wnid}")
        out = SynsetFiles()
        if path.is_dir():
            entries = {e.name: e for e in os.scandir(path) if e.is_file()}
            for _, name in numeric_order(wnid, list(entries)):
                stat = entries[name].stat()
                out.names.append(str(path / name))
                out.sources.append(path / name)
                out.stamps.append((wnid, name, stat.st_size, stat.st_mtime_ns))
        else:
            tar_stamp = file_stamp(path)
            members = {Path(m.name).name: m for m in list_members(path)}
            order = numeric_order(wnid, list(members))
            for piece in slices(path, [members[name] for _, name in order]):
                out.names.append(piece.name)
                out.sources.append(piece)
                out.stamps.append((*tar_stamp, piece.member, piece.size))
        if not out.sources:
            raise ValueError(f"ImageNet synset {path} has no {wnid}_<n>.JPEG images")
        return out


# ---------------------------------------------------------------------------- miniImageNet
def mini_from_imagenet(imagenet: str, root: Path, cache_dir: str | None, split_dir: str | None,
                       options: dict[str, Any], on_bad_image: str) -> dict[str, Any]:
    """The miniImageNet cache (``{split: {images, counts, names}}``, as :mod:`lit_meta.data.miniimagenet`'s)
    built from an ImageNet train folder by the Ravi CSVs' index rule."""
    source = ImageNetTrain(imagenet)
    files = split_files("miniimagenet", split_dir)
    rows = {s: read_ravi(files[s]) for s in SPLITS}
    wnids = sorted({w for s in SPLITS for w in rows[s]})
    source.check(wnids, "miniImageNet")
    listing = {w: source.files(w) for w in wnids}
    key = fingerprint("miniimagenet-imagenet", options, split_digest(files),
                      stamp_digest(s for w in wnids for s in listing[w].stamps).hexdigest())
    root.mkdir(parents=True, exist_ok=True)
    cache = cache_file(root, cache_dir, f"miniimagenet_imagenet_{options['image_size']}px")

    def build() -> dict[str, Any]:
        data: dict[str, Any] = {"skipped": []}
        for split in SPLITS:
            names = sorted(rows[split])
            items: list[tuple[str, Source]] = []
            classes = []
            for k, wnid in enumerate(names):
                available = listing[wnid]
                for position in rows[split][wnid]:
                    if position > len(available.sources):
                        raise ValueError(f"{files[split]}: {wnid} position {position} is past the "
                                         f"{len(available.sources)} images of {source.locate(wnid)}")
                    items.append((available.names[position - 1], available.sources[position - 1]))
                    classes.append(k)
            images, counts, skipped = decode_all(items, classes, len(names), options, on_bad_image,
                                                 f"building the miniImageNet {split} cache {cache.name}")
            data[split] = {"images": images, "counts": counts, "names": names}
            data["skipped"] += skipped
        return data

    return cached(cache, key, build, usable=lambda data: serves_run(data, on_bad_image))


# ---------------------------------------------------------------------------- tieredImageNet
def tiered_split(split_dir: str | None) -> tuple[dict[str, list[tuple[str, str]]], dict[str, Path]]:
    """``split -> [(synset, category)]`` sorted by (category, synset), and the split files."""
    files = split_files("tieredimagenet", split_dir)
    rows = {s: sorted(read_tiered(files[s]), key=lambda r: (r[1], r[0])) for s in SPLITS}
    seen: dict[str, str] = {}
    for split in SPLITS:
        for wnid, _ in rows[split]:
            if wnid in seen:
                raise ValueError(f"split files: synset {wnid} is in both {seen[wnid]} and {split} ({files[split]})")
            seen[wnid] = split
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
    pools, first, start = {}, 0, 0
    for split in SPLITS:
        n = data["splits"][split]
        counts, names = data["counts"][first:first + n], data["names"][first:first + n]
        categories = data["categories"][first:first + n]
        end = start + int(counts.sum())
        if labels == "category":
            groups: dict[str, int] = {}
            for category, count in zip(categories, counts.tolist()):
                groups[category] = groups.get(category, 0) + count
            names, counts = list(groups), torch.tensor(list(groups.values()), dtype=torch.long)
        pools[split] = ClassPool(data["images"][start:end], counts, list(names))
        first, start = first + n, end
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
    training on a GPU: ``device`` (copied there once), ``host`` (gathered from the
    memory map per meta-batch, the uint8 episode copied over), or ``auto`` (``device``
    when they take less than half of its free memory). ``build_workers``: processes
    decoding images while the cache is built (0: in this process).
    """

    name = "tieredimagenet"

    def __init__(
        self,
        root: str = "data/tieredimagenet",
        imagenet_root: str | None = None,
        labels: str = "fine",
        split_dir: str | None = None,
        image_size: int = 84,
        interpolation: str = RESIZE,
        mean: list[float] | None = list(MEAN),
        std: list[float] | None = list(STD),
        on_bad_image: str = "stop",
        pool_device: str = "auto",
        build_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        if labels not in LABELS:
            raise ValueError(f"labels must be one of {', '.join(LABELS)}, got {labels!r}")
        if pool_device not in POOL_DEVICES:
            raise ValueError(f"pool_device must be one of {', '.join(POOL_DEVICES)}, got {pool_device!r}")
        check_resize(interpolation, image_size, None)
        check_on_bad_image(on_bad_image)
        check_positive("build_workers", build_workers, minimum=0)
        super().__init__(root=root, image_size=image_size, channels=3, invert=False, mean=mean, std=std,
                         rotations=False, **kwargs)
        self.imagenet_root, self.labels, self.split_dir = imagenet_root, labels, split_dir
        self.build_workers = build_workers
        self.interpolation, self.on_bad_image, self.pool_device = interpolation, on_bad_image, pool_device
        self.loaded: dict[str, Any] | None = None  # the index and memory map, read once per process

    def options(self) -> dict[str, Any]:
        return {"channels": 3, "image_size": self.image_size, "resize": self.interpolation, "resize_size": None}

    def load(self) -> dict[str, Any]:
        if self.loaded is None:
            if self.imagenet_root is None:
                self.loaded = tiered_cache_only(self.root, self.cache_dir, self.options())
            else:
                self.loaded = load_tiered(self.imagenet_root, self.root, self.cache_dir, self.split_dir,
                                          self.options(), self.on_bad_image, self.build_workers)
        return self.loaded

    def build_pools(self) -> dict[str, ClassPool]:
        return tiered_pools(self.load(), self.labels)

    def episode_device(self) -> torch.device:
        """Where the episodes go: the training device."""
        return super().data_device()

    def data_device(self) -> torch.device:
        """Where the pools live (see ``pool_device``)."""
        device = self.episode_device()
        if device.type == "cpu" or self.pool_device == "device":
            return device
        if self.pool_device == "host":
            return torch.device("cpu")
        size = self.load()["images"].numel()
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
        return device if size < free / 2 else torch.device("cpu")

    def sample_tasks(self, split: str, generator: torch.Generator, num_tasks: int) -> TaskBatch:
        if not self.pools:
            self.setup()
        ways, shots, queries = self.episode(split)
        return sample_episodes(self.pools[split], generator, num_tasks, ways, shots, queries, self.mean, self.std,
                               device=self.episode_device(), labels=self.global_labels and split == "train")

    def spec_extra(self) -> dict[str, Any]:
        return {"resize": self.interpolation, "labels": self.labels}
