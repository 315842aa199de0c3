"""Small Trainer callbacks that configs can name under ``trainer.callbacks``."""
from __future__ import annotations

import pytorch_lightning as pl
import torch


class TorchThreads(pl.Callback):
    """Set torch's intra-op thread count when fit / validate / test starts.

    Why: the few-shot networks run many small ops, each ending in a barrier of the
    intra-op threads. On the 2-core dev machine a 5-way 1-shot meta-step took 0.17 s with
    two threads and 0.35 s with one when nothing else ran, but about 1.1 s with two when
    other jobs shared the cores (a thread waits for a core at every op). One thread is
    the predictable choice for CPU configs that must finish in a time budget.
    """

    def __init__(self, num_threads: int = 1) -> None:
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be an integer >= 1, got {num_threads!r}")
        self.num_threads = num_threads

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        torch.set_num_threads(self.num_threads)
