"""Images read straight out of tar archives, with one-line errors for truncated or damaged ones.

Three archives are read in place: ILSVRC-2012's per-synset train tars (``n01440764.tar``,
plain tar), ``CUB_200_2011.tgz`` and torchvision's ``cifar-100-python.tar.gz`` (gzip).

- A plain tar is listed once (``tarfile``) and each member is then read by seeking to
  its data offset (:class:`TarSlice`): no tarfile object is needed per image.
- A plain tar cut short is detected from the listing: a member whose data runs past
  the end of the file, or a last member not followed by the end-of-archive zero block.
- A compressed archive is listed once and read in one sequential pass
  (:func:`iter_members`); gzip itself reports a truncated stream.
"""
from __future__ import annotations

import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ARCHIVE_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)
_BLOCK = 512
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


@dataclass(frozen=True)
class TarSlice:
    """One member's bytes inside a plain (uncompressed) tar: ``path[offset : offset + size]``."""

    path: Path
    member: str
    offset: int
    size: int

    @property
    def name(self) -> str:
        return f"{self.path}:{self.member}"

    def read(self) -> bytes:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read(self.size)
        except OSError as error:
            raise ValueError(f"cannot read archive {self.path}: {error}") from None
        if len(data) != self.size:
            raise ValueError(f"truncated archive {self.path}: member {self.member} is cut short")
        return data


def _reason(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"{text} (truncated or damaged?)"


def is_compressed(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(6)
    return any(head.startswith(magic) for magic in _COMPRESSED_MAGIC)


def list_members(path: Path) -> list[tarfile.TarInfo]:
    """The regular-file members of the tar (plain or compressed) at ``path``; a one-line
    ValueError naming it if it cannot be read or is cut short."""
    try:
        compressed = is_compressed(path)
        with tarfile.open(path, "r:*") as archive:
            members = archive.getmembers()
    except ARCHIVE_ERRORS as error:
        raise ValueError(f"cannot read archive {path}: {_reason(error)}") from None
    files = [m for m in members if m.isfile()]
    if not compressed and members:
        size = path.stat().st_size
        for member in files:
            if member.offset_data + member.size > size:
                raise ValueError(f"truncated archive {path}: member {member.name} runs past the end of the file")
        # tarfile stops quietly at the end of the data; a complete tar has a zero block there.
        last = max(members, key=lambda m: m.offset_data)
        end = last.offset_data + -(-last.size // _BLOCK) * _BLOCK
        with open(path, "rb") as handle:
            handle.seek(end)
            trailer = handle.read(_BLOCK)
        if len(trailer) < _BLOCK or trailer.strip(b"\0"):
            raise ValueError(f"truncated archive {path}: it ends after member {last.name} without the tar end marker")
    return files


def slices(path: Path, members: list[tarfile.TarInfo]) -> list[TarSlice]:
    """Seekable handles on the members of a plain tar (see :func:`list_members`)."""
    return [TarSlice(path, m.name, m.offset_data, m.size) for m in members]


def iter_members(path: Path, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
    """``(member name, bytes)`` of the ``wanted`` members, in archive order, in one sequential pass."""
    try:
        with tarfile.open(path, "r|*") as archive:
            for member in archive:
                if member.isfile() and member.name in wanted:
                    handle = archive.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    if len(data) != member.size:
                        raise EOFError(f"member {member.name} is cut short")
                    yield member.name, data
    except ARCHIVE_ERRORS as error:
        raise ValueError(f"cannot read archive {path}: {_reason(error)}") from None
