"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018, TADAM), built from CIFAR-100.

Source: the CIFAR-100 python version as torchvision lays it out,
``<root>/cifar-100-python/{train,test,meta}`` (``--data.download true`` fetches it with
``torchvision.datasets.CIFAR100``), or the archive ``<root>/cifar-100-python.tar.gz``
read in place. The raw pickles are read with ``encoding='latin1'``: ``train`` and
``test`` hold ``data`` (uint8 ``[N, 3072]``, the R, G and B planes of a 32x32 image),
``fine_labels`` and ``coarse_labels``; ``meta`` holds ``fine_label_names`` and
``coarse_label_names``.

Every image of a fine class is used: train 500 + test 100 = 600, 32x32 (resized only if
``image_size`` is not 32, with ``interpolation``). Classes are in fine-label order
(alphabetical), images in file order, train file first. The 60,000 images are cached
once under ``root`` (``cifar100_<size>px.pt``, shared by both benchmarks), keyed on the
three files (name, size, modification time) and the options.

Splits (shipped, see ``lit_meta/data/splits/README.md``):

- ``cifar_fs``: 64 / 16 / 20 fine classes by name (Bertinetto et al.'s files);
- ``fc100``: by superclass, 12 / 4 / 4 coarse classes = 60 / 20 / 20 fine classes
  (TADAM's ``create_dataset_cifar100.py``); each line's ids and names are checked
  against the source's ``meta`` and coarse labels.

Normalisation: the CIFAR-100 training-set mean and std per channel.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lit_meta.data.archives import iter_members, list_members
from lit_meta.data.cache import cache_file, cached, file_stamp, fingerprint
from lit_meta.data.class_pools import ClassPool
from lit_meta.data.image_datamodule import ImageEpisodicDataModule
from lit_meta.data.preprocessing import preprocess
from lit_meta.data.splits import SPLITS, read_class_list, read_fc100, split_files

FOLDER = "cifar-100-python"
ARCHIVE = "cifar-100-python.tar.gz"
FILES = ("train", "test", "meta")
MEAN = (0.5071, 0.4865, 0.4409)  # CIFAR-100 train set, per channel
STD = (0.2673, 0.2564, 0.2762)
LAYOUTS = f"{FOLDER}/{{train,test,meta}} (torchvision's CIFAR100 layout) or {ARCHIVE}"


def find_source(root: Path, download: bool = False) -> tuple[str, Path]:
    """``("folder", root/cifar-100-python)`` or ``("archive", root/cifar-100-python.tar.gz)``."""
    folder, archive = root / FOLDER, root / ARCHIVE
    if not folder.is_dir() and not archive.is_file() and download:
        from torchvision.datasets import CIFAR100

        root.mkdir(parents=True, exist_ok=True)
        CIFAR100(str(root), train=True, download=True)
    if folder.is_dir():
        missing = [f for f in FILES if not (folder / f).is_file()]
        if missing:
            raise ValueError(f"CIFAR-100 folder {folder} has no {', '.join(missing)} (expected {LAYOUTS})")
        return "folder", folder
    if archive.is_file():
        return "archive", archive
    where = "" if root.is_dir() else " (the folder does not exist)"
    raise ValueError(f"no CIFAR-100 in {root}{where}; expected {LAYOUTS} there, or pass --data.download true")


def _unpickle(data: bytes, name: str) -> dict[str, Any]:
    try:
        value = pickle.load(io.BytesIO(data), encoding="latin1")
    except Exception as error:  # truncated files raise EOFError / UnpicklingError / ValueError
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"cannot read CIFAR-100 pickle {name}: {reason} (truncated or damaged?)") from None
    if not isinstance(value, dict):
        raise ValueError(f"CIFAR-100 pickle {name} holds a {type(value).__name__}, not a dict")
    return value


def read_pickles(layout: str, path: Path) -> dict[str, dict[str, Any]]:
    """``{"train", "test", "meta"} -> unpickled dict``, from the folder or straight from the archive."""
    if layout == "folder":
        out = {}
        for name in FILES:
            try:
                data = (path / name).read_bytes()
            except OSError as error:
                raise ValueError(f"cannot read {path / name}: {error}") from None
            out[name] = _unpickle(data, str(path / name))
        return out
    members = {f"{FOLDER}/{name}": name for name in FILES}
    found = {m.name for m in list_members(path)}
    missing = [m for m in members if m not in found]
    if missing:
        raise ValueError(f"archive {path} has no {', '.join(missing)} (expected {LAYOUTS})")
    return {members[m]: _unpickle(data, f"{path}:{m}") for m, data in iter_members(path, set(members))}


def _part(pickles: dict[str, dict[str, Any]], name: str, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    part = pickles[name]
    missing = [k for k in ("data", "fine_labels", "coarse_labels") if k not in part]
    if missing:
        raise ValueError(f"CIFAR-100 pickle {where}/{name} has no {', '.join(repr(k) for k in missing)} "
                         f"(found {sorted(part)})")
    data = np.asarray(part["data"])
    fine, coarse = np.asarray(part["fine_labels"], dtype=np.int64), np.asarray(part["coarse_labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"CIFAR-100 pickle {where}/{name}: 'data' must be uint8 [N, 3072], "
                         f"got {data.dtype} {list(data.shape)}")
    if len(fine) != len(data) or len(coarse) != len(data):
        raise ValueError(f"CIFAR-100 pickle {where}/{name}: {len(data)} images but {len(fine)} fine and "
                         f"{len(coarse)} coarse labels")
    if len(fine) and (fine.min() < 0 or fine.max() > 99 or coarse.min() < 0 or coarse.max() > 19):
        raise ValueError(f"CIFAR-100 pickle {where}/{name}: labels outside 0..99 (fine) or 0..19 (coarse)")
    return data, fine, coarse


def read_cifar100(layout: str, path: Path, image_size: int, resize: str) -> dict[str, Any]:
    """All images grouped by fine class (train file first, file order), with names and the fine -> coarse map."""
    pickles = read_pickles(layout, path)
    meta = pickles["meta"]
    fine_names, coarse_names = meta.get("fine_label_names"), meta.get("coarse_label_names")
    if not isinstance(fine_names, list) or len(fine_names) != 100 or not isinstance(coarse_names, list) \
            or len(coarse_names) != 20:
        raise ValueError(f"CIFAR-100 pickle {path}/meta needs 'fine_label_names' (100) and 'coarse_label_names' (20)")
    parts = [_part(pickles, name, str(path)) for name in ("train", "test")]
    data = np.concatenate([p[0] for p in parts])
    fine = np.concatenate([p[1] for p in parts])
    coarse = np.concatenate([p[2] for p in parts])
    coarse_of_fine = np.full(100, -1, dtype=np.int64)
    for f, c in zip(fine.tolist(), coarse.tolist()):
        if coarse_of_fine[f] not in (-1, c):
            raise ValueError(f"CIFAR-100 in {path}: fine class {fine_names[f]!r} has images of two coarse labels "
                             f"({coarse_names[coarse_of_fine[f]]!r} and {coarse_names[c]!r})")
        coarse_of_fine[f] = c
    order = np.argsort(fine, kind="stable")
    images = data[order].reshape(-1, 3, 32, 32)
    return {"images": preprocess(images, image_size, resize=resize),
            "counts": torch.from_numpy(np.bincount(fine, minlength=100)),
            "fine_names": [str(n) for n in fine_names], "coarse_names": [str(n) for n in coarse_names],
            "coarse_of_fine": torch.from_numpy(coarse_of_fine)}


def load_cifar100(root: Path, cache_dir: str | None, image_size: int, resize: str, download: bool) -> dict[str, Any]:
    """The cached CIFAR-100 tensors (built and saved atomically if missing or stale)."""
    layout, path = find_source(root, download)
    files = [path / f for f in FILES] if layout == "folder" else [path]
    key = fingerprint("cifar100", image_size, resize, layout, [file_stamp(f) for f in files])
    cache = cache_file(root, cache_dir, f"cifar100_{image_size}px")
    return cached(cache, key, lambda: {"source": str(path), **read_cifar100(layout, path, image_size, resize)})


def _check_present(data: dict[str, Any], ids: list[int], split: str, benchmark: str) -> None:
    empty = [data["fine_names"][i] for i in ids if int(data["counts"][i]) == 0]
    if empty:
        raise ValueError(f"CIFAR-100 source {data['source']} has no images of {len(empty)} of the {len(ids)} classes "
                         f"the {benchmark} {split} split needs, first {empty[0]!r}")


def cifar_fs_classes(data: dict[str, Any], split_dir: str | None) -> dict[str, list[int]]:
    """Fine class ids of each CIFAR-FS split, in fine-label order."""
    names = data["fine_names"]
    out = {}
    for split, path in split_files("cifar_fs", split_dir).items():
        ids = []
        for name in read_class_list(path):
            if name not in names:
                raise ValueError(f"split file {path}: class {name!r} is not a CIFAR-100 fine class "
                                 f"of the source {data['source']}")
            ids.append(names.index(name))
        _check_present(data, ids, split, "cifar_fs")
        out[split] = sorted(ids)
    return out


def fc100_classes(data: dict[str, Any], split_dir: str | None) -> dict[str, list[int]]:
    """Fine class ids of each FC100 split (every fine class of its superclasses), in fine-label order."""
    fine, coarse, coarse_of_fine = data["fine_names"], data["coarse_names"], data["coarse_of_fine"]
    out = {}
    for split, path in split_files("fc100", split_dir).items():
        ids = []
        for coarse_id, coarse_name, fine_id, fine_name in read_fc100(path):
            if fine_id >= len(fine) or fine[fine_id] != fine_name:
                raise ValueError(f"split file {path}: fine class {fine_id} {fine_name!r} is not in the source "
                                 f"{data['source']} (its fine class {fine_id} is "
                                 f"{fine[fine_id] if fine_id < len(fine) else 'missing'!r})")
            if coarse_id >= len(coarse) or coarse[coarse_id] != coarse_name:
                raise ValueError(f"split file {path}: superclass {coarse_id} {coarse_name!r} is not in the source "
                                 f"{data['source']}")
            if int(data["counts"][fine_id]) and int(coarse_of_fine[fine_id]) != coarse_id:
                raise ValueError(f"split file {path}: {fine_name!r} is in superclass {coarse_name!r} there but in "
                                 f"{coarse[int(coarse_of_fine[fine_id])]!r} in the source {data['source']}")
            ids.append(fine_id)
        _check_present(data, ids, split, "fc100")
        out[split] = sorted(ids)
    return out


def cifar_pools(data: dict[str, Any], classes: dict[str, list[int]]) -> dict[str, ClassPool]:
    everything = ClassPool(data["images"], data["counts"], list(data["fine_names"]))
    return {split: everything.subset(classes[split]) for split in SPLITS}


class CIFARFSDataModule(ImageEpisodicDataModule):
    """CIFAR-FS episodes (module docstring): ``root`` holds ``cifar-100-python/`` or its ``.tar.gz``."""

    name = "cifar_fs"
    default_mean, default_std = MEAN, STD

    def __init__(
        self,
        root: str = "data/cifar100",
        download: bool = False,
        image_size: int = 32,
        **kwargs: Any,
    ) -> None:
        # the shared image options (``split_dir``, ``interpolation``, ``mean``, ...) come through
        # ``kwargs``; the pickles hold arrays, not image files, so there is no ``on_bad_image``
        super().__init__(root=root, image_size=image_size, channels=3, invert=False, rotations=False,
                         on_bad_image="stop", **kwargs)
        self.download = download

    def split_classes(self, data: dict[str, Any]) -> dict[str, list[int]]:
        return cifar_fs_classes(data, self.split_dir)

    def build_pools(self) -> dict[str, ClassPool]:
        data = load_cifar100(self.root, self.cache_dir, self.image_size, self.interpolation, self.download)
        return cifar_pools(data, self.split_classes(data))


class FC100DataModule(CIFARFSDataModule):
    """FC100 episodes (module docstring): the same source and options as CIFAR-FS, split by superclass."""

    name = "fc100"

    def split_classes(self, data: dict[str, Any]) -> dict[str, list[int]]:
        return fc100_classes(data, self.split_dir)
