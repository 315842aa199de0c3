"""CUB-200-2011 (Wah et al. 2011) as a few-shot benchmark, the split and transform of
Chen et al. 2019 ("A Closer Look at Few-shot Classification", CloserLookFewShot).

Source: the official ``<root>/CUB_200_2011/images/<NNN.Class_name>/*.jpg`` tree, or the
official archive ``<root>/CUB_200_2011.tgz`` read in place (listed once, then read in
one sequential pass). Full images: no bounding-box crop.

Split (shipped): the 200 class folders sorted, index ``i``: ``i % 2 == 0`` train (100),
``i % 4 == 1`` val (50), ``i % 4 == 3`` test (50); see ``lit_meta/data/splits/README.md``.

Transform: CloserLook's evaluation transform for the Conv4 backbone, applied once and
cached: RGB, resize to ``resize_size`` x ``resize_size`` (aspect ratio not kept; default
``int(1.15 * image_size)`` = 96 for 84, as their ``Scale``), centre crop
``image_size`` (torchvision ``CenterCrop`` offsets), and at sampling time ImageNet's
mean/std ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]). Their resize is torchvision's
PIL bilinear, which ``interpolation: bilinear-antialias`` (the default) matches within
one gray level; ``interpolation`` and ``resize_size`` are parameters. Their training-time
augmentation (random crops, jitter, flips) is not applied.

Images are sorted by file name within a class; the cache (``cub_<size>px.pt`` under
``root``) holds the split's classes, train then val then test, keyed on every source
file's name, size and modification time (or the archive's), the split files and the options.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lit_meta.data.archives import iter_members, list_members
from lit_meta.data.cache import cache_file, cached, file_stamp, fingerprint
from lit_meta.data.image_cache import Progress, compact, decode_into, serves_run
from lit_meta.data.class_pools import ClassPool, contiguous_pools
from lit_meta.data.decoding import IMAGE_EXTENSIONS
from lit_meta.data.image_datamodule import ImageEpisodicDataModule
from lit_meta.data.preprocessing import check_resize
from lit_meta.data.splits import SPLITS, check_disjoint, read_class_list, split_digest, split_files

TOP = "CUB_200_2011"
ARCHIVE = f"{TOP}.tgz"
MEAN = (0.485, 0.456, 0.406)  # ImageNet, as CloserLookFewShot's TransformLoader
STD = (0.229, 0.224, 0.225)
LAYOUTS = f"{TOP}/images/<NNN.Class_name>/*.jpg or {ARCHIVE}"


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def find_source(root: Path) -> tuple[str, Path]:
    """``("folder", root/CUB_200_2011/images)`` or ``("archive", root/CUB_200_2011.tgz)``."""
    folder, archive = root / TOP / "images", root / ARCHIVE
    if folder.is_dir():
        return "folder", folder
    if archive.is_file():
        return "archive", archive
    where = "" if root.is_dir() else " (the folder does not exist)"
    raise ValueError(f"no CUB-200-2011 in {root}{where}; expected {LAYOUTS} there")


def list_folder(images: Path) -> dict[str, list[Path]]:
    """``class folder -> image files sorted by name``."""
    classes = {}
    for folder in sorted(p for p in images.iterdir() if p.is_dir() and not p.name.startswith(".")):
        classes[folder.name] = sorted(f for f in folder.iterdir() if f.is_file() and _is_image(f.name))
    return classes


def list_archive(archive: Path) -> dict[str, list[str]]:
    """``class folder -> member names sorted by file name`` of ``CUB_200_2011/images/<class>/<file>``."""
    classes: dict[str, list[str]] = {}
    for member in list_members(archive):
        parts = member.name.split("/")
        if len(parts) == 4 and parts[:2] == [TOP, "images"] and _is_image(parts[3]):
            classes.setdefault(parts[2], []).append(member.name)
    return {name: sorted(files) for name, files in sorted(classes.items())}


def check_classes(found: dict[str, list[Any]], needed: list[str], where: Path) -> None:
    missing = [c for c in needed if c not in found]
    if missing:
        raise ValueError(f"CUB source {where} lacks {len(missing)} of the {len(needed)} classes the split needs, "
                         f"first {missing[0]!r}")
    for name in needed:
        if not found[name]:
            raise ValueError(f"class folder has no images ({'/'.join(IMAGE_EXTENSIONS)}): {where}/{name}")


def split_classes(split_dir: str | None) -> dict[str, list[str]]:
    files = split_files("cub", split_dir)
    classes = {s: read_class_list(files[s]) for s in SPLITS}
    check_disjoint(classes, files, lambda name: f"class {name!r}")
    return classes


def load_cub(root: Path, cache_dir: str | None, split_dir: str | None, options: dict[str, Any],
             on_bad_image: str) -> dict[str, Any]:
    """The cached CUB tensors of the split's classes (built and saved atomically if missing or stale)."""
    layout, path = find_source(root)
    splits = split_classes(split_dir)
    needed = [name for s in SPLITS for name in splits[s]]
    listing: dict[str, list[Any]] = list_folder(path) if layout == "folder" else list_archive(path)
    check_classes(listing, needed, path)
    if layout == "folder":
        stamps: list[Any] = [(c, *file_stamp(f)) for c in needed for f in listing[c]]
    else:
        stamps = [file_stamp(path)]
    key = fingerprint("cub", options, layout, stamps, split_digest(split_files("cub", split_dir)))
    cache = cache_file(root, cache_dir, f"cub_{options['image_size']}px")

    def build() -> dict[str, Any]:
        # Slots in split order; an archive is read in its own order, each image going to its slot.
        items = [(c, f) for c in needed for f in listing[c]]
        classes = [needed.index(c) for c, _ in items]
        size = options["image_size"]
        out = torch.empty(len(items), 3, size, size, dtype=torch.uint8)
        progress = Progress(len(items), f"building the CUB cache {cache.name}")
        try:
            if layout == "folder":
                entries = ((i, str(f), f) for i, (_, f) in enumerate(items))
            else:
                slot = {member: i for i, (_, member) in enumerate(items)}
                entries = ((slot[m], f"{path}:{m}", blob) for m, blob in iter_members(path, set(slot)))
            skipped = decode_into(out, entries, options, on_bad_image, progress)
        finally:
            progress.close()
        images, counts = compact(out, classes, len(needed), skipped)
        return {"images": images, "counts": counts, "names": needed,
                "splits": {s: len(splits[s]) for s in SPLITS}, "skipped": [str(items[i][1]) for i in skipped]}

    return cached(cache, key, build, usable=lambda data: serves_run(data, on_bad_image))


def cub_pools(data: dict[str, Any]) -> dict[str, ClassPool]:
    """Each split's classes are a contiguous block of the cache: the pools are views, not copies."""
    return contiguous_pools(data["images"], data["counts"], data["names"], data["splits"])


class CUBDataModule(ImageEpisodicDataModule):
    """CUB episodes (module docstring): ``root`` holds ``CUB_200_2011/images/`` or ``CUB_200_2011.tgz``."""

    name = "cub"
    default_mean, default_std = MEAN, STD

    def __init__(
        self,
        root: str = "data/cub",
        resize_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        # the shared image options (``image_size``, ``split_dir``, ``interpolation``, ``mean``,
        # ``on_bad_image``, ...) come through ``kwargs``
        super().__init__(root=root, channels=3, invert=False, rotations=False, **kwargs)
        self.resize_size = int(self.image_size * 1.15) if resize_size is None else resize_size
        check_resize(self.interpolation, self.image_size, self.resize_size)

    def build_pools(self) -> dict[str, ClassPool]:
        return cub_pools(load_cub(self.root, self.cache_dir, self.split_dir, self.decode_options(), self.on_bad_image))

    def spec_extra(self) -> dict[str, Any]:
        return {"resize_size": self.resize_size}
