"""The ``higher`` 0.2.1 side of a benchmark :class:`~lit_meta.bench.case.Case`.

Ported from facebookresearch/higher ``examples/maml-omniglot.py`` (commit 15a247a),
``train()``: ``meta_opt.zero_grad()``; for each task of the meta-batch
``higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False)``, ``diffopt.step(loss)``
``inner_steps`` times on the support set, then ``qry_loss.backward()``; ``meta_opt.step()``
(Adam). As in learn2learn's port, the example's ``.item()`` metrics and its accuracy are
left out, and the network is our Conv4 (a ``deepcopy``), not the example's own conv net.
One change of scale: each task's query loss is divided by the meta-batch size (the
example sums them; ours and the other peers average, and the meta-gradients must match).

- FOMAML: the example's own first-order setting, ``track_higher_grads=False`` (which it
  uses at test time): the inner steps build no graph, and the query loss's gradient with
  respect to the adapted weights is added to the meta-parameters' ``.grad``.
- Reptile (not in higher's examples): the same context with the inner optimizer
  ``Adam(β1=0)`` and ``track_higher_grads=False``; θ − mean θ' goes to SGD at ``meta_lr``,
  as ours. higher copies the inner optimizer's (empty) state per context, so each task
  starts a fresh Adam, as ours does. One difference is higher's: its ``DifferentiableAdam``
  adds ε before the bias correction (PyTorch's Adam before 1.0), an effective
  ε·sqrt(1 − β2^t) in ours' terms, which for gradients near 3e-7 moves the update.

higher is an optional extra (``bash benchmarks/install_peers.sh higher``).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_meta.bench.case import Case
from lit_meta.bench.peers import PeerStep, grads_of, meta_batches, reptile_meta_step, weights_of
from lit_meta.tasks import TaskBatch

ADAM_EPS = 1e-8  # Reptile's inner Adam: torch.optim.Adam's default, ours (lit_meta.update_rules.Adam)


def build_higher(case: Case, net: torch.nn.Module, images: Tensor, seed: int = 1,
                 tasks: Callable[[], TaskBatch] | None = None) -> PeerStep:
    """higher's meta-step for ``case`` on a ``deepcopy`` of ``net`` (``tasks``: a fixed batch for tests)."""
    import higher

    draw = meta_batches(case, images, seed, tasks)
    net = copy.deepcopy(net).to(torch.device(case.device))
    net.train()
    params = list(net.parameters())
    reptile = case.algorithm == "reptile"

    def adapt(fnet: torch.nn.Module, diffopt, batch: TaskBatch, i: int) -> None:
        for _ in range(case.inner_steps):
            diffopt.step(F.cross_entropy(fnet(batch.support_x[i]), batch.support_y[i]))

    if reptile:
        meta_opt = torch.optim.SGD(params, lr=case.meta_lr)
        adam = torch.optim.Adam(params, lr=case.inner_lr, betas=(0.0, 0.999), eps=ADAM_EPS)

        def reptile_step() -> None:
            batch = draw()
            total = [torch.zeros_like(p) for p in params]
            for i in range(batch.num_tasks):
                with higher.innerloop_ctx(net, adam, copy_initial_weights=False,
                                          track_higher_grads=False) as (fnet, diffopt):
                    adapt(fnet, diffopt, batch, i)
                    for t, q in zip(total, fnet.parameters()):
                        t.add_(q.detach())
            meta_opt.zero_grad()
            reptile_meta_step(params, total, batch.num_tasks, meta_opt)

        return PeerStep(reptile_step, lambda: weights_of(net), lambda: grads_of(net))

    meta_opt = torch.optim.Adam(params, lr=case.meta_lr)
    inner_opt = torch.optim.SGD(params, lr=case.inner_lr)
    first_order = case.is_first_order

    def maml_step() -> None:
        batch = draw()
        meta_opt.zero_grad()
        for i in range(batch.num_tasks):
            with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False,
                                      track_higher_grads=not first_order) as (fnet, diffopt):
                adapt(fnet, diffopt, batch, i)
                qry_loss = F.cross_entropy(fnet(batch.query_x[i]), batch.query_y[i]) / batch.num_tasks
                if first_order:
                    for p, g in zip(params, torch.autograd.grad(qry_loss, list(fnet.parameters()))):
                        p.grad = g if p.grad is None else p.grad + g
                else:
                    qry_loss.backward()
        meta_opt.step()

    return PeerStep(maml_step, lambda: weights_of(net), lambda: grads_of(net))
