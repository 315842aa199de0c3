"""Miniature image datasets, written in the exact on-disk layouts the DataModules accept.

Every generator is deterministic, so two layouts built from the same arguments hold the
same images and must parse to the same tensors.
"""
from __future__ import annotations

import csv
import pickle
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

HALVES = ("images_background", "images_evaluation")


def omniglot_arrays(background: int = 40, evaluation: int = 24, drawers: int = 6, size: int = 21,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """``half -> bool [characters, drawers, size, size]`` (True = paper, as in the PNGs)."""
    rng = np.random.default_rng(seed)
    out = {}
    for half, n in zip(HALVES, (background, evaluation)):
        paper = rng.random((n, drawers, size, size)) > 0.3
        paper[..., 0, 0] = True  # corner stays paper: makes rotations tellable apart in the tests
        out[half] = paper
    return out


def _omniglot_files(arrays: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """(archive-relative path, bool image) in the official naming: ``<half>/<alphabet>/characterNN/XXXX_YY.png``.

    Characters are numbered in array order, but the numbers run across alphabets in a
    shuffled order (as in the real data), so path order is not number order.
    """
    files = []
    number = 0
    for half in HALVES:
        images = arrays[half]
        n = len(images)
        alphabets = 3 if half == HALVES[0] else 2
        slots = [(a, c) for a in range(alphabets) for c in range(-(-n // alphabets))][:n]
        order = np.random.default_rng(len(files) + 1).permutation(n)  # character i sits at slot order[i]
        for i in range(n):
            number += 1
            alphabet, character = slots[order[i]]
            for d in range(images.shape[1]):
                path = f"{half}/Alphabet_{alphabet:02d}/character{character + 1:02d}/{number:04d}_{d + 1:02d}.png"
                files.append((path, images[i, d]))
    return files


def _png_bytes(image: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_omniglot_folders(root: Path, arrays: dict[str, np.ndarray]) -> Path:
    for path, image in _omniglot_files(arrays):
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target)  # bool -> mode "1", as the official PNGs
    return root


def write_omniglot_zips(root: Path, arrays: dict[str, np.ndarray]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    files = _omniglot_files(arrays)
    for half in HALVES:
        with zipfile.ZipFile(root / f"{half}.zip", "w") as archive:
            for path, image in files:
                if path.startswith(half + "/"):
                    archive.writestr(path, _png_bytes(image))
    return root


def write_omniglot_npz(root: Path, arrays: dict[str, np.ndarray], dtype: str = "bool") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for half in HALVES:
        images = arrays[half] if dtype == "bool" else arrays[half].astype(np.uint8) * 255
        labels = np.repeat(np.arange(len(images))[:, None], images.shape[1], axis=1)
        np.savez_compressed(root / f"{half}.npz", images=images, labels=labels)
    return root


# ---------------------------------------------------------------------------- miniImageNet
def mini_arrays(classes: dict[str, int] | None = None, per_class: int = 7, size: int = 12,
                seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """``split -> {class name (a WordNet id): uint8 [per_class, size, size, 3]}``."""
    classes = classes or {"train": 8, "val": 6, "test": 6}
    rng = np.random.default_rng(seed)
    out, wnid = {}, 1000
    for split, n in classes.items():
        out[split] = {}
        for _ in range(n):
            wnid += 7
            out[split][f"n{wnid:08d}"] = rng.integers(0, 256, (per_class, size, size, 3), dtype=np.uint8)
    return out


def write_mini_pickles(root: Path, arrays: dict[str, dict[str, np.ndarray]]) -> Path:
    """``mini-imagenet-cache-<split>.pkl``; rows interleaved so class_dict order matters."""
    root.mkdir(parents=True, exist_ok=True)
    for split, classes in arrays.items():
        names = list(classes)
        per_class = len(next(iter(classes.values())))
        rows = [(n, i) for i in range(per_class) for n in reversed(names)]
        image_data = np.stack([classes[n][i] for n, i in rows])
        class_dict = {n: [r for r, (m, _) in enumerate(rows) if m == n] for n in names}
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as handle:
            pickle.dump({"image_data": image_data, "class_dict": class_dict}, handle)
    return root


def write_mini_csv(root: Path, arrays: dict[str, dict[str, np.ndarray]]) -> Path:
    """Ravi & Larochelle's ``<split>.csv`` (``filename,label``) plus ``images/`` (lossless PNG here)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, classes in arrays.items():
        with open(root / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filename", "label"])
            for name in reversed(list(classes)):
                for i, image in enumerate(classes[name]):
                    filename = f"{name}{i + 1:08d}.png"
                    Image.fromarray(image).save(root / "images" / filename)
                    writer.writerow([filename, name])
    return root


# ---------------------------------------------------------------------------- user folders
def coded_image(value: int, size: int, channels: int) -> np.ndarray:
    """A flat image whose gray level is ``value`` (0..255): tells class and item apart after sampling."""
    shape = (size, size) if channels == 1 else (size, size, 3)
    return np.full(shape, value, dtype=np.uint8)


def write_user_folder(root: Path, classes: dict[str, list[np.ndarray]], ext: str = ".png") -> Path:
    for name, images in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(root / name / f"img_{i:03d}{ext}")
    return root


def coded_classes(n_classes: int = 10, per_class: int = 6, size: int = 8, channels: int = 1) -> dict[str, list[np.ndarray]]:
    """Class ``k`` image ``i`` has gray level ``20*k + i + 1``."""
    return {f"class_{k:02d}": [coded_image(20 * k + i + 1, size, channels) for i in range(per_class)]
            for k in range(n_classes)}
