"""Host-sync guards: prove that a training step never waits for the device.

A CUDA step is fast only while the host runs ahead of the GPU, queueing kernels. Anything
that turns a device tensor into a Python value (``.item()``, ``bool(t)``/``if t:``,
``.tolist()``, ``int(t)``, ``float(t)``, printing, ``.cpu()``/``.numpy()``) or copies
pageable host memory to the device with a blocking copy makes the host wait for every
queued kernel. Two guards find such code:

- :func:`no_host_sync` (any device; what CPU tests use): a ``TorchFunctionMode`` that
  raises :class:`HostSyncError` on those conversions. ``strict=True`` (the default)
  flags them whatever the tensor's device, so a CPU run catches what would sync on CUDA;
  ``strict=False`` flags only tensors off the CPU (e.g. a pool on the ``meta`` device
  standing in for a GPU, with host-side index tensors allowed) and, there, blocking
  host-to-device copies (``.to(device)`` without ``non_blocking=True``,
  ``torch.tensor(..., device=...)``).
- :func:`cuda_sync_errors` (CUDA only): ``torch.cuda.set_sync_debug_mode("error")``,
  torch's own check on every synchronising CUDA call.
- :class:`SyncWindow` (a Trainer callback): records, instead of raising, every sync in the
  hooks of a fit's first steps, with the step, the hook and the innermost lit_meta line, and
  tells the syncs a logging step or a validation's end may make (values to the logger, the
  divergence counters, the epoch's metrics) from those no step may. ``benchmarks/gpu_check.py``
  runs it on CUDA under torch's check, tests on the CPU under the strict guard.

Host-made tensors copied into a step cannot be seen on a CPU, where host and device are
one: :mod:`lit_meta.rehearsal` runs the steps with the model and data on the ``meta``
device for that.

Code that keeps host-side state in a CPU tensor by design may convert it: calls made from
``torch.optim`` (Adam and SGD keep their step count on the CPU unless ``capturable``) are
allowed.
"""
from __future__ import annotations

import inspect
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytorch_lightning as pl
import torch
from torch.overrides import TorchFunctionMode

Tensor = torch.Tensor

# Conversions of a tensor's value to Python (or to host memory): each one waits for the device.
VALUE_READS: dict[Callable, str] = {
    Tensor.item: ".item() of a tensor",
    Tensor.__bool__: "bool() of a tensor (a Python branch on a tensor value?)",
    Tensor.tolist: ".tolist() of a tensor",
    Tensor.__int__: "int() of a tensor",
    Tensor.__float__: "float() of a tensor",
    Tensor.__index__: "a tensor used as a Python index",
    Tensor.__repr__: "printing a tensor",
    Tensor.__format__: "formatting a tensor",
    Tensor.cpu: ".cpu() of a tensor",
    Tensor.numpy: ".numpy() of a tensor",
}
HOST_COPIES = (torch.tensor, torch.as_tensor)
ALLOWED_CALLERS = ("torch/optim/",)


class HostSyncError(RuntimeError):
    """A tensor's value was read on the host (or a blocking copy issued) inside a guarded region."""


PACKAGE = Path(__file__).resolve().parent
GUARD_FILES = ("sync_guard.py", "rehearsal.py")  # the guards' own frames are never the culprit


def innermost_frame(stack: traceback.StackSummary | list[traceback.FrameSummary]) -> str:
    """``lit_meta/<file>:<line> in <function>`` of the innermost lit_meta frame of ``stack`` that
    is not a guard's own (else the innermost frame outside torch): where a sync came from."""
    def where(frame: traceback.FrameSummary) -> str:
        path = Path(frame.filename)
        try:
            name = f"lit_meta/{path.resolve().relative_to(PACKAGE)}"
        except ValueError:
            name = "/".join(path.parts[-2:])
        return f"{name}:{frame.lineno} in {frame.name}"

    frames = list(stack)
    ours = [f for f in frames if Path(f.filename).resolve().is_relative_to(PACKAGE)
            and Path(f.filename).name not in GUARD_FILES]
    if ours:
        return where(ours[-1])
    # else the innermost frame outside torch, the guards and the warnings machinery that
    # reported it (on CUDA a sync arrives as a warning): e.g. Lightning's loop line
    outside = [f for f in frames if "/torch/" not in f.filename.replace("\\", "/")
               and not (Path(f.filename).name in GUARD_FILES and Path(f.filename).resolve().is_relative_to(PACKAGE))
               and not _warnings_machinery(f)]
    return where(outside[-1]) if outside else "an unknown place"


def _warnings_machinery(frame: traceback.FrameSummary) -> bool:
    """A frame of the standard library's warnings module (``_py_warnings.py`` from Python 3.14)."""
    path = Path(frame.filename)
    return path.name in ("warnings.py", "_py_warnings.py") and path.parent == Path(warnings.__file__).parent


