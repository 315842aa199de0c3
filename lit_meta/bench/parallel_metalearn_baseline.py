"""The parallel-metalearn 0.5.6 side of a benchmark :class:`~lit_meta.bench.case.Case`.

Ported from the documented usage of parallel-metalearn 0.5.6 (its PyPI README,
"Minimal Working Example" and "Execution Backends"; the installed sources
``metalearn/algorithms/MAML.py`` and ``metalearn/algorithms/Reptile.py``): the network in
``MAML_Model(backbone, head)``; ``CrossEntropy(metric_fn=CategoricalAccuracy())``; an inner
optimizer over ``model.get_fast_weights()``; ``MAML(model=..., optimizer=Adam, inner_optimizer=...,
support_loss_fn=..., inner_steps=..., chunk_size=..., backend="vmap")`` and one
``algorithm.step(task_iterator)`` per meta-batch (what its ``MetaTrain`` calls), which vmaps
the inner loop over the tasks with ``torch.func``, backpropagates the chunk's mean query loss
and steps the outer optimizer. ``chunk_size`` is the meta-batch size: the README's full
vectorisation, as ours runs.

- MAML / FOMAML: ``InnerSGD(first_order=..., learn_lr=False)`` at the case's inner rate. Its
  step also computes accuracy and reads the loss with ``.item()``: the library's step, timed.
- Reptile: absent (:data:`REPTILE_ABSENT`). Its ``Reptile`` would take ``InnerAdam(beta1=0)``,
  ours' inner optimizer, but 0.5.6's ``InnerAdam`` returns, for each weight, the tuple of the
  first elements of (weight, m, v) (``pytree.tree_map(lambda x: x[0], results)`` maps into the
  tuples), so its Reptile fails at the second inner step; with another inner optimizer it
  would do other work than ours.

Our Conv4 is split into the two modules ``MAML_Model`` expects, whose ``forward`` takes the
library's keyword flags (``training``, ``num_step``): the body (a ``deepcopy`` without its
head) and the head; the parameters and their order are Conv4's. The task iterator yields
``(Xs, {"labels": Ys}, Xq, {"labels": Yq})``, the targets as its loss reads them.

An optional extra (``bash benchmarks/install_peers.sh parallel_metalearn``; it imports as ``metalearn``).
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import Tensor, nn

from lit_meta.bench.case import Case
from lit_meta.bench.peers import PeerAbsent, PeerStep, grads_of, meta_batches, weights_of
from lit_meta.tasks import TaskBatch

REPTILE_ABSENT = ("parallel_metalearn 0.5.6's InnerAdam returns tuples in place of weights "
                  "(its pytree.tree_map(lambda x: x[0], ...) maps into them): no Reptile with Adam(β1=0) as ours")


class FlagsIgnored(nn.Module):
    """``module(x)`` for a ``forward(x, **flags)`` call: parallel-metalearn passes its flags
    to the backbone and the head, and Conv4's parts take none."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor, **flags: Any) -> Tensor:
        return self.module(x)


def build_parallel_metalearn(case: Case, net: torch.nn.Module, images: Tensor, seed: int = 1,
                             tasks: Callable[[], TaskBatch] | None = None) -> PeerStep:
    """parallel-metalearn's meta-step for ``case`` on a copy of ``net``'s weights (``tasks``: a fixed batch)."""
    if case.algorithm == "reptile":
        raise PeerAbsent(REPTILE_ABSENT)
    from metalearn.algorithms import MAML
    from metalearn.inner_optimizers import InnerSGD
    from metalearn.loss import CategoricalAccuracy, CrossEntropy
    from metalearn.model_wrappers import MAML_Model

    device = torch.device(case.device)
    draw = meta_batches(case, images, seed, tasks)
    body = copy.deepcopy(net)
    head, body.head = body.head, None  # Conv4 without a head returns its features
    model = MAML_Model(backbone=FlagsIgnored(body), head=FlagsIgnored(head)).to(device)
    model.train()
    inner = InnerSGD(model.get_fast_weights(), first_order=case.is_first_order, inner_lr=case.inner_lr,
                     max_inner_steps=case.inner_steps, learn_lr=False)
    algorithm = MAML(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=case.meta_lr),
                     inner_optimizer=inner, support_loss_fn=CrossEntropy(metric_fn=CategoricalAccuracy()),
                     inner_steps=case.inner_steps, chunk_size=case.meta_batch_size, device=device, backend="vmap")

    def step() -> None:
        b = draw()
        algorithm.step(iter([(b.support_x, {"labels": b.support_y}, b.query_x, {"labels": b.query_y})]))

    return PeerStep(step, lambda: weights_of(model), lambda: grads_of(model))
