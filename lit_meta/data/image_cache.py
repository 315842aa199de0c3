"""Turning an original image source into a uint8 cache, one image at a time.

Full-size sources (ImageNet, CUB) never sit in memory together: each image is decoded,
preprocessed (:func:`lit_meta.data.preprocessing.preprocess`, the pipeline ``task_spec``
records) and written to its slot.

- An unreadable image stops the build with a one-line error naming it
  (``on_bad_image: stop``, the default) or is left out with a warning naming it
  (``skip``); never silently.
- A progress bar (tqdm on a terminal; a plain line every 30 s otherwise, e.g. in a
  SLURM log) for builds of more than :data:`QUIET_BELOW` images.
- :func:`build_array_resumably` writes a raw uint8 array file for sources too big for
  memory (tieredImageNet, ~780k images, 16.5 GB at 84x84): in chunks, resumable after
  an interruption, and only renamed to its final name when complete. It is read back
  memory-mapped (:func:`open_array`).
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from lit_meta.checkpoint import atomic_write
from lit_meta.data.archives import TarSlice
from lit_meta.data.decoding import decode_image
from lit_meta.data.preprocessing import preprocess

ON_BAD_IMAGE = ("stop", "skip")
QUIET_BELOW = 2000  # images: smaller builds take seconds and show no progress
CHUNK_IMAGES = 512  # images between two saved resume points of a resumable build
Source = Path | bytes | TarSlice


def check_on_bad_image(value: str) -> None:
    if value not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, got {value!r}")


def serves_run(data: dict[str, Any], on_bad_image: str) -> bool:
    """Whether a cache that records its ``skipped`` images serves a run with ``on_bad_image``: one
    that skipped any serves only ``skip`` runs, so an ``error`` run rebuilds and meets the bad file."""
    return on_bad_image == "skip" or not data["skipped"]


class Progress:
    """tqdm on a terminal; elsewhere a line every ``every_s`` seconds and one at the end."""

    def __init__(self, total: int, desc: str, initial: int = 0, every_s: float = 30.0) -> None:
        self.total, self.desc, self.done, self.every_s = total, desc, initial, every_s
        self.start_done, self.start = initial, time.perf_counter()
        self.last = self.start
        self.quiet = total < QUIET_BELOW
        self.bar = None
        if not self.quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="img", smoothing=0.05)
        elif not self.quiet:
            self._line("started" if initial == 0 else "resumed")

    def _line(self, state: str) -> None:
        elapsed = time.perf_counter() - self.start
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        left = f", about {(self.total - self.done) / rate / 60:.0f} min left" if rate > 0 and state == "building" else ""
        print(f"{self.desc}: {state}, {self.done}/{self.total} images ({100 * self.done / max(self.total, 1):.1f}%)"
              f"{f', {rate:.0f} img/s' if rate > 0 else ''}{left}", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.quiet and time.perf_counter() - self.last >= self.every_s:
            self.last = time.perf_counter()
            self._line("building")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif not self.quiet:
            self._line("done" if self.done >= self.total else "stopped")


def load_image(source: Source, name: str, channels: int, image_size: int, resize: str,
               resize_size: int | None) -> Tensor:
    """One image file, archive member or byte string -> uint8 ``[C, image_size, image_size]``."""
    data = source.read() if isinstance(source, TarSlice) else source
    array = decode_image(data, channels, name=name)  # a read-only view of PIL's buffer: copied
    return preprocess(torch.tensor(array)[None], image_size, resize=resize, resize_size=resize_size)[0]


def bad_image(error: ValueError, on_bad_image: str) -> None:
    """Raise ``error`` (``stop``) or warn with it (``skip``)."""
    if on_bad_image == "stop":
        raise ValueError(f"{error}; pass --data.on_bad_image skip to leave unreadable images out") from None
    warnings.warn(f"skipped unreadable image: {error}", stacklevel=3)


def decode_batch(entries: Iterable[tuple[str, Source]], options: dict[str, Any]) -> list[np.ndarray | str]:
    """Each entry preprocessed (uint8 ``[C, S, S]``), or the one-line error of an unreadable image.
    Module-level, so build workers can run it; an archive error is raised (the source is damaged)."""
    out: list[np.ndarray | str] = []
    for name, source in entries:
        try:
            out.append(load_image(source, name, **options).numpy())
        except ValueError as error:
            if not str(error).startswith("cannot read image"):
                raise
            out.append(str(error))
    return out


def decode_into(out: Tensor, entries: Iterable[tuple[int, str, Source]], options: dict[str, Any],
                on_bad_image: str, progress: Progress) -> list[int]:
    """Fill ``out[slot]`` for each ``(slot, name, source)``; the slots of skipped images are returned."""
    skipped = []
    for slot, name, source in entries:
        (result,) = decode_batch([(name, source)], options)
        if isinstance(result, str):
            bad_image(ValueError(result), on_bad_image)
            skipped.append(slot)
        else:
            out[slot] = torch.from_numpy(result)
        progress.update()
    return skipped


def decode_all(items: Sequence[tuple[str, Source]], classes: Sequence[int], num_classes: int,
               options: dict[str, Any], on_bad_image: str, desc: str) -> tuple[Tensor, Tensor, list[str]]:
    """``(name, source)`` items with their class indices -> (uint8 images, counts per class, skipped names)."""
    channels, size = options["channels"], options["image_size"]
    out = torch.empty(len(items), channels, size, size, dtype=torch.uint8)
    progress = Progress(len(items), desc)
    try:
        skipped = decode_into(out, ((i, n, s) for i, (n, s) in enumerate(items)), options, on_bad_image, progress)
    finally:
        progress.close()
    return compact(out, classes, num_classes, skipped) + ([items[i][0] for i in skipped],)


def compact(out: Tensor, classes: Sequence[int], num_classes: int, skipped: list[int]) -> tuple[Tensor, Tensor]:
    """Drop the skipped slots; counts per class of what is left."""
    keep = torch.ones(len(classes), dtype=torch.bool)
    keep[skipped] = False
    labels = torch.as_tensor(classes, dtype=torch.long)[keep]
    return (out[keep] if skipped else out), torch.bincount(labels, minlength=num_classes)


# ---------------------------------------------------------------------------- resumable array files
def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stamp_digest(stamps: Iterable[Any]) -> Any:
    """A running hash of source stamps: extended image by image, so a resume point costs nothing extra."""
    digest = hashlib.sha256()
    for stamp in stamps:
        digest.update(repr(stamp).encode())
    return digest


def _init_worker() -> None:
    torch.set_num_threads(1)  # one image at a time per process: threads would only contend


def _resume_state(partial: Path, state_file: Path, key: str, stamps: Sequence[Any]) -> dict[str, Any] | None:
    """The saved progress of an interrupted build, if it is for the same ``key`` and sources before its ``next``."""
    if not (partial.is_file() and state_file.is_file()):
        return None
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return None
    if state.get("key") != key or not 0 <= state.get("next", -1) <= len(stamps):
        return None
    return state if state.get("prefix") == stamp_digest(stamps[:state["next"]]).hexdigest() else None


def build_array_resumably(path: Path, key: str, entries: Sequence[tuple[str, Source]], stamps: Sequence[Any],
                          options: dict[str, Any], on_bad_image: str, desc: str, workers: int = 0) -> list[int]:
    """Write the preprocessed ``entries`` as raw uint8 ``[n, C, S, S]`` to ``path``; return the skipped indices.

    The array grows in ``path.partial``; after every :data:`CHUNK_IMAGES` images it is
    flushed to disk, then ``path.progress.json`` records how far it got (``next``), what
    was written and skipped, and a digest of the ``stamps`` (one per entry: name, size,
    modification time) before ``next``. A later call resumes there if ``key`` (options
    and split) is the same and those sources are unchanged (so fixing an unreadable image
    further on keeps the work done); otherwise it starts over. Complete, the file is cut
    to its length, fsync-ed and renamed to ``path``: ``path`` is never a partial array.
    ``workers`` > 0 decodes each chunk in that many processes (the order is kept).
    """
    shape = (options["channels"], options["image_size"], options["image_size"])
    item_bytes = int(np.prod(shape))
    need = len(entries) * item_bytes
    partial = path.with_name(path.name + ".partial")
    state_file = path.with_name(path.name + ".progress.json")
    state = _resume_state(partial, state_file, key, stamps)
    if state is None:
        free = shutil.disk_usage(path.parent).free + (partial.stat().st_size if partial.exists() else 0)
        if free < need:
            raise ValueError(f"not enough disk space for the cache {path}: it needs {need / 1e9:.1f} GB, "
                             f"{free / 1e9:.1f} GB are free (set --data.cache_dir elsewhere)")
        with open(partial, "wb") as handle:
            handle.truncate(need)  # sparse: blocks are allocated as images are written
        state = {"key": key, "next": 0, "written": 0, "skipped": [], "prefix": stamp_digest([]).hexdigest()}
    elif partial.stat().st_size != need:  # sources after the resume point were added or removed
        with open(partial, "r+b") as handle:
            handle.truncate(need)
    digest = stamp_digest(stamps[:state["next"]])
    array = np.memmap(partial, dtype=np.uint8, mode="r+", shape=(len(entries), *shape))
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker) if workers > 0 else None
    progress = Progress(len(entries), desc, initial=state["next"])
    try:
        for start in range(state["next"], len(entries), CHUNK_IMAGES):
            stop = min(start + CHUNK_IMAGES, len(entries))
            if pool is None:
                results = decode_batch(entries[start:stop], options)
            else:
                step = -(-(stop - start) // workers)
                parts = [(entries[i:min(i + step, stop)], options) for i in range(start, stop, step)]
                results = [r for part in pool.starmap(decode_batch, parts) for r in part]
            for index, result in zip(range(start, stop), results):
                digest.update(repr(stamps[index]).encode())
                if isinstance(result, str):
                    bad_image(ValueError(result), on_bad_image)
                    state["skipped"].append(index)
                else:
                    array[state["written"]] = result
                    state["written"] += 1
            progress.update(stop - start)
            array.flush()  # the images reach the disk before the record that says they are there
            state["next"], state["prefix"] = stop, digest.hexdigest()
            atomic_write(state_file, lambda handle: handle.write(json.dumps(state).encode()))
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
        del array
    with open(partial, "r+b") as handle:
        handle.truncate(state["written"] * item_bytes)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    _fsync_dir(path.parent)
    state_file.unlink(missing_ok=True)
    return list(state["skipped"])


def open_array(path: Path, count: int, shape: Sequence[int]) -> Tensor | None:
    """The array file at ``path`` as a memory-mapped uint8 tensor ``[count, *shape]`` (None if its size differs).

    Copy-on-write: nothing written to the tensor reaches the file, and only the pages
    that are read (the images an episode gathers) are loaded.
    """
    expected = count * int(np.prod(shape))
    if not path.is_file() or path.stat().st_size != expected or expected == 0:
        return None
    return torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", shape=(count, *shape)))
