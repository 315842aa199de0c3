"""Miniature original sources, in the exact on-disk formats lit_meta reads them from.

- CIFAR-100 python version (``cifar-100-python/{train,test,meta}``, latin1-readable
  pickles with the real 100 fine and 20 coarse names and the real fine -> coarse map,
  taken from the shipped FC100 split), or its ``.tar.gz``;
- CUB-200-2011 (``CUB_200_2011/images/<NNN.Class>/<Class>_<k>_<id>.jpg`` with the real
  200 class folder names), or its ``.tgz``;
- an ILSVRC-2012 train folder (``<synset>/<synset>_<n>.JPEG``, real JPEGs whose numbers
  ``n`` are sparse, of different digit counts and written in shuffled order, so that
  numerical and lexicographic order differ), or its per-synset tars.

Fewer images per class than the real ones; every generator is deterministic.
"""
from __future__ import annotations

import csv
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from lit_meta.data.splits import SPLITS, read_class_list, read_fc100, read_ravi, read_tiered, split_files


# ---------------------------------------------------------------------------- CIFAR-100
def cifar_names() -> tuple[list[str], list[str], list[int]]:
    """The real fine names (by fine id), coarse names (by coarse id) and fine -> coarse ids, from the FC100 split."""
    fine, coarse, coarse_of_fine = [""] * 100, [""] * 20, [-1] * 100
    for path in split_files("fc100").values():
        for coarse_id, coarse_name, fine_id, fine_name in read_fc100(path):
            fine[fine_id], coarse[coarse_id], coarse_of_fine[fine_id] = fine_name, coarse_name, coarse_id
    assert "" not in fine and "" not in coarse and fine == sorted(fine)
    return fine, coarse, coarse_of_fine


def cifar_image(fine: int, index: int, part: int) -> np.ndarray:
    """A 32x32 RGB image whose first pixels say (fine class, index, train=0/test=1); the rest is noise."""
    rng = np.random.default_rng(1000 * fine + 10 * index + part)
    image = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
    image[:, 0, 0] = (fine, index, part)
    return image


def write_cifar100(root: Path, train: int = 3, test: int = 1, archive: bool = False, skip: tuple[str, ...] = ()) -> Path:
    """``root/cifar-100-python/{train,test,meta}`` (or ``root/cifar-100-python.tar.gz``) with ``train`` and
    ``test`` images of each fine class (none for the names in ``skip``), in a shuffled order as in the real files."""
    fine_names, coarse_names, coarse_of_fine = cifar_names()
    files = {}
    for part, (name, per_class) in enumerate((("train", train), ("test", test))):
        rows = [(f, i) for f in range(100) if fine_names[f] not in skip for i in range(per_class)]
        order = np.random.default_rng(part).permutation(len(rows))
        rows = [rows[i] for i in order]
        data = np.stack([cifar_image(f, i, part).reshape(-1) for f, i in rows]) if rows else \
            np.zeros((0, 3072), dtype=np.uint8)
        files[name] = {"batch_label": f"{name} batch", "filenames": [f"img_{f}_{i}.png" for f, i in rows],
                       "fine_labels": [f for f, _ in rows], "coarse_labels": [coarse_of_fine[f] for f, _ in rows],
                       "data": data}
    files["meta"] = {"fine_label_names": fine_names, "coarse_label_names": coarse_names}
    blobs = {name: pickle.dumps(value, protocol=2) for name, value in files.items()}
    root.mkdir(parents=True, exist_ok=True)
    if archive:
        with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
            for name, blob in blobs.items():
                _add_bytes(tar, f"cifar-100-python/{name}", blob)
    else:
        (root / "cifar-100-python").mkdir(exist_ok=True)
        for name, blob in blobs.items():
            (root / "cifar-100-python" / name).write_bytes(blob)
    return root


