"""Every read of a private attribute of Lightning, torch or W&B, in one place.

lit_meta uses public API wherever one exists. Where none does, the read is a function here,
so that a new release that moves the attribute breaks one function, and
``tests/test_internals.py`` (which names the versions each read was checked on) says which.
No other module of lit_meta touches an underscore attribute of those packages.
"""
from __future__ import annotations

from typing import Any

import torch

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
