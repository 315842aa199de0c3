"""Few-shot episodes from the user's own images: ``root/<class>/*.{png,jpg,jpeg}``.

The classes are split into train / val / test either

- by seeded fraction (``split: fraction``): classes sorted by name, shuffled with
  ``split_seed``, ``val_fraction`` and ``test_fraction`` of them (rounded) to val and
  test, the rest to train; or
- by sub-folders (``split: folders``): ``root/train/<class>/``, ``root/val/<class>/``,
  ``root/test/<class>/``.

``split: auto`` (the default) picks ``folders`` when ``root/train/`` exists. Images are
read as ``channels`` (1: gray, 3: RGB), optionally inverted, resized to ``image_size``
square (aspect ratio not kept), cached as uint8 under ``root``, and normalized with
``mean`` / ``std`` per channel when sampled.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lit_meta.data.base import SPLITS
from lit_meta.data.cache import cache_file, cached, fingerprint
from lit_meta.data.class_pools import ClassPool, split_pools
from lit_meta.data.decoding import IMAGE_EXTENSIONS, decode_image
from lit_meta.data.image_datamodule import ImageEpisodicDataModule
from lit_meta.data.preprocessing import preprocess_list

SPLIT_MODES = ("auto", "fraction", "folders")


def list_classes(folder: Path) -> dict[str, list[Path]]:
    """``folder/<class>/<image>`` -> ``{class: sorted image paths}``; a class folder without images is an error."""
    classes: dict[str, list[Path]] = {}
    for directory in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in directory.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"class folder has no images ({'/'.join(IMAGE_EXTENSIONS)}): {directory}")
        classes[directory.name] = files
    if not classes:
        raise ValueError(f"no class folders in {folder}; expected {folder}/<class>/*.png or *.jpg")
    return classes


class ImageFolderDataModule(ImageEpisodicDataModule):
    name = "folder"

    def __init__(
        self,
        root: str = "data/folder",
        split: str = "auto",
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        # How the class folders split; the input pipeline (``image_size``, ``channels``,
        # ``invert``, ``interpolation``, ``mean``, ``std``, ``rotations``), episode sizes and
        # task stream are the base classes' keyword-only arguments, options here. The split is
        # the folders' or seeded (no split files), and an unreadable image stops the build.
        if split not in SPLIT_MODES:
            raise ValueError(f"split must be one of {SPLIT_MODES}, got {split!r}")
        for option, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= value < 1:
                raise ValueError(f"{option} must be in [0, 1), got {value}")
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
        super().__init__(root=root, split_dir=None, on_bad_image="stop", **kwargs)
        self.split, self.split_seed = split, split_seed
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    def split_mode(self) -> str:
        self.check_root()
        if self.split != "auto":
            return self.split
        return "folders" if (self.root / "train").is_dir() else "fraction"

    def list_splits(self) -> dict[str, dict[str, list[Path]]]:
        """``split -> {class: files}``."""
        if self.split_mode() == "folders":
            missing = [f"{s}/" for s in SPLITS if not (self.root / s).is_dir()]
            if missing:
                raise ValueError(f"split=folders needs train/, val/ and test/ in {self.root}; missing {', '.join(missing)}")
            return {s: list_classes(self.root / s) for s in SPLITS}
        classes = list_classes(self.root)
        names = sorted(classes)
        order = torch.randperm(len(names), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        n_val, n_test = round(len(names) * self.val_fraction), round(len(names) * self.test_fraction)
        picks = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
        return {s: {names[i]: classes[names[i]] for i in sorted(picks[s])} for s in SPLITS}

    def build_pools(self) -> dict[str, ClassPool]:
        splits = self.list_splits()
        stamps = [(s, c, f.name, f.stat().st_size, f.stat().st_mtime_ns)
                  for s in SPLITS for c, files in splits[s].items() for f in files]
        key = fingerprint("folder", self.image_size, self.channels, self.invert, stamps, *self.resize_key())
        path = cache_file(self.root, self.cache_dir, f".lit_meta_folder_{self.image_size}px_{self.channels}c")

        def build() -> dict[str, Any]:
            data = {}
            for split in SPLITS:
                classes = splits[split]
                arrays = [decode_image(f, self.channels) for files in classes.values() for f in files]
                data[split] = {"images": preprocess_list(arrays, self.image_size, self.invert, self.interpolation)
                               if arrays else torch.empty(0, self.channels, self.image_size, self.image_size,
                                                          dtype=torch.uint8),
                               "counts": torch.tensor([len(f) for f in classes.values()], dtype=torch.long),
                               "names": list(classes)}
            return data

        return split_pools(cached(path, key, build))

    def spec_extra(self) -> dict[str, Any]:
        return {"rotations": self.rotations}
