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

Code that keeps host-side state in a CPU tensor by design may convert it: calls made from
``torch.optim`` (Adam and SGD keep their step count on the CPU unless ``capturable``) are
allowed.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

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


def _caller_allowed() -> bool:
    frame = sys._getframe(2)
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


class _Guard(TorchFunctionMode):
    def __init__(self, strict: bool) -> None:
        super().__init__()
        self.strict = strict

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = VALUE_READS.get(func)
        if what is not None and (self.strict or _off_host(args[0] if args else None)) and not _caller_allowed():
            raise HostSyncError(f"host sync in a guarded region: {what}")
        out = func(*args, **kwargs)
        if not self.strict:
            self._check_copy(func, args, kwargs, out)
        return out

    @staticmethod
    def _check_copy(func, args, kwargs, out) -> None:
        if func in HOST_COPIES and _off_host(out) and not (args and isinstance(args[0], Tensor) and _off_host(args[0])):
            raise HostSyncError(f"host sync in a guarded region: torch.{func.__name__}(..., device={out.device}) "
                                "copies host memory with a blocking copy")
        if func in (Tensor.to, Tensor.cuda) and args and isinstance(args[0], Tensor):
            source = args[0]
            non_blocking = kwargs.get("non_blocking", False) or any(a is True for a in args[1:])
            if source.device.type == "cpu" and _off_host(out) and not non_blocking:
                raise HostSyncError(f"host sync in a guarded region: blocking copy of a host tensor to {out.device} "
                                    "(pin it and pass non_blocking=True)")


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

    With ``cuda`` the step also runs under :func:`cuda_sync_errors`."""
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
