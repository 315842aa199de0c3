"""miniImageNet (Vinyals et al. 2016, the split of Ravi & Larochelle 2017): 100 ImageNet
classes of 600 RGB images, 64 train / 16 val / 20 test classes, 84x84.

``root`` holds either

- the pickle caches ``mini-imagenet-cache-{train,val,test}.pkl``, each a dict with
  ``image_data`` (uint8 ``[N, 84, 84, 3]``) and ``class_dict`` (class -> list of row
  indices); or
- Ravi & Larochelle's ``train.csv`` / ``val.csv`` / ``test.csv`` (``filename,label``)
  with the images in ``images/`` (resized to ``image_size`` when they differ).

Or, with ``imagenet_root``, it is built from the original source: an ILSVRC-2012 train
folder (``<synset>/<synset>_<n>.JPEG`` or per-synset tars) and the shipped Ravi CSVs
(or ``split_dir``), read by :mod:`lit_meta.data.imagenet_train`; the cache (60,000 images,
1.3 GB at 84x84, one tensor file written atomically) then goes under ``root``. Each row
``<synset><8 digits>.jpg`` of the CSVs names the image at that **1-based position** of
the synset's files in numerical order, the rule of the community tools
(yaoyao-liu/mini-imagenet-tools, CloserLookFewShot's ``write_miniImagenet_filelist.py``;
:func:`mini_from_imagenet`). Lexicographic order (torchvision's ``ImageFolder``) picks
other files.

Classes are ordered by name, images as the pickle's index lists or the CSV rows give
them. They are converted once to a cached uint8 tensor file under ``root``; sampling
normalizes per channel (``mean`` / ``std``, defaulting to the statistics of the
miniImageNet training images used by the ProtoNet/FEAT code). Images of another size
are resized with ``interpolation`` (default ``bilinear-antialias``; see
:mod:`lit_meta.data.imagenet_train` for what the codebases used).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lit_meta.data.cache import cache_file, cached, file_stamp, fingerprint
from lit_meta.data.class_pools import ClassPool, split_pools
from lit_meta.data.decoding import decode_image
from lit_meta.data.image_cache import Source, decode_all, serves_run, stamp_digest
from lit_meta.data.image_datamodule import ImageEpisodicDataModule
from lit_meta.data.imagenet_train import ImageNetTrain
from lit_meta.data.preprocessing import RESIZE, preprocess, preprocess_list
from lit_meta.data.splits import SPLITS, read_filename_label, read_ravi, split_digest, split_files

MEAN = (120.39586422 / 255, 115.59361427 / 255, 104.54012653 / 255)
STD = (70.68188272 / 255, 68.27635443 / 255, 72.54505529 / 255)
LAYOUTS = "mini-imagenet-cache-{train,val,test}.pkl, or train.csv/val.csv/test.csv (filename,label) with images/"

Split = tuple[torch.Tensor, torch.Tensor, list[str]]  # uint8 images, counts, class names


def pickle_path(root: Path, split: str) -> Path:
    return root / f"mini-imagenet-cache-{split}.pkl"


def read_pickle(path: Path, image_size: int, resize: str = RESIZE) -> Split:
    try:
        with open(path, "rb") as handle:
            data = pickle.load(handle)
    except Exception as error:
        raise ValueError(f"cannot read pickle {path}: {error}") from None
    if not isinstance(data, dict) or "image_data" not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} has no 'image_data' (found {keys})")
    if "class_dict" not in data:
        raise ValueError(f"{path} has no 'class_dict' (found {sorted(data)})")
    images = np.asarray(data["image_data"])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: 'image_data' must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    names = sorted(data["class_dict"])
    index = [np.asarray(data["class_dict"][n], dtype=np.int64) for n in names]
    for name, rows in zip(names, index):
        if len(rows) == 0:
            raise ValueError(f"{path}: class {name!r} has no images")
        if rows.min() < 0 or rows.max() >= len(images):
            raise ValueError(f"{path}: class {name!r} indexes past the {len(images)} images of 'image_data'")
    rows = np.concatenate(index)
    out = [preprocess(np.ascontiguousarray(images[rows[i:i + 2048]].transpose(0, 3, 1, 2)), image_size, resize=resize)
           for i in range(0, len(rows), 2048)]
    return torch.cat(out), torch.tensor([len(r) for r in index]), [str(n) for n in names]


def read_csv(path: Path, image_dir: Path, image_size: int, resize: str = RESIZE) -> Split:
    classes: dict[str, list[Path]] = {}
    for line, filename, label in read_filename_label(path):
        file = image_dir / filename
        if not file.is_file():
            raise ValueError(f"{path}:{line}: image file not found: {file}")
        classes.setdefault(label, []).append(file)
    if not classes:
        raise ValueError(f"{path} lists no images")
    names = sorted(classes)
    arrays = [decode_image(f, 3) for n in names for f in classes[n]]
    return preprocess_list(arrays, image_size, resize=resize), torch.tensor([len(classes[n]) for n in names]), names


def mini_from_imagenet(imagenet: str, root: Path, cache_dir: str | None, split_dir: str | None,
                       options: dict[str, Any], on_bad_image: str) -> dict[str, Any]:
    """The miniImageNet cache (``{split: {images, counts, names}}``, as the pickles' or CSVs' cache)
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


