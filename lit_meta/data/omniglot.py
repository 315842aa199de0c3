"""Omniglot (Lake et al. 2015): 1623 handwritten characters of 50 alphabets, 20 drawers each.

``root`` may hold, for each of the two halves ``images_background`` (964 characters, 30
alphabets) and ``images_evaluation`` (659 characters, 20 alphabets), any of:

- the official folder ``<half>/<alphabet>/<character>/XXXX_YY.png`` (also looked for in
  ``root/omniglot-py/``, where torchvision's downloader puts it);
- the official zip ``<half>.zip``;
- an array pack ``<half>.npz`` with key ``images``, ``[characters, drawers, H, W]``, bool
  (True = paper, as in the PNGs) or uint8 gray levels.

Characters are ordered by the official file number ``XXXX`` (the npz packs keep that
order), drawers by ``YY``, background before evaluation; so every layout gives the same
tensors. Images are inverted (ink = 1) and resized once, then cached under ``root``; the
cache key holds every PNG's name, size and modification time for a folder (a file changed
or added deep inside a half rebuilds it), the file's own for a zip or npz.

A folder or zip whose alphabets carry the official names is the official release: it must
hold every alphabet with its number of characters (964 / 659 in all, :data:`OFFICIAL`) and
20 drawers per character, or it is named as incomplete (an interrupted download or
extraction) with a hint to fetch it again. Other names (the tests' miniatures, a subset made
on purpose) and npz packs are read as they are.

Splits:

- ``finn`` (Finn et al. 2017; also Reptile, Meta-SGD): all 1623 characters shuffled with
  ``split_seed``, then 1100 train / 100 val / 423 test;
- ``lake``: train and val are background characters (100 of them, seeded, for val),
  test is the 659 evaluation characters.

Packs of another size (the tests' miniatures) are split in the same proportions.
Train characters get their 90° rotations as new classes (``rotations``).
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lit_meta.data.cache import cache_file, cached, file_stamp, fingerprint
from lit_meta.data.class_pools import ClassPool
from lit_meta.data.decoding import decode_image
from lit_meta.data.image_datamodule import ImageEpisodicDataModule
from lit_meta.data.preprocessing import RESIZE, preprocess, preprocess_list

HALVES = ("images_background", "images_evaluation")
# The official release (github.com/brendenlake/omniglot, python/images_*.zip): characters per
# alphabet, 964 background and 659 evaluation ones in all; every character has DRAWERS images.
OFFICIAL = {
    "images_background": {
        "Alphabet_of_the_Magi": 20, "Anglo-Saxon_Futhorc": 29, "Arcadian": 26, "Armenian": 41,
        "Asomtavruli_(Georgian)": 40, "Balinese": 24, "Bengali": 46, "Blackfoot_(Canadian_Aboriginal_Syllabics)": 14,
        "Braille": 26, "Burmese_(Myanmar)": 34, "Cyrillic": 33, "Early_Aramaic": 22, "Futurama": 26, "Grantha": 43,
        "Greek": 24, "Gujarati": 48, "Hebrew": 22, "Inuktitut_(Canadian_Aboriginal_Syllabics)": 16,
        "Japanese_(hiragana)": 52, "Japanese_(katakana)": 47, "Korean": 40, "Latin": 26, "Malay_(Jawi_-_Arabic)": 40,
        "Mkhedruli_(Georgian)": 41, "N_Ko": 33, "Ojibwe_(Canadian_Aboriginal_Syllabics)": 14, "Sanskrit": 42,
        "Syriac_(Estrangelo)": 23, "Tagalog": 17, "Tifinagh": 55,
    },
    "images_evaluation": {
        "Angelic": 20, "Atemayar_Qelisayer": 26, "Atlantean": 26, "Aurek-Besh": 26, "Avesta": 26, "Ge_ez": 26,
        "Glagolitic": 45, "Gurmukhi": 45, "Kannada": 41, "Keble": 26, "Malayalam": 47, "Manipuri": 40,
        "Mongolian": 30, "Old_Church_Slavonic_(Cyrillic)": 45, "Oriya": 46, "Sylheti": 28, "Syriac_(Serto)": 23,
        "Tengwar": 25, "Tibetan": 42, "ULOG": 26,
    },
}
DRAWERS = 20
SPLITS = ("finn", "lake")
FINN_COUNTS = (1100, 100, 423)  # train / val / test of all 1623 characters
LAKE_VAL = (100, 964)  # val characters out of the background ones
_NUMBERED = re.compile(r"^(\d+)_(\d+)$")
LAYOUTS = (
    "folders images_background/<alphabet>/<character>/*.png and images_evaluation/...; "
    "zips images_background.zip and images_evaluation.zip; "
    "or packs images_background.npz and images_evaluation.npz (key 'images')"
)


def _character_order(name: str, files: list[str]) -> tuple[Any, ...]:
    """Sort key of a character: its official number ``XXXX`` (from ``XXXX_YY.png``), else its path."""
    numbers = [int(m.group(1)) for f in files if (m := _NUMBERED.match(Path(f).stem))]
    return (0, min(numbers), name) if numbers else (1, 0, name)


def _drawer_order(path: str) -> tuple[Any, ...]:
    m = _NUMBERED.match(Path(path).stem)
    return (0, int(m.group(2)), path) if m else (1, 0, path)


def _group(characters: dict[str, list[str]], where: str) -> list[tuple[str, list[str]]]:
    for name, files in characters.items():
        if not files:
            raise ValueError(f"class folder has no images: {where}/{name}")
    ordered = sorted(characters.items(), key=lambda kv: _character_order(kv[0], kv[1]))
    return [(name, sorted(files, key=_drawer_order)) for name, files in ordered]


def check_complete(half: str, characters: dict[str, list[str]], where: str) -> None:
    """One line naming ``where`` when it is the official release (official alphabet names) with
    alphabets, characters or drawers missing. ``characters``: ``alphabet/character -> files``."""
    official = OFFICIAL.get(half, {})
    per_alphabet: dict[str, int] = {}
    for name in characters:
        alphabet = name.split("/")[0]
        per_alphabet[alphabet] = per_alphabet.get(alphabet, 0) + 1
    if not per_alphabet.keys() & official.keys():
        return  # not the official release: nothing to count against
    problems = []
    missing = sorted(official.keys() - per_alphabet.keys())
    if missing:
        problems.append(f"missing alphabets {_some(missing)}")
    short = [f"{a} has {n} of {official[a]} characters" for a, n in sorted(per_alphabet.items())
             if a in official and n < official[a]]
    few = [f"{name} has {len(files)} of {DRAWERS} drawers" for name, files in sorted(characters.items())
           if len(files) < DRAWERS]
    problems += [_some(short, "; "), _some(few, "; ")]
    problems = [p for p in problems if p]
    if problems:
        found, expected = len(characters), sum(official.values())
        raise ValueError(f"Omniglot {where} is incomplete: {found} of {expected} characters ({'; '.join(problems)}), "
                         f"an interrupted download or extraction? Delete it and download it again "
                         f"(--data.download true, or unzip the official {half}.zip again)")


def _some(items: list[str], sep: str = ", ", shown: int = 3) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return sep.join(items[:shown]) + more


def list_folder(half: Path) -> dict[str, list[str]]:
    """``half/<alphabet>/<character>/*.png`` -> ``{"alphabet/character": [png paths]}``, checked
    for completeness when it is the official release."""
    characters: dict[str, list[str]] = {}
    for alphabet in sorted(p for p in half.iterdir() if p.is_dir()):
        for character in sorted(p for p in alphabet.iterdir() if p.is_dir()):
            characters[f"{alphabet.name}/{character.name}"] = [
                str(f) for f in character.iterdir() if f.suffix.lower() == ".png"]
    if not characters:
        raise ValueError(f"no <alphabet>/<character>/ folders in {half}")
    check_complete(half.name, characters, str(half))
    return characters


def folder_stamps(characters: dict[str, list[str]]) -> list[tuple[str, str, int, int]]:
    """(character, file name, size, modification time) of every PNG: the cache key of a folder."""
    stamps = []
    for name, files in sorted(characters.items()):
        for file in sorted(files):
            stat = os.stat(file)
            stamps.append((name, Path(file).name, stat.st_size, stat.st_mtime_ns))
    return stamps


def _characters(arrays: list[np.ndarray], grouped: list[tuple[str, list[str]]], image_size: int,
                resize: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The decoded images of ``grouped`` characters, in order -> (uint8 images, counts, character names)."""
    return (preprocess_list(arrays, image_size, invert=True, resize=resize),
            torch.tensor([len(files) for _, files in grouped]), [n for n, _ in grouped])


def read_folder(half: Path, image_size: int, characters: dict[str, list[str]] | None = None,
                resize: str = RESIZE) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``half/<alphabet>/<character>/*.png`` -> (uint8 images, counts, character names)."""
    characters = list_folder(half) if characters is None else characters
    grouped = _group(characters, str(half))
    arrays = [decode_image(f, 1) for _, files in grouped for f in files]
    return _characters(arrays, grouped, image_size, resize)


def read_zip(path: Path, image_size: int, resize: str = RESIZE) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The official ``images_*.zip`` (``<half>/<alphabet>/<character>/*.png`` inside), read in place."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"cannot read zip {path}: {error} (an interrupted download? download it again)") from None
    with archive:
        characters: dict[str, list[str]] = {}
        for entry in archive.namelist():
            parts = entry.rstrip("/").split("/")
            if len(parts) < 3 or any(p.startswith(("__MACOSX", ".")) for p in parts):
                continue
            if entry.endswith("/"):
                if len(parts) == 3:  # half/alphabet/character/
                    characters.setdefault("/".join(parts[1:]), [])
            elif len(parts) == 4 and parts[-1].lower().endswith(".png"):
                characters.setdefault("/".join(parts[1:3]), []).append(entry)
        if not characters:
            raise ValueError(f"no <alphabet>/<character>/*.png entries in zip {path}")
        check_complete(path.stem, characters, str(path))
        grouped = _group(characters, str(path))
        arrays = []
        for _, files in grouped:
            for entry in files:
                try:
                    data = archive.read(entry)
                except (zipfile.BadZipFile, OSError) as error:
                    raise ValueError(f"cannot read image {path}:{entry}: {error}") from None
                arrays.append(decode_image(data, 1, name=f"{path}:{entry}"))
    return _characters(arrays, grouped, image_size, resize)


def read_npz(path: Path, image_size: int, resize: str = RESIZE) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``images`` ``[characters, drawers, H, W]``: bool (True = paper) or uint8 gray levels (0/1 read as bool)."""
    try:
        with np.load(path) as pack:
            if "images" not in pack.files:
                raise ValueError(f"{path} has no 'images' array (it has {pack.files})")
            images = pack["images"]
    except ValueError:
        raise
    except Exception as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    if images.ndim != 4 or images.dtype not in (np.bool_, np.uint8):
        raise ValueError(f"{path}: 'images' must be bool or uint8 [characters, drawers, H, W], "
                         f"got {images.dtype} {list(images.shape)}")
    if images.dtype == np.bool_ or images.max() <= 1:
        scale = np.uint8(255)
    else:
        scale = np.uint8(1)
    chars, drawers, h, w = images.shape
    step = max(1, 2048 // drawers)
    out = [preprocess((images[c:c + step] * scale).astype(np.uint8).reshape(-1, 1, h, w), image_size, invert=True,
                      resize=resize)
           for c in range(0, chars, step)]
    return torch.cat(out), torch.full((chars,), drawers), [f"{path.stem}/{c}" for c in range(chars)]


class OmniglotDataModule(ImageEpisodicDataModule):
    name = "omniglot"

    def __init__(
        self,
        root: str = "data/omniglot",
        split: str = "finn",
        split_seed: int = 0,
        download: bool = False,
        image_size: int = 28,
        rotations: bool = True,
        meta_batch_size: int = 32,
        **kwargs: Any,
    ) -> None:
        # Omniglot's own options; the shared ones (``ways``, ``shots``, ``queries``,
        # ``eval_*``, ``cache_dir``, ``interpolation``, ``mean``, ``val_tasks``, ...) are the
        # base classes' keyword-only arguments. Gray, ink inverted, no normalisation by default;
        # no split files (the splits are seeded) and a bad PNG stops the build.
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        super().__init__(root=root, image_size=image_size, channels=1, invert=True, split_dir=None,
                         on_bad_image="stop", rotations=rotations, meta_batch_size=meta_batch_size, **kwargs)
        self.split, self.split_seed, self.download = split, split_seed, download

    def spec_extra(self) -> dict[str, Any]:
        return {"split": self.split, "rotations": self.rotations}

    # -- finding and reading the files ---------------------------------------------
    def find_sources(self) -> dict[str, tuple[str, Path]]:
        """``half -> (layout, path)``; downloads with torchvision when allowed and nothing is found."""
        sources = self._search()
        if len(sources) < len(HALVES) and self.download:
            from torchvision.datasets import Omniglot

            self.root.mkdir(parents=True, exist_ok=True)
            for background in (True, False):
                Omniglot(str(self.root), background=background, download=True)
            sources = self._search()
        if len(sources) < len(HALVES):
            if not self.root.exists():
                raise ValueError(f"Omniglot root not found: {self.root}; put there any of: {LAYOUTS} "
                                 f"(or pass --data.download true)")
            missing = ", ".join(h for h in HALVES if h not in sources)
            raise ValueError(f"no Omniglot data for {missing} in {self.root}; expected any of: {LAYOUTS} "
                             f"(or pass --data.download true)")
        return sources

    def _search(self) -> dict[str, tuple[str, Path]]:
        sources: dict[str, tuple[str, Path]] = {}
        for base in (self.root, self.root / "omniglot-py"):
            for half in HALVES:
                if half in sources:
                    continue
                for layout, path in (("npz", base / f"{half}.npz"), ("folder", base / half),
                                     ("zip", base / f"{half}.zip")):
                    if path.is_dir() if layout == "folder" else path.is_file():
                        sources[half] = (layout, path)
                        break
        return sources

    def load_all(self) -> dict[str, Any]:
        """All characters (background, then evaluation) as uint8 ``[N, 1, S, S]``, ink = 255; cached."""
        sources = self.find_sources()
        folders = {h: list_folder(p) for h, (layout, p) in sources.items() if layout == "folder"}
        # a folder is keyed on every file inside it (its own mtime changes only with its entries)
        key = fingerprint("omniglot", self.image_size,
                          [(h, layout, p.name, folder_stamps(folders[h])) if h in folders else (h, layout, *file_stamp(p))
                           for h, (layout, p) in sorted(sources.items())], *self.resize_key())
        path = cache_file(self.root, self.cache_dir, f"omniglot_{self.image_size}px")

        def build() -> dict[str, Any]:
            readers = {"zip": read_zip, "npz": read_npz}
            parts = [read_folder(sources[h][1], self.image_size, folders[h], self.interpolation) if h in folders
                     else readers[sources[h][0]](sources[h][1], self.image_size, self.interpolation) for h in HALVES]
            return {
                "images": torch.cat([p[0] for p in parts]),
                "counts": torch.cat([p[1] for p in parts]).long(),
                "names": [n for p in parts for n in p[2]],
                "background": len(parts[0][1]),
            }

        return cached(path, key, build)

    def split_classes(self, total: int, background: int) -> dict[str, torch.Tensor]:
        """Character indices of train / val / test (see the module docstring)."""
        generator = torch.Generator().manual_seed(self.split_seed)
        if self.split == "finn":
            order = torch.randperm(total, generator=generator)
            n_train = round(total * FINN_COUNTS[0] / sum(FINN_COUNTS))
            n_val = round(total * FINN_COUNTS[1] / sum(FINN_COUNTS))
            return {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
        order = torch.randperm(background, generator=generator)
        n_val = round(background * LAKE_VAL[0] / LAKE_VAL[1])
        return {"train": order[n_val:].sort().values, "val": order[:n_val].sort().values,
                "test": torch.arange(background, total)}

    def build_pools(self) -> dict[str, ClassPool]:
        data = self.load_all()
        everything = ClassPool(data["images"], data["counts"], list(data["names"]))
        splits = self.split_classes(len(everything.counts), int(data["background"]))
        return {split: everything.subset(classes) for split, classes in splits.items()}
