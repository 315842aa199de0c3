"""Faults injected into lit_meta's file writes (``lit_meta.checkpoint.atomic_write``): the
real writer (``torch.save`` streaming into the temporary file) meets a full disk or an
interrupt part-way through."""
from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path
from typing import Any

import pytest

import lit_meta.checkpoint as checkpoint_module


class WrappedFile:
    """An open file whose ``write`` a subclass replaces; everything else, and the ``with``
    block, is the file's own."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def __enter__(self) -> "WrappedFile":
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self.handle.__exit__(*exc)


class FailsAfter(WrappedFile):
    """A file whose writes raise ``error`` once more than ``room`` bytes were asked for (the
    bytes that fit are written first, as on a disk that fills up)."""

    def __init__(self, handle: Any, room: int, error: BaseException) -> None:
        super().__init__(handle)
        self.room, self.error, self.written = room, error, 0

    def write(self, data: Any) -> int:
        data = bytes(data)
        if self.written + len(data) > self.room:
            self.handle.write(data[: self.room - self.written])
            self.written = self.room
            raise self.error
        self.written += len(data)
        return self.handle.write(data)


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_atomic_writes(monkeypatch: pytest.MonkeyPatch, good_writes: int = 0, only: str | None = None,
                       room: int = 1000, error: BaseException | None = None) -> list[str]:
    """Every ``atomic_write`` after the first ``good_writes`` (of files named ``only``, if
    given) fails after ``room`` bytes with ``error`` (default: a full disk). Returns the
    names of the files written, in order."""
    names: list[str] = []

    def opener(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = builtins.open(path, mode, *args, **kwargs)
        target = checkpoint_module.TEMPORARY.match(Path(path).name)
        if "x" in mode and target and (only is None or target["name"] == only):
            names.append(target["name"])
            if len(names) > good_writes:
                return FailsAfter(handle, room, error if error is not None else disk_full())
        return handle

    monkeypatch.setattr(checkpoint_module, "open", opener, raising=False)
    return names