class MiniImageNetDataModule(ImageEpisodicDataModule):
    name = "miniimagenet"
    default_mean, default_std = MEAN, STD

    def __init__(
        self,
        root: str = "data/miniimagenet",
        imagenet_root: str | None = None,
        **kwargs: Any,
    ) -> None:
        # RGB; everything else is the base classes' keyword-only arguments: the shared image
        # options (``image_size``, ``split_dir``, ``interpolation``, ``mean``, ``on_bad_image``,
        # ...), the episode sizes and the task stream (``ways``, ``meta_batch_size``, ...).
        super().__init__(root=root, channels=3, invert=False, **kwargs)
        self.imagenet_root = imagenet_root

    def find_layout(self) -> tuple[str, list[Path]]:
        self.check_root()
        pickles = [pickle_path(self.root, s) for s in SPLITS]
        csvs = [self.root / f"{s}.csv" for s in SPLITS]
        for layout, files in (("pickle", pickles), ("csv", csvs)):
            present = [p for p in files if p.is_file()]
            if len(present) == len(files):
                if layout == "csv" and not (self.root / "images").is_dir():
                    raise ValueError(f"found the CSV files but no images/ folder in {self.root}")
                return layout, files
            if present:  # one split of a layout: a download or copy that stopped short
                missing = [str(p) for p in files if not p.is_file()]
                raise ValueError(f"miniImageNet in {self.root} lacks {' and '.join(missing)} (found "
                                 f"{', '.join(p.name for p in present)}): every split's file is needed")
        raise ValueError(f"no miniImageNet data in {self.root}; expected {LAYOUTS}")

    def build_pools(self) -> dict[str, ClassPool]:
        if self.imagenet_root is not None:
            data = mini_from_imagenet(self.imagenet_root, self.root, self.cache_dir, self.split_dir,
                                      self.decode_options(), self.on_bad_image)
            return split_pools(data)
        layout, files = self.find_layout()
        key = fingerprint("miniimagenet", self.image_size, layout, [file_stamp(p) for p in files], *self.resize_key())
        path = cache_file(self.root, self.cache_dir, f"miniimagenet_{self.image_size}px")

        def build() -> dict[str, Any]:
            data = {}
            for split, file in zip(SPLITS, files):
                if layout == "pickle":
                    images, counts, names = read_pickle(file, self.image_size, self.interpolation)
                else:
                    images, counts, names = read_csv(file, self.root / "images", self.image_size, self.interpolation)
                data[split] = {"images": images, "counts": counts, "names": names}
            return data

        return split_pools(cached(path, key, build))

    def spec_extra(self) -> dict[str, Any]:
        return {"rotations": self.rotations}
