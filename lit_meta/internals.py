"""Every read of a private attribute of Lightning, torch or W&B, in one place.

lit_meta uses public API wherever one exists. Where none does, the read is a function here,
so that a new release that moves the attribute breaks one function, and
``tests/test_internals.py`` (which names the versions each read was checked on) says which.
No other module of lit_meta touches an underscore attribute of those packages.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: F401 - lit_meta.rehearsal's base class

# The versions every function here was read against (tests/test_internals.py checks each on
# the installed ones): torch 2.11-2.15, Lightning 2.6.0-2.6.6, wandb 0.17-0.23.
CHECKED = {"torch": ("2.11", "2.15"), "pytorch_lightning": ("2.6.0", "2.6.6")}


def compiled_graph_count() -> int:
    """Graphs Dynamo has captured in this process (``torch._dynamo.utils.counters``): a
    ``torch.compile`` call that adds none ran eagerly, e.g. past the recompile limit."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def grad_scaler_scale(scaler: Any) -> torch.Tensor | None:
    """GradScaler's current scale as its device tensor (``get_scale()`` would read it on the
    host, a sync every step); None before the first scaled backward."""
    return getattr(scaler, "_scale", None)


# ----------------------------------------------------------------------------- Lightning
def attached_trainer(module: Any) -> Any:
    """The Trainer ``module`` (a LightningModule) is attached to, or None. Lightning's public
    ``module.trainer`` raises when there is none; lit_meta's models also run without one
    (tests, benchmarks, ``train.py adapt``)."""
    return getattr(module, "_trainer", None)


def lightning_logs_this_step(trainer: Any) -> bool:
    """Whether Lightning writes this training step's logged values (its own rule, on its own
    batch counter: after a resume from a checkpoint written at validation end that counter
    runs one ahead of ``global_step``, and a rule on ``global_step`` would never again pick a
    step Lightning writes). Called after the meta-optimizer stepped."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is not None and hasattr(type(connector), "should_update_logs"):
        return bool(connector.should_update_logs)
    return trainer.global_step % max(trainer.log_every_n_steps, 1) == 0 or trainer.should_stop


def trainer_inference_mode(trainer: Any) -> bool:
    """Whether the Trainer runs evaluation under ``torch.inference_mode``: the Trainer keeps
    its ``inference_mode`` argument on its evaluation loops (private classes), not itself."""
    return any(bool(getattr(getattr(trainer, loop, None), "inference_mode", False))
               for loop in ("validate_loop", "test_loop"))


class CheckpointHparamsHook:
    """A LightningCLI mixin: LightningCLI reads ``--ckpt_path``'s hyperparameters into the
    config in its private ``_parse_ckpt_path`` (with a bare ``torch.load``: a damaged file is
    a long traceback, a moved class an import error). This routes that step to the
    subclass's ``parse_ckpt_hparams``."""

    def _parse_ckpt_path(self) -> None:
        self.parse_ckpt_hparams()

    def parse_ckpt_hparams(self) -> None:
        raise NotImplementedError


def logger_version_unset(logger: Any) -> bool:
    """Whether a CSV/TensorBoard logger has yet to choose its ``version_N`` (its public
    ``version`` would choose one, by listing the folders)."""
    return getattr(logger, "_version", None) is None


def set_logger_version(logger: Any, version: int) -> None:
    """Give a CSV/TensorBoard logger the version a run claimed (Lightning takes ``version`` only
    in the constructor)."""
    logger._version = version


def mark_restart_mid_validation(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint's fit-loop state that of a save from inside a validation that started a
    batch and processed none (Lightning's "restarted mid-evaluation"): a fit resumed from it runs
    that validation again from its first batch."""
    loops = checkpoint["loops"]["fit_loop"]
    for key, counts in loops["epoch_loop.val_loop.batch_progress"].items():
        if key != "is_last_batch" and counts["started"] > 0:
            counts["processed"] = counts["completed"] = counts["started"] - 1


def mark_restart_on_train_batch_end(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint written after an epoch's last batch hold the state of a save from that
    batch's ``on_train_batch_end`` (the batch processed, not completed; the epoch not processed;
    the logged-step count of before the batch's end), which Lightning resumes into the next epoch."""
    loops = checkpoint["loops"]["fit_loop"]
    for counts in loops["epoch_progress"].values():
        counts["processed"] -= 1
        counts["completed"] -= 1
    for key, counts in loops["epoch_loop.batch_progress"].items():
        if key != "is_last_batch":
            counts["completed"] -= 1
    loops["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1


# ----------------------------------------------------------------------------- W&B (Lightning's WandbLogger)
def wandb_is_offline(logger: Any) -> bool:
    return bool(getattr(logger, "_offline", False))


def wandb_restart_offline(logger: Any) -> None:
    """Make Lightning's WandbLogger start its run again, offline, at its next ``experiment``."""
    logger._offline = True
    logger._wandb_init["mode"] = "offline"
    logger._experiment = None


# ----------------------------------------------------------------------------- torch's fused list ops
def foreach_copy(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``tensors`` in one fused kernel per device and dtype (``torch._foreach_mul``)."""
    return list(torch._foreach_mul(tensors, 1.0))


def foreach_max_abs(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """max |x| of each tensor, fused (``torch._foreach_norm`` with p = inf): NaN or inf where
    a tensor is not finite."""
    return list(torch._foreach_norm(tensors, float("inf")))


# ----------------------------------------------------------------------------- dispatcher ops (lit_meta.rehearsal)
aten = torch.ops.aten
# value reads at the dispatcher: what .item(), bool(t), int(t) and float(t) become
VALUE_READ_OPS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
TO_COPY = aten._to_copy.default  # Tensor.to / .cpu() across devices
COPY_INTO = aten.copy_.default
