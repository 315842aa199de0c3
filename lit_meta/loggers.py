"""A WandbLogger that never takes training down with it.

Without an API key (``WANDB_API_KEY`` or a ``~/.netrc`` entry) it goes offline with a
one-line notice; if an online start fails anyway (no network), it retries offline.
The run id defaults to the SLURM job id (plus array task id), so a requeued job
continues the same W&B run.
"""
from __future__ import annotations

import netrc
import os
import sys
from typing import Any

from pytorch_lightning.loggers import WandbLogger as _WandbLogger

from lit_meta.internals import wandb_is_offline, wandb_restart_offline


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def slurm_run_id() -> str | None:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job is None:
        return None
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{job}_{task}" if task is not None else job


def _notice(message: str) -> None:
    print(f"lit_meta: {message}", file=sys.stderr)


class WandbLogger(_WandbLogger):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("id") is None and kwargs.get("version") is None and slurm_run_id() is not None:
            kwargs["id"] = slurm_run_id()
            kwargs.setdefault("resume", "allow")
        if not kwargs.get("offline") and os.environ.get("WANDB_MODE") != "offline" and not _has_api_key():
            _notice("no W&B API key found; logging to W&B offline (sync later with `wandb sync`)")
            kwargs["offline"] = True
        super().__init__(*args, **kwargs)

    @property
    def experiment(self) -> Any:
        try:
            return super().experiment
        except Exception as error:  # noqa: BLE001 - any online failure must not stop training
            if wandb_is_offline(self):
                raise
            _notice(f"W&B online start failed ({type(error).__name__}); logging offline instead")
            wandb_restart_offline(self)
            return super().experiment
