"""Small Trainer callbacks that configs can name under ``trainer.callbacks``."""
from __future__ import annotations

import pytorch_lightning as pl
import torch


class TorchThreads(pl.Callback):
    """Set torch's intra-op thread count when fit / validate / test starts.

    Why: the few-shot networks run many small ops. On a CPU shared with other jobs a
    second intra-op thread mostly waits for a core (each op ends in a barrier), which
    measured 3x slower per meta-step than one thread on the 2-core dev machine; alone
    on the machine it gains little. CPU configs therefore pin one thread.
    """

    def __init__(self, num_threads: int = 1) -> None:
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be an integer >= 1, got {num_threads!r}")
        self.num_threads = num_threads

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        torch.set_num_threads(self.num_threads)