def _caller_allowed() -> bool:
    frame = inspect.currentframe()
    frame = frame.f_back.f_back if frame is not None and frame.f_back is not None else None
    for _ in range(6):  # the mode's frames, then the call site and what called it
        if frame is None:
            return False
        filename = frame.f_code.co_filename.replace("\\", "/")
        if any(part in filename for part in ALLOWED_CALLERS):
            return True
        frame = frame.f_back
    return False


def _off_host(value: Any) -> bool:
    return isinstance(value, Tensor) and value.device.type != "cpu"


def _raise(what: str) -> None:
    raise HostSyncError(f"host sync in a guarded region: {what} at {innermost_frame(traceback.extract_stack())}")


class _Guard(TorchFunctionMode):
    """Calls ``on_sync(description)`` at each sync (default: raise :class:`HostSyncError`)."""

    def __init__(self, strict: bool, on_sync: Callable[[str], None] = _raise) -> None:
        super().__init__()
        self.strict = strict
        self.on_sync = on_sync

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = VALUE_READS.get(func)
        if what is not None and (self.strict or _off_host(args[0] if args else None)) and not _caller_allowed():
            self.on_sync(what)
        out = func(*args, **kwargs)
        if not self.strict:
            self._check_copy(func, args, kwargs, out)
        return out

    def _check_copy(self, func, args, kwargs, out) -> None:
        if func in HOST_COPIES and _off_host(out) and not (args and isinstance(args[0], Tensor) and _off_host(args[0])):
            self.on_sync(f"torch.{func.__name__}(..., device={out.device}) copies host memory with a blocking copy")
        if func in (Tensor.to, Tensor.cuda) and args and isinstance(args[0], Tensor):
            source = args[0]
            non_blocking = kwargs.get("non_blocking", False) or any(a is True for a in args[1:])
            if source.device.type == "cpu" and _off_host(out) and not non_blocking:
                self.on_sync(f"blocking copy of a host tensor to {out.device} (pin it and pass non_blocking=True)")


@contextmanager
def no_host_sync(strict: bool = True) -> Iterator[None]:
    """Raise :class:`HostSyncError` on any host read of a tensor's value inside the block."""
    with _Guard(strict):
        yield


@contextmanager
def cuda_sync_errors() -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode("error")`` inside the block (CUDA only)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def guard_training_steps(module: "torch.nn.Module", strict: bool = True, cuda: bool = False) -> Callable[[], None]:
    """Wrap ``module.training_step`` so every call runs under the guards; returns the undo.

    With ``cuda`` the step also runs under :func:`cuda_sync_errors`. It guards that one hook:
    the divergence counters (``lit_meta.nonfinite``) are read after it, in ``on_train_batch_end``
    on logging steps (``NonFiniteGuard.check``) and in ``on_train_end``, as are the values a
    logging step hands to the logger. :class:`SyncWindow` covers every hook of a step, and
    tells those reads from the ones no step may make."""
    original = module.training_step

    def guarded(*args: Any, **kwargs: Any) -> Any:
        with no_host_sync(strict):
            if cuda:
                with cuda_sync_errors():
                    return original(*args, **kwargs)
            return original(*args, **kwargs)

    module.training_step = guarded

    def undo() -> None:
        module.training_step = original

    return undo


# ----------------------------------------------------------------------------- a recorded window of a fit
@dataclass
class SyncRecord:
    """One host sync inside a :class:`SyncWindow`: at training step ``step`` (the global step
    when the hook began), in ``hook``, what it was, and the innermost lit_meta line."""

    step: int
    hook: str
    what: str
    where: str
    logging_step: bool = False


# (the batch transfer is not wrapped: an instance override of transfer_batch_to_device would change
# which hook Lightning calls; TaskBatch.to is rehearsed in lit_meta.rehearsal, and on CUDA torch's
# check stays on for the whole window, between hooks too)
MODULE_HOOKS = ("training_step", "on_before_optimizer_step", "on_train_batch_end", "on_validation_epoch_start",
                "validation_step", "on_validation_epoch_end")
# the DataModule's sampler, called by its loader: it reads host tensors by design (the step's
# random draws live on the CPU), so on the CPU only reads of device tensors count there
# (the meta-device rehearsal, lit_meta.rehearsal, covers the sampler on a device)
DATA_HOOKS = ("train_batch",)


