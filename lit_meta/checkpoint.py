"""All checkpoint I/O: the one atomic writer, and checking, reading and loading checkpoints.

Writing (:func:`atomic_torch_save`, also used for the data caches and, through
:func:`atomic_write`, for results.json): the bytes go to a
temporary file in the same directory, are fsync-ed, and ``os.replace`` swaps them in
(atomic on POSIX file systems), so a kill -9 (or a SLURM preemption) mid-write never
leaves a half-written file where the last complete one was. A write that fails (disk
full, a path that cannot be created) removes its temporary file and raises
:class:`WriteError`, one line naming the path. The temporary file of a process killed
mid-write (``.<name>.<pid>.<hex>.tmp``) is removed by the next write into that folder, or
at the start of the next fit (:func:`remove_orphans`), once its process is gone.
:class:`AtomicCheckpointIO` is the Trainer's checkpoint writer (``lit_meta.cli`` installs
it, :func:`use_atomic_checkpoints`).

Reading: :func:`check_checkpoint` fails with one line naming a missing or damaged file
(saying when it is truncated, and naming the newest intact checkpoint beside it), and
:func:`read_checkpoint` with one line saying what a file that is no Lightning checkpoint
holds instead (a plain ``state_dict``, another dict, a tensor);
:func:`read_hparams` / :func:`check_task_spec` read what a checkpoint was trained with
(the LightningCLI hparams, among them the data's ``task_spec``); :func:`load_checkpoint`
rebuilds the saved model (its own class, from ``_class_path``). Classes that moved since
a checkpoint was written are found at their new place (:data:`MOVED_MODULES`). Options
added to a class after a checkpoint was written take their defaults for it
(:func:`signature_defaults`), which keep the behaviour the checkpoint was trained with.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import CheckpointIO, TorchCheckpointIO

# ckpt_path values that Lightning resolves itself (not files)
SPECIAL_PATHS = ("best", "last", "hpc", "registry")
# module of a saved ``_class_path`` -> where its classes live now
MOVED_MODULES = {"lit_meta.algorithms.l2l_lstm": "lit_meta.algorithms.learning_to_learn"}


# ---------------------------------------------------------------------------- writing
# the temporary file of atomic_write: .<name>.<pid>.<8 hex>.tmp
TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
_SWEPT: set[Path] = set()  # folders this process has cleared of orphans


class WriteError(ValueError):
    """A file could not be written (disk full, unwritable folder); what was there is unchanged."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, all or nothing."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """``write(handle)`` into a temporary file beside ``path``, fsync it, rename it to ``path``.

    Any failure removes the temporary file; an ``OSError`` (disk full, a folder that cannot
    be created) becomes a one-line :class:`WriteError` naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent.resolve() not in _SWEPT:
            remove_orphans(path.parent)
        with open(tmp, "xb") as handle:  # a new file of ours alone, with the umask's permissions
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        # torch.save's zip writer turns a failed write into a RuntimeError of its own: the
        # OSError (e.g. ENOSPC) or the KeyboardInterrupt is then in its context chain
        interrupt = first_in_chain(error, lambda e: not isinstance(e, Exception))
        if interrupt is not None and interrupt is not error:
            raise interrupt from None
        cause = first_in_chain(error, lambda e: isinstance(e, OSError))
        if cause is None:
            raise
        raise WriteError(f"cannot write {Path(os.path.abspath(path))}: {describe_os_error(cause, path)}"
                         f"{'; the previous file there is unchanged' if path.exists() else ''}") from error


def first_in_chain(error: BaseException, wanted: Callable[[BaseException], bool]) -> Any:
    """``error`` or the first exception of its cause/context chain that is ``wanted``, else None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if wanted(error):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def describe_os_error(error: OSError, path: str | os.PathLike | None = None) -> str:
    """``strerror`` of ``error``, with the file it names when that is not ``path`` itself."""
    what = error.strerror or str(error) or type(error).__name__
    if error.filename is not None and str(error.filename) != str(path):
        what += f" ({error.filename})"
    return what


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def remove_orphans(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that :func:`atomic_write` left in ``folder`` when its process
    was killed mid-write (its pid no longer runs on this machine); warn naming them."""
    folder = Path(folder)
    _SWEPT.add(folder.resolve())
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:  # absent or unreadable: nothing of ours there
        return removed
    for entry in entries:
        match = TEMPORARY.match(entry.name)
        if match and not _alive(int(match["pid"])) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        warnings.warn(f"removed {len(removed)} unfinished temporary file(s) of an interrupted write (a process "
                      f"killed mid-save) in {folder}: {', '.join(p.name for p in removed)}", stacklevel=2)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)


def use_atomic_checkpoints(trainer: pl.Trainer) -> CheckpointIO:
    """Make ``trainer`` write checkpoints with :class:`AtomicCheckpointIO` unless it was given a
    checkpoint writer of its own (a ``CheckpointIO`` other than Lightning's plain default)."""
    strategy = trainer.strategy
    current = strategy.checkpoint_io
    if type(current) is TorchCheckpointIO:  # Lightning's default, or one given explicitly: same writes
        strategy.checkpoint_io = current = AtomicCheckpointIO()
    return current


# ---------------------------------------------------------------------------- reading
def check_checkpoint(path: str | os.PathLike | None) -> None:
    """Fail with one line naming ``path`` if it is not a readable checkpoint; a damaged one (e.g.
    truncated by an interrupted copy) also names the newest intact checkpoint beside it."""
    if path is None or path in SPECIAL_PATHS:
        return
    if not Path(path).is_file():
        raise ValueError(f"checkpoint file not found: {path}")
    problem = checkpoint_damage(path)
    if problem is not None:
        raise ValueError(f"checkpoint file is {problem}: {path}{intact_neighbour_hint(path)}")


def checkpoint_damage(path: str | os.PathLike) -> str | None:
    """What is wrong with the file ``path`` as a (zip) torch checkpoint, or None when its archive is intact."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not zipfile.is_zipfile(path):
        if head == b"PK\x03\x04":  # a zip archive's first entry, and no end: cut short
            return (f"corrupt (truncated: {Path(path).stat().st_size} bytes, the end of its zip archive is "
                    "missing, as after an interrupted copy or write)")
        return "corrupt or not a torch checkpoint"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"corrupt ({error})"
    if bad is not None:
        return f"corrupt (damaged entry {bad})"
    return None


def intact_neighbour_hint(path: str | os.PathLike) -> str:
    """``"; the newest intact checkpoint beside it: <path>"`` (another ``*.ckpt`` of the same folder,
    newest first, whose archive is whole), or ``""`` when there is none."""
    path = Path(path)
    try:
        others = [p for p in path.parent.glob("*.ckpt") if p.is_file() and not p.name.startswith(".")
                  and not (p.resolve() == path.resolve())]
        others.sort(key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)
    except OSError:
        return ""
    for other in others:
        try:
            if checkpoint_damage(other) is None:
                return f"; the newest intact checkpoint beside it: {Path(os.path.abspath(other))}"
        except OSError:
            continue
    return ""


def current_class_path(class_path: str) -> str:
    """Where the class saved as ``class_path`` lives now."""
    module, _, name = class_path.rpartition(".")
    return f"{MOVED_MODULES.get(module, module)}.{name}"


def read_checkpoint(path: str | os.PathLike, weights_only: bool = True, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint dict in ``path`` (checked first; one-line errors), with its hparams'
    ``_class_path`` (if any) mapped to where the class lives now."""
    check_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets one line naming it
        raise ValueError(f"cannot read checkpoint {path}: {error}".splitlines()[0]) from None
    what = not_a_lightning_checkpoint(checkpoint)
    if what is not None:
        raise ValueError(f"checkpoint {path} holds {what}, not a checkpoint written by train.py fit (a Lightning "
                         "checkpoint with 'state_dict' and 'hyper_parameters'); to start from such weights, load "
                         "them into the model yourself (model.load_state_dict)")
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, dict) and isinstance(hparams.get("_class_path"), str):
        hparams["_class_path"] = current_class_path(hparams["_class_path"])
    return checkpoint


def not_a_lightning_checkpoint(checkpoint: Any) -> str | None:
    """What ``checkpoint`` (a loaded file) holds when it is not a Lightning checkpoint, else None."""
    if not isinstance(checkpoint, dict):
        return f"a {type(checkpoint).__name__}"
    if "state_dict" in checkpoint:
        return None
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        first = next(iter(checkpoint))
        return f"a plain state_dict ({len(checkpoint)} tensors: {first!r}, ...)"
    keys = sorted(map(str, checkpoint))
    return f"a dict without 'state_dict' (keys: {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})"


def read_hparams(path: str | os.PathLike) -> dict[str, Any]:
    """The constructor arguments saved in ``path`` (``_class_path`` mapped as in :func:`read_checkpoint`)."""
    # mmap: the tensors are not read, only the pickled hparams
    return dict(read_checkpoint(path, weights_only=False, mmap=True).get("hyper_parameters") or {})


def check_task_spec(path: str | os.PathLike, spec: dict[str, Any]) -> None:
    """A checkpoint meta-tests on any data whose tasks have its shapes (e.g. a Finn-split model
    on the Lake split); otherwise one line naming the file and the data option to change."""
    saved = read_hparams(path).get("task_spec") or {}
    hints = {"input_shape": "data.image_size / channels", "ways": "data.ways", "kind": "the dataset"}
    for key, hint in hints.items():
        if key in saved and key in spec and _as_list(saved[key]) != _as_list(spec[key]):
            raise ValueError(f"checkpoint {path} was trained with {key}={saved[key]!r} but the data gives "
                             f"{spec[key]!r}: set {hint} to match")


def check_same_class(path: str | os.PathLike, saved: str, configured: Any) -> None:
    """A checkpoint continues or tests the algorithm it was trained with: one line when the config
    names another model class (``configured``: the config's ``model`` entry, None when not given)."""
    expected = configured.get("class_path") if hasattr(configured, "get") else None
    if expected and _import_class(saved) is not _import_class(expected):
        raise ValueError(f"checkpoint {path} holds a {saved.rpartition('.')[2]} model ({saved}) but the config "
                         f"names {expected}: use that algorithm's config (or leave the model out)")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ---------------------------------------------------------------------------- loading
def _import_class(class_path: str) -> Any:
    module, _, name = current_class_path(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return class_path  # compared as a name


def saved_class(path: str | os.PathLike, hparams: dict[str, Any] | None = None) -> type:
    """The class whose arguments ``path`` holds (from ``_class_path``, moved classes found);
    one line saying why when there is none or it cannot be imported."""
    class_path = (read_hparams(path) if hparams is None else hparams).get("_class_path")
    try:
        if not isinstance(class_path, str):
            raise KeyError("_class_path")
        module, _, name = class_path.rpartition(".")
        return getattr(importlib.import_module(module), name)
    except Exception as error:  # noqa: BLE001 - a class that no longer exists, hparams without one
        raise ValueError(f"cannot load a lit_meta model from checkpoint {path}: {error!r}") from None


def signature_defaults(cls: type) -> dict[str, Any]:
    """Every constructor argument of ``cls`` and its bases (followed through ``**kwargs``)
    that has a default, with it. A checkpoint's hparams lack the options added after it was
    written; their defaults keep the old behaviour, so ``train.py test --config <config that
    sets a newer option> --ckpt_path <older checkpoint>`` fills them from here, not the config."""
    defaults: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters
        for name, parameter in parameters.items():
            if parameter.default is not inspect.Parameter.empty and name != "self":
                defaults.setdefault(name, parameter.default)  # the subclass's default wins
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            break  # a base's arguments are reachable only through **kwargs
    return defaults


def load_checkpoint(path: str | os.PathLike, device: str = "cpu",
                    expect: type[pl.LightningModule] = pl.LightningModule) -> pl.LightningModule:
    """The module saved in ``path``, in eval mode on ``device``: its own class (from the hparams
    LightningCLI saved, moved classes found), which must be a subclass of ``expect``."""
    hparams = read_hparams(path)
    cls = saved_class(path, hparams)
    if not (isinstance(cls, type) and issubclass(cls, expect)):
        raise ValueError(f"checkpoint {path} holds {hparams['_class_path']}, not a {expect.__name__}")
    # _class_path: Lightning would otherwise re-read the saved (possibly moved) one
    model = cls.load_from_checkpoint(path, map_location="cpu", _class_path=hparams["_class_path"])
    return model.to(device).eval()
