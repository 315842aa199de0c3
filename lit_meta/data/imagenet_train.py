"""Reading an ILSVRC-2012 train folder (``--data.imagenet_root``), shared by the benchmarks built from it.

Source: the ILSVRC-2012 train folder; for each synset either the folder
``<synset>/<synset>_<n>.JPEG`` (as ``ILSVRC2012_img_train.tar`` unpacks) or the
per-synset tar ``<synset>.tar`` it ships inside (read in place, one seek per image).
A synset's images are its files named ``<synset>_<n>.<JPEG|jpg|png>``, in **numerical**
order of ``<n>`` (:class:`ImageNetTrain`, :func:`numeric_order`), each with a stamp (name,
size, modification time, or its tar's) for the cache key. Two benchmarks read it:
miniImageNet (:mod:`lit_meta.data.miniimagenet`, Vinyals et al. 2016) and tieredImageNet
(:mod:`lit_meta.data.tieredimagenet`, Ren et al. 2018).

Resize: images are squashed to ``image_size`` square (aspect ratio not kept), as every
codebase does; their interpolation differs: cv2 INTER_AREA (mini-imagenet-tools), PIL
LANCZOS (cbfinn/maml), cv2 bilinear without antialiasing (the widely used pickles of
few-shot-ssl-public), cv2 INTER_CUBIC (Ren's tieredImageNet). lit_meta's default is
``bilinear-antialias`` (PIL bilinear within one gray level), the pipeline of all its
datasets; ``interpolation`` picks ``area`` (~INTER_AREA), ``bilinear`` (~cv2 bilinear),
``bicubic`` (~INTER_CUBIC) or ``bicubic-antialias`` instead.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_meta.data.archives import list_members, slices
from lit_meta.data.cache import file_stamp
from lit_meta.data.image_cache import Source

_FILE = re.compile(r"^(n\d{8})_(\d+)\.(jpe?g|png)$", re.IGNORECASE)
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