def _add_bytes(tar: tarfile.TarFile, name: str, blob: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(blob), 1_300_000_000
    tar.addfile(info, io.BytesIO(blob))


def jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# ---------------------------------------------------------------------------- CUB-200-2011
def cub_classes() -> list[str]:
    names = sorted(n for path in split_files("cub").values() for n in read_class_list(path))
    assert len(names) == 200
    return names


def write_cub(root: Path, per_class: int = 2, size: tuple[int, int] = (14, 11), archive: bool = False,
              skip: tuple[str, ...] = ()) -> Path:
    """``root/CUB_200_2011/images/<class>/<Name>_<k>_<id>.jpg`` (or ``root/CUB_200_2011.tgz``), non-square
    noise JPEGs, plus the top-level ``classes.txt`` and ``images.txt`` of the real archive."""
    files: dict[str, bytes] = {}
    image_id, lines = 0, []
    for c, folder in enumerate(cub_classes()):
        if folder in skip:
            continue
        for k in range(per_class):
            image_id += 1
            rng = np.random.default_rng(10 * c + k)
            name = f"{folder.split('.', 1)[1]}_{k + 1:04d}_{790000 + image_id}.jpg"
            files[f"CUB_200_2011/images/{folder}/{name}"] = jpeg_bytes(
                rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
            lines.append(f"{image_id} {folder}/{name}")
    files["CUB_200_2011/classes.txt"] = "".join(f"{i + 1} {n}\n" for i, n in enumerate(cub_classes())).encode()
    files["CUB_200_2011/images.txt"] = ("\n".join(lines) + "\n").encode()
    root.mkdir(parents=True, exist_ok=True)
    if archive:
        with tarfile.open(root / "CUB_200_2011.tgz", "w:gz") as tar:
            _add_bytes(tar, "attributes.txt", b"1 has_bill_shape::curved_(up_or_down)\n")
            names = sorted(files)
            for i in np.random.default_rng(0).permutation(len(names)):  # no archive promises sorted order
                _add_bytes(tar, names[i], files[names[i]])
    else:
        for name, blob in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(blob)
    return root


# ---------------------------------------------------------------------------- ILSVRC-2012 train
def synset_numbers(wnid: str, count: int) -> list[int]:
    """Sparse file numbers of 1 to 4 digits (so lexicographic != numerical order), in shuffled order."""
    rng = np.random.default_rng(int(wnid[1:]))
    pool = np.concatenate([rng.choice(np.arange(1, 10), 2, replace=False),
                           rng.choice(np.arange(10, 100), 4, replace=False),
                           rng.choice(np.arange(100, 1000), 6, replace=False),
                           rng.choice(np.arange(1000, 20000), max(count, 8), replace=False)])
    return [int(n) for n in rng.permutation(pool)[:count]]


def imagenet_image(wnid: str, number: int, size: tuple[int, int] = (10, 8)) -> np.ndarray:
    rng = np.random.default_rng(int(wnid[1:]) * 100003 + number)
    return rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def write_imagenet(root: Path, synsets: dict[str, int], tars: bool = False) -> Path:
    """``root/<synset>/<synset>_<n>.JPEG`` (or ``root/<synset>.tar``) with ``synsets[wnid]`` images each."""
    root.mkdir(parents=True, exist_ok=True)
    for wnid, count in synsets.items():
        members = {f"{wnid}_{n}.JPEG": jpeg_bytes(imagenet_image(wnid, n)) for n in synset_numbers(wnid, count)}
        if tars:
            with tarfile.open(root / f"{wnid}.tar", "w") as tar:
                for name, blob in members.items():
                    _add_bytes(tar, name, blob)
        else:
            (root / wnid).mkdir(exist_ok=True)
            for name, blob in members.items():
                (root / wnid / name).write_bytes(blob)
    return root


def write_reduced_ravi(folder: Path, per_class: int = 3) -> Path:
    """Ravi's CSVs cut to the first ``per_class`` rows of each class (the positions stay the real ones)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, path in split_files("miniimagenet").items():
        with open(folder / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filename", "label"])
            for wnid, positions in read_ravi(path).items():
                for position in positions[:per_class]:
                    writer.writerow([f"{wnid}{position:08d}.jpg", wnid])
    return folder


def mini_synsets(ravi: Path) -> dict[str, int]:
    """Images per synset an ImageNet miniature needs for the (reduced) CSVs in ``ravi``: the largest position, plus 2."""
    need: dict[str, int] = {}
    for split in SPLITS:
        for wnid, positions in read_ravi(ravi / f"{split}.csv").items():
            need[wnid] = max(positions) + 2
    return need


def tiered_synsets(per_class: int = 3) -> dict[str, int]:
    return {w: per_class for path in split_files("tieredimagenet").values() for w, _ in read_tiered(path)}


def write_imagenet_miniature(root: Path, per_class: int = 3, mini_per_class: int = 3, tars: bool = False) -> dict[str, Path]:
    """One ImageNet train folder for both benchmarks (the 608 tieredImageNet synsets with ``per_class`` images,
    the 100 miniImageNet ones with enough for the reduced CSVs), and those CSVs."""
    ravi = write_reduced_ravi(root / "ravi", mini_per_class)
    synsets = {**tiered_synsets(per_class), **mini_synsets(ravi)}
    return {"imagenet": write_imagenet(root / "train", synsets, tars=tars), "ravi": ravi}


def write_all_sources(base: Path) -> dict[str, Path]:
    """Every miniature source, folder and archive forms: what the tests' ``sources`` fixtures hold."""
    inet = write_imagenet_miniature(base / "inet")
    return {"cifar": write_cifar100(base / "cifar"), "cifar_tgz": write_cifar100(base / "cifar_tgz", archive=True),
            "cub": write_cub(base / "cub"), "cub_tgz": write_cub(base / "cub_tgz", archive=True),
            "imagenet": inet["imagenet"], "ravi": inet["ravi"],
            "imagenet_tars": write_imagenet_miniature(base / "inet_tars", tars=True)["imagenet"]}
