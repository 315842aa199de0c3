"""The divergence guard of every meta-step: a step that makes the meta-loss or the weights
non-finite is undone, counted, and after ``max_nonfinite`` in a row training stops.

:class:`~lit_meta.meta_step.MetaStep` (so every algorithm, and the learned optimizer) runs
each meta-optimizer step through :meth:`NonFiniteGuard.step`:

1. during the step the meta-loss (or the written gradients, Reptile's θ − θ'ᵢ) is noted
   (:meth:`NonFiniteGuard.note`);
2. the parameters and the optimizer's per-parameter state (Adam's moments, SGD's momentum)
   are copied, the optimizer steps, and where the noted values or the new parameters are
   not all finite, the copies are put back: ``torch.where`` on the device, so the step's
   outcome is never read on the host (a CUDA step does not wait: ``lit_meta.sync_guard``);
3. device counters keep the skipped steps (``train/nonfinite_skipped``), the current run of
   them and the step it began at.

The host reads the counters only in :meth:`NonFiniteGuard.check`, which
:class:`~lit_meta.algorithms.meta_module.MetaModule` calls on logging steps and when
training ends: one warning for the steps skipped since the last check, and, once
``max_nonfinite`` steps in a row were skipped, ``module.divergence`` (one line naming the
step and the likely cause, from the module's ``divergence_cause``) and ``trainer.should_stop``.
Skipped steps still count as Trainer steps (``global_step``, the learning-rate schedule and
the optimizer's own step counter advance); the weights stay those of the last finite step,
so every checkpoint written holds finite weights.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from lit_meta.internals import attached_trainer, foreach_max_abs, foreach_copy

if TYPE_CHECKING:
    import pytorch_lightning as pl

COUNTERS = ("total", "in_row", "run_start", "tripped", "tripped_at", "tripped_start")


class NonFiniteGuard:
    def __init__(self, max_nonfinite: int = 10) -> None:
        if max_nonfinite < 1:
            raise ValueError(f"max_nonfinite must be >= 1, got {max_nonfinite}")
        self.max_nonfinite = max_nonfinite
        self._ok: Tensor | None = None  # this step's noted values are finite (device bool)
        self._counters: dict[str, Tensor] | None = None  # device int64 scalars, COUNTERS
        self._restored: dict[str, int] | None = None  # counters of a checkpoint, until the next step
        self._reported = 0  # skipped steps already warned about
        self._checked_step = 0

    # ------------------------------------------------------------------ during a step (device only)
    def begin(self) -> None:
        self._ok = None

    def note(self, value: Tensor) -> None:
        """Add ``value`` (a meta-loss, written gradients) to what must be finite for this step."""
        ok = torch.isfinite(value.detach()).all()
        self._ok = ok if self._ok is None else self._ok & ok

    def step(self, optimizer: Any, step: int) -> Tensor:
        """``optimizer.step()``, undone on the device when the step is not finite; returns the
        device bool "this step was kept"."""
        inner = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper holds the torch optimizer
        params = [p for group in inner.param_groups for p in group["params"]]
        with torch.no_grad():
            # what the step may change: the weights and their per-coordinate optimizer state
            # (state a first step creates is restored to zero, where its optimizer starts it)
            before = {id(p): set(inner.state[p]) if p in inner.state else set() for p in params}
            tensors = params + [v for p in params for v in _moving_state(inner, p)]
            saved = foreach_copy(tensors)  # one fused copy
            optimizer.step()
            norms = foreach_max_abs(params)  # max |x|: NaN or inf where not finite
            ok = torch.isfinite(torch.stack(norms)).all()
            if self._ok is not None:
                ok = ok & self._ok
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                # ranks hold the same weights: they must all keep or all undo the step
                flag = ok.to(torch.int32)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                ok = flag.bool()
            for tensor, old in zip(tensors, saved):
                torch.where(ok, tensor, old, out=tensor)
            for p in params:
                for key, value in inner.state[p].items() if p in inner.state else ():
                    if key not in before[id(p)] and _per_coordinate(value, p):  # created by this step
                        torch.where(ok, value, torch.zeros_like(value), out=value)
        self._count(ok, step)
        self._ok = None
        return ok

    def _count(self, ok: Tensor, step: int) -> None:
        if self._counters is None:  # filled on the device (a copy from the host would wait)
            start = self._restored or {}
            self._counters = {name: torch.full((), int(start.get(name, 0)), dtype=torch.int64, device=ok.device)
                              for name in COUNTERS}
        c = self._counters
        bad = (~ok).to(torch.int64)
        here = torch.full((), step, dtype=torch.int64, device=ok.device)  # a fill: no host-to-device copy
        c["total"] = c["total"] + bad
        c["in_row"] = (c["in_row"] + 1) * bad
        c["run_start"] = torch.where(c["in_row"] == 1, here, c["run_start"])
        trips = (c["in_row"] >= self.max_nonfinite) & (c["tripped"] == 0)
        c["tripped_at"] = torch.where(trips, here, c["tripped_at"])
        c["tripped_start"] = torch.where(trips, c["run_start"], c["tripped_start"])
        c["tripped"] = c["tripped"] | trips.to(torch.int64)

    def skipped_tensor(self, like: Tensor) -> Tensor:
        """The skipped-step count as a float device tensor, for logging without a host read."""
        if self._counters is None:
            return torch.full((), float(self.read()["total"]), device=like.device)
        return self._counters["total"].float()

    # ------------------------------------------------------------------ on the host
    def read(self) -> dict[str, int]:
        """The counters (one host read: call it on logging steps, not every step)."""
        if self._counters is None:
            return {name: int((self._restored or {}).get(name, 0)) for name in COUNTERS}
        values = torch.stack([self._counters[name] for name in COUNTERS]).tolist()
        return dict(zip(COUNTERS, values))

    @property
    def skipped(self) -> int:
        return self.read()["total"]

    def state_dict(self) -> dict[str, int]:
        """The counters, for checkpoints: a resumed run goes on counting."""
        return {**self.read(), "reported": self._reported}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Counters from a checkpoint; they move to the device with the next step."""
        self._restored = {name: int(state.get(name, 0)) for name in COUNTERS}
        self._counters = None
        self._reported = int(state.get("reported", 0))

    def check(self, module: "pl.LightningModule", batch: Any = None) -> dict[str, Any] | None:
        """Warn about the steps skipped since the last check; after ``max_nonfinite`` in a row,
        set ``module.divergence`` and stop the Trainer. ``batch``: this step's, which the
        module's ``divergence_cause`` may replay. Returns the divergence, if any."""
        counts = self.read()
        step = int(module.global_step)
        if counts["total"] > self._reported:
            rank_zero_warn(f"non-finite meta-loss or parameters: {counts['total'] - self._reported} meta-step(s) "
                           f"skipped between steps {self._checked_step} and {step} ({counts['total']} in all, "
                           f"train/nonfinite_skipped); the weights stay those of the last finite step")
            self._reported = counts["total"]
        self._checked_step = step
        if not counts["tripped"] or getattr(module, "divergence", None):
            return getattr(module, "divergence", None)
        start, at = counts["tripped_start"], counts["tripped_at"]
        cause = module.divergence_cause(start, batch)
        message = (f"training diverged: the meta-loss or the parameters were non-finite in {self.max_nonfinite} "
                   f"meta-steps in a row from step {start} (max_nonfinite={self.max_nonfinite}), so the run "
                   f"stopped at step {step}; likely cause: {cause}; the weights are those of the last finite step, before "
                   f"step {start}")
        module.divergence = {"diverged_at_step": start, "stopped_at_step": step, "detected_at_step": at,
                             "nonfinite_skipped": counts["total"], "cause": cause, "message": message}
        rank_zero_warn(message)
        if attached_trainer(module) is not None:
            module.trainer.should_stop = True
        return module.divergence


def _moving_state(optimizer: torch.optim.Optimizer, param: Tensor) -> list[Tensor]:
    state = optimizer.state[param] if param in optimizer.state else {}
    return [v for _, v in sorted(state.items()) if _per_coordinate(v, param)]


def _per_coordinate(value: Any, param: Tensor) -> bool:
    """Optimizer state that moves with the parameter (moments, momentum), not counters."""
    return isinstance(value, Tensor) and value.shape == param.shape and value.device == param.device
