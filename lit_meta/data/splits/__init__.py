"""The published class splits, shipped as package data (provenance: README.md beside this file).

=================  ==============================  ==============================================
dataset            files                           one line
=================  ==============================  ==============================================
``miniimagenet``   ``ravi/{train,val,test}.csv``   header ``filename,label``; ``<synset><8 digits>.jpg,<synset>``
``tieredimagenet`` ``{train,val,test}.csv``        ``<synset>,<category synset>`` (no header)
``cifar_fs``       ``{train,val,test}.txt``        a CIFAR-100 fine class name
``fc100``          ``{train,val,test}.txt``        ``<coarse id> <coarse name> <fine id> <fine name>``
``cub``            ``{train,val,test}.txt``        a ``CUB_200_2011/images`` class folder name
=================  ==============================  ==============================================

Every DataModule takes ``split_dir``: a folder of files in the same format to use
instead (another split, or a reduced one). The readers here give one-line errors
naming the file and line.
"""
from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path
from typing import Callable, TypeVar

from lit_meta.data.base import SPLITS  # the episode splits every DataModule serves

HERE = Path(__file__).resolve().parent
SHIPPED = {"miniimagenet": HERE / "miniimagenet" / "ravi", "tieredimagenet": HERE / "tieredimagenet",
           "cifar_fs": HERE / "cifar_fs", "fc100": HERE / "fc100", "cub": HERE / "cub"}
SUFFIX = {"miniimagenet": ".csv", "tieredimagenet": ".csv", "cifar_fs": ".txt", "fc100": ".txt", "cub": ".txt"}
_RAVI_FILE = re.compile(r"^(n\d{8})(\d{8})\.jpg$")
_SYNSET = re.compile(r"^n\d{8}$")


Row = TypeVar("Row")


def split_files(dataset: str, split_dir: str | Path | None = None) -> dict[str, Path]:
    """``split -> file`` of ``dataset``: the shipped split, or the files in ``split_dir``."""
    if dataset not in SHIPPED:
        raise ValueError(f"no shipped split for dataset {dataset!r}; known: {', '.join(SHIPPED)}")
    folder = SHIPPED[dataset] if split_dir is None else Path(split_dir).expanduser()
    files = {s: folder / f"{s}{SUFFIX[dataset]}" for s in SPLITS}
    if split_dir is not None:
        if not folder.is_dir():
            raise ValueError(f"split_dir not found: {folder}")
        missing = [f.name for f in files.values() if not f.is_file()]
        if missing:
            raise ValueError(f"split_dir {folder} has no {', '.join(missing)} (expected "
                             f"{'/'.join(SPLITS)}{SUFFIX[dataset]} in the format of {SHIPPED[dataset]})")
    return files


def split_digest(files: dict[str, Path]) -> str:
    """Content hash of the split files: part of every cache key that depends on the split."""
    digest = hashlib.sha256()
    for split in SPLITS:
        digest.update(split.encode() + b"\0" + files[split].read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read split file {path}: {error}") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _no_duplicates(path: Path, names: list[str], lines: list[int]) -> None:
    seen: dict[str, int] = {}
    for name, line in zip(names, lines):
        if name in seen:
            raise ValueError(f"{path}:{line}: class {name!r} is listed twice (first on line {seen[name]})")
        seen[name] = line


def check_disjoint(names: dict[str, list[str]], files: dict[str, Path], label: Callable[[str], str]) -> None:
    """One line naming the first class (``label(name)``) that two splits' files both list."""
    seen: dict[str, str] = {}
    for split in SPLITS:
        for name in names[split]:
            if name in seen:
                raise ValueError(f"split files: {label(name)} is in both {seen[name]} and {split} ({files[split]})")
            seen[name] = split


def _read_rows(path: Path, parse: Callable[[int, str], Row], name: Callable[[Row], str]) -> list[Row]:
    """``parse(line number, text)`` of each line of a split file; one line naming the file if it lists
    nothing, or naming the line of a class (``name(row)``) listed twice."""
    lines = _lines(path)
    rows = [parse(line, text) for line, text in lines]
    if not rows:
        raise ValueError(f"split file {path} lists no classes")
    _no_duplicates(path, [name(r) for r in rows], [n for n, _ in lines])
    return rows


def read_class_list(path: Path) -> list[str]:
    """One class name per line (CIFAR-FS, CUB)."""
    return _read_rows(path, lambda line, text: text, lambda name: name)


def _fc100_row(path: Path, line: int, text: str) -> tuple[int, str, int, str]:
    parts = text.split()
    if len(parts) != 4 or not parts[0].isdigit() or not parts[2].isdigit():
        raise ValueError(f"{path}:{line}: expected '<coarse id> <coarse name> <fine id> <fine name>', got {text!r}")
    return int(parts[0]), parts[1], int(parts[2]), parts[3]


def read_fc100(path: Path) -> list[tuple[int, str, int, str]]:
    """``(coarse id, coarse name, fine id, fine name)`` per line."""
    return _read_rows(path, lambda line, text: _fc100_row(path, line, text), lambda row: row[3])


def _tiered_row(path: Path, line: int, text: str) -> tuple[str, str]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(_SYNSET.match(p) for p in parts):
        raise ValueError(f"{path}:{line}: expected '<synset>,<category synset>' (e.g. n01530575,n01524359), "
                         f"got {text!r}")
    return parts[0], parts[1]


def read_tiered(path: Path) -> list[tuple[str, str]]:
    """``(synset, category synset)`` per line."""
    return _read_rows(path, lambda line, text: _tiered_row(path, line, text), lambda row: row[0])


def read_filename_label(path: Path) -> list[tuple[int, str, str]]:
    """``(line number, filename, label)`` of each row of a ``filename,label`` CSV (Ravi & Larochelle's format)."""
    rows = []
    try:
        with open(path, newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:2]] != ["filename", "label"]:
                raise ValueError(f"{path}: the first row must be 'filename,label', got {header}")
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) < 2:
                    raise ValueError(f"{path}:{line}: expected 'filename,label', got {row}")
                rows.append((line, row[0].strip(), row[1].strip()))
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    return rows


def read_ravi(path: Path) -> dict[str, list[int]]:
    """Ravi & Larochelle's CSV: ``synset -> 1-based positions`` (the filename's 8 digits), in row order."""
    classes: dict[str, list[int]] = {}
    for line, filename, label in read_filename_label(path):
        match = _RAVI_FILE.match(filename)
        if match is None or match.group(1) != label or int(match.group(2)) < 1:
            raise ValueError(f"{path}:{line}: expected '<synset><8-digit position >= 1>.jpg,<synset>', "
                             f"got '{filename},{label}'")
        classes.setdefault(label, []).append(int(match.group(2)))
    if not classes:
        raise ValueError(f"split file {path} lists no images")
    return classes
