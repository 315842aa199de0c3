"""All checkpoint I/O: the one atomic writer, and checking, reading and loading checkpoints.

Writing (:func:`atomic_torch_save`, also used for the data caches and, through
:func:`atomic_write`, for results.json): the bytes go to a
temporary file in the same directory, are fsync-ed, and ``os.replace`` swaps them in
(atomic on POSIX file systems), so a kill -9 (or a SLURM preemption) mid-write never
leaves a half-written file where the last complete one was.

Reading: :func:`check_checkpoint` fails with one line naming a missing or damaged file;
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
import uuid
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

# ckpt_path values that Lightning resolves itself (not files)
SPECIAL_PATHS = ("best", "last", "hpc", "registry")
# module of a saved ``_class_path`` -> where its classes live now
MOVED_MODULES = {"lit_meta.algorithms.l2l_lstm": "lit_meta.algorithms.learning_to_learn"}


# ---------------------------------------------------------------------------- writing
def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, all or nothing."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """``write(handle)`` into a temporary file beside ``path``, fsync it, rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as handle:  # a new file of ours alone, with the umask's permissions
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)


# ---------------------------------------------------------------------------- reading
def check_checkpoint(path: str | os.PathLike | None) -> None:
    """Fail with one line naming ``path`` if it is not a readable checkpoint."""
    if path is None or path in SPECIAL_PATHS:
        return
    if not Path(path).is_file():
        raise ValueError(f"checkpoint file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"checkpoint file is corrupt or not a torch checkpoint: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"checkpoint file is corrupt ({error}): {path}") from None
    if bad is not None:
        raise ValueError(f"checkpoint file is corrupt (damaged entry {bad}): {path}")


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
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a Lightning checkpoint")
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, dict) and isinstance(hparams.get("_class_path"), str):
        hparams["_class_path"] = current_class_path(hparams["_class_path"])
    return checkpoint


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


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ---------------------------------------------------------------------------- loading
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