class SyncWindow(pl.Callback):
    """Records every host sync in the hooks that run each training step (sampling,
    ``training_step``, the optimizer step's hook, ``on_train_batch_end``) and in a validation,
    during the first ``steps`` training steps of a fit.

    On CUDA (``cuda=True``) torch's own check finds them (``set_sync_debug_mode("warn")``, each
    warning's stack kept), for the whole window: a sync between those hooks (Lightning's loop,
    the batch transfer) is recorded as ``hook="between hooks"``. On the CPU
    :func:`no_host_sync`'s strict guard stands in, inside those hooks only (any conversion of a
    tensor's value to Python: Lightning's own loop reads host tensors by design). A logging step (the module's
    ``logging_step()``: values go to the logger and the divergence counters are read) and a
    validation's start and end may read values, by design once per logging interval or
    validation; any other step, and every ``validation_step``, must not. :meth:`summary`
    reports the steps, the hooks covered and the syncs, each with its innermost lit_meta line.
    """

    def __init__(self, steps: int, cuda: bool = False) -> None:
        self.steps, self.cuda = steps, cuda
        self.records: list[SyncRecord] = []
        self.calls: dict[str, int] = {}
        self.logging_steps: set[int] = set()
        self.validated_at: list[int] = []
        self._hook: str | None = None
        self._step = 0  # the training step being run (its batch index in the task stream)
        self._started = False
        self._undo: list[Callable[[], None]] = []
        self._cuda_window: Any = None

    def active(self) -> bool:
        return self._started and self._step < self.steps

    # -- recording --------------------------------------------------------------
    def _record(self, what: str, stack: traceback.StackSummary) -> None:
        self.records.append(SyncRecord(self._step, self._hook or "between hooks", what, innermost_frame(stack)))

    @contextmanager
    def _watch(self, hook: str, strict: bool = True) -> Iterator[None]:
        if not self.active() or self._hook is not None:  # nested hooks: the outer one is the place
            yield
            return
        self._hook = hook
        self.calls[hook] = self.calls.get(hook, 0) + 1
        try:
            if self.cuda:  # torch's check is already on (the whole window)
                yield
            else:
                with _Guard(strict=strict, on_sync=lambda what: self._record(what, traceback.extract_stack())):
                    yield
        finally:
            self._hook = None

    @contextmanager
    def _cuda_warnings(self) -> Iterator[None]:
        previous_mode, previous_show = torch.cuda.get_sync_debug_mode(), warnings.showwarning

        def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
            # (the mode's own notice that it is a prototype is no sync)
            if "synchroniz" in str(message) and "prototype feature" not in str(message):
                self._record(str(message).splitlines()[0][:120], traceback.extract_stack())
            else:
                previous_show(message, category, *args, **kwargs)

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(previous_mode)
                warnings.showwarning = previous_show

    def _close_cuda_window(self) -> None:
        if self._cuda_window is not None:
            self._cuda_window.__exit__(None, None, None)
            self._cuda_window = None

    def _wrap(self, owner: Any, name: str, strict: bool = True) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        def watched(*args: Any, **kwargs: Any) -> Any:
            with self._watch(name, strict):
                return original(*args, **kwargs)

        setattr(owner, name, watched)
        self._undo.append(lambda: delattr(owner, name) if name in vars(owner) else None)

    # -- Lightning hooks ------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for name in MODULE_HOOKS:
            self._wrap(pl_module, name)
        for name in DATA_HOOKS:
            self._wrap(trainer.datamodule, name, strict=False)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started, self._step = True, trainer.global_step
        if self.cuda and self.active():
            self._cuda_window = self._cuda_warnings()
            self._cuda_window.__enter__()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._step = trainer.global_step
        if not self.active():
            self._close_cuda_window()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # after the meta-optimizer stepped, as the module's own logging code asks it
        if self.active() and pl_module.logging_step():
            self.logging_steps.add(self._step)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active() and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.validated_at.append(self._step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_cuda_window()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_cuda_window()
        for undo in reversed(self._undo):
            undo()
        self._undo = []

    # -- the report -------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """``ok`` (no sync where none may be), the steps, logging steps and validations covered,
        hook call counts, the syncs that may happen and those that may not (grouped by place)."""
        for record in self.records:
            record.logging_step = record.step in self.logging_steps
        # a validation's start and end, and (on CUDA) Lightning's loop around it, read values once each
        validation = set(self.validated_at)
        allowed_hooks = ("on_validation_epoch_start", "on_validation_epoch_end")
        bad = [r for r in self.records if not r.logging_step and r.hook not in allowed_hooks
               and not (r.hook == "between hooks" and r.step in validation)]

        def grouped(records: list[SyncRecord]) -> list[dict[str, Any]]:
            places: dict[tuple[str, str, str], list[int]] = {}
            for r in records:
                places.setdefault((r.hook, r.what, r.where), []).append(r.step)
            return [{"hook": h, "what": w, "where": p, "steps": sorted(set(s))} for (h, w, p), s in places.items()]

        return {"ok": not bad, "mechanism": "torch.cuda.set_sync_debug_mode('warn')" if self.cuda
                else "lit_meta.sync_guard strict (any tensor value read)",
                "steps": self.steps, "logging_steps": sorted(self.logging_steps), "validated_at": self.validated_at,
                "hook_calls": dict(self.calls), "syncs_not_allowed": grouped(bad),
                "syncs_on_logging_steps_or_validation_ends": grouped([r for r in self.records if r not in bad])}
