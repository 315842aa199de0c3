"""The peers a benchmark compares lit_meta against, and what their ports share.

Each peer is an optional extra with its own module, a port of that library's own MAML
example or documented usage (the module docstring cites the file):

- ``learn2learn``: :mod:`lit_meta.bench.learn2learn_baseline`
- ``higher``: :mod:`lit_meta.bench.higher_baseline`
- ``torchopt``: :mod:`lit_meta.bench.torchopt_baseline`
- ``parallel_metalearn``: :mod:`lit_meta.bench.parallel_metalearn_baseline`
- ``jax``: :mod:`lit_meta.bench.jax_baseline` (CPU only; runs in its own process, see there)

:func:`peer_version` says whether a peer imports (its version, or :class:`PeerAbsent` with a
one-line reason); :func:`build_peer` gives its meta-step for a case as a :class:`PeerStep`.
A port imports its library only when built, so this module imports none of them.

What every port gets (as learn2learn's does): a ``deepcopy`` of our Conv4 (JAX: the same
weights as arrays), the case's task shapes from :func:`meta_batches` (the cheapest batched
draw, :class:`~lit_meta.bench.case.TensorTasks`, over the same images as ours), the case's
meta-optimizer (MAML: Adam at ``meta_lr``; Reptile: SGD at ``meta_lr`` on θ − mean θ') and the
process's thread count.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

import lit_meta
from lit_meta.bench.case import Case, TensorTasks
from lit_meta.tasks import TaskBatch

# peer -> (the module it is imported as, its distribution on the package index, the port's builder)
PEERS: dict[str, tuple[str, str, str]] = {
    "learn2learn": ("learn2learn", "learn2learn", "lit_meta.bench.learn2learn_baseline:build_learn2learn"),
    "higher": ("higher", "higher", "lit_meta.bench.higher_baseline:build_higher"),
    "torchopt": ("torchopt", "torchopt", "lit_meta.bench.torchopt_baseline:build_torchopt"),
    "parallel_metalearn": ("metalearn", "parallel_metalearn",
                           "lit_meta.bench.parallel_metalearn_baseline:build_parallel_metalearn"),
    "jax": ("jax", "jax", "lit_meta.bench.jax_baseline:build_jax"),
}
INSTALL_HINT = "bash benchmarks/install_peers.sh"


class PeerAbsent(ImportError):
    """A peer that is not installed or does not import here; the message is one line."""


@dataclass
class PeerStep:
    """A peer's meta-step: ``step()`` runs one; ``weights()`` are its network's current
    parameters and ``meta_gradient()`` the last step's gradient of the meta-loss (MAML,
    FOMAML), both as torch tensors in our Conv4's parameter order and layout; ``info``
    holds what the benchmark reports beside the timing (JAX: ``compile_s``)."""

    step: Callable[[], None]
    weights: Callable[[], list[Tensor]]
    meta_gradient: Callable[[], list[Tensor]]
    info: dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> None:
        self.step()


def peer_version(peer: str) -> str:
    """The installed version of ``peer``, or :class:`PeerAbsent` saying why it cannot run."""
    if peer not in PEERS:
        raise ValueError(f"peer must be one of {tuple(PEERS)}, got {peer!r}")
    module, distribution, _ = PEERS[peer]
    try:
        importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - a broken install is as absent as a missing one
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise PeerAbsent(f"{peer} does not import ({type(error).__name__}: {first}); install it with "
                         f"`{INSTALL_HINT} {peer}`") from None
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


def build_peer(peer: str, case: Case, net: torch.nn.Module, images: Tensor, **options: Any) -> Callable[[], None]:
    """``peer``'s meta-step for ``case`` from ``net``'s weights and tasks over ``images``."""
    peer_version(peer)
    module, builder = PEERS[peer][2].split(":")
    return getattr(importlib.import_module(module), builder)(case, net, images, **options)


def meta_batches(case: Case, images: Tensor, seed: int = 1,
                 tasks: Callable[[], TaskBatch] | None = None) -> Callable[[], TaskBatch]:
    """``draw()`` -> the next meta-batch (``TaskBatch`` on the case's device), or ``tasks``
    when given (a test's fixed batch)."""
    if tasks is not None:
        return tasks
    device = torch.device(case.device)
    sampler = TensorTasks(images, case.ways, case.shots, case.queries, case.meta_batch_size)
    gen = torch.Generator().manual_seed(seed)
    return lambda: sampler.sample_tasks("train", gen, case.meta_batch_size).to(device)


def grads_of(net: torch.nn.Module) -> list[Tensor]:
    """``net``'s parameters' ``.grad`` (zeros where a step left none)."""
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in net.parameters()]


def weights_of(net: torch.nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def reptile_meta_step(params: list[Tensor], adapted_sum: list[Tensor], tasks: int,
                      opt: torch.optim.Optimizer) -> None:
    """Reptile's outer step as ours takes it: θ − mean θ' as the gradient of the meta-optimizer."""
    for p, total in zip(params, adapted_sum):
        p.grad = p.detach() - total / tasks
    opt.step()


def subprocess_env() -> dict[str, str]:
    """The environment for a benchmark subprocess: this same lit_meta first on the path."""
    env = dict(os.environ)
    source = str(Path(lit_meta.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
    return env
