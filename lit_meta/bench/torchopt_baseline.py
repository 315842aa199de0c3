"""The TorchOpt 0.7.3 side of a benchmark :class:`~lit_meta.bench.case.Case`.

Ported from metaopt/torchopt ``examples/few-shot/maml_omniglot.py`` (commit 960fb0a),
``train()``: ``inner_opt = torchopt.MetaSGD(net, lr)``; per meta-batch
``extract_state_dict`` of the network (by reference, buffers detached) and of the inner
optimizer; per task ``inner_opt.step(loss)`` ``inner_steps`` times on the support set, the
query loss kept, then ``recover_state_dict`` of both; the mean of the query losses
``.backward()``, then ``meta_opt.step()`` (Adam). The example's ``.item()`` metrics are left
out, and the network is our Conv4 (a ``deepcopy``).

``MetaSGD.step`` always differentiates with ``create_graph=True``, so first order goes
through TorchOpt's functional API (its README's "functional optimizer"), which is what it
offers for it:

- FOMAML: ``torchopt.sgd(lr)``'s ``init`` / ``update(grads, state, inplace=False)`` and
  ``torchopt.apply_updates`` on the weights as a tuple, evaluated with
  ``torch.func.functional_call``; the inner gradients come from ``torch.autograd.grad``
  without a graph, so the query loss reaches the initial weights through the identity.
- Reptile (not in TorchOpt's examples): the same with ``torchopt.adam(lr, betas=(0, 0.999))``,
  a fresh state per task and in-place updates of a detached copy; θ − mean θ' goes to SGD
  at ``meta_lr``, as ours.

TorchOpt's compiled ``_C`` extension is built for the torch of its release and may not load
on ours; TorchOpt then runs its Python ops (the default, ``use_accelerated_op=False``, is
what this port uses either way). An optional extra (``bash benchmarks/install_peers.sh torchopt``).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from lit_meta.bench.case import Case
from lit_meta.bench.peers import PeerStep, grads_of, meta_batches, reptile_meta_step, weights_of
from lit_meta.tasks import TaskBatch


def build_torchopt(case: Case, net: torch.nn.Module, images: Tensor, seed: int = 1,
                   tasks: Callable[[], TaskBatch] | None = None) -> PeerStep:
    """TorchOpt's meta-step for ``case`` on a ``deepcopy`` of ``net`` (``tasks``: a fixed batch for tests)."""
    import torchopt

    draw = meta_batches(case, images, seed, tasks)
    net = copy.deepcopy(net).to(torch.device(case.device))
    net.train()
    names = [n for n, _ in net.named_parameters()]
    params = list(net.parameters())
    result = PeerStep(lambda: None, lambda: weights_of(net), lambda: grads_of(net))

    def loss_at(weights: tuple[Tensor, ...], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(net, dict(zip(names, weights)), (x,)), y)

    def functional_adapt(opt, weights: tuple[Tensor, ...], x: Tensor, y: Tensor, inplace: bool) -> tuple[Tensor, ...]:
        state = opt.init(weights)
        for _ in range(case.inner_steps):
            grads = torch.autograd.grad(loss_at(weights, x, y), weights)
            updates, state = opt.update(grads, state, params=weights, inplace=inplace)
            with torch.set_grad_enabled(not inplace):
                weights = torchopt.apply_updates(weights, updates, inplace=inplace)
        return weights

    if case.algorithm == "reptile":
        meta_opt = torch.optim.SGD(params, lr=case.meta_lr)
        adam = torchopt.adam(lr=case.inner_lr, betas=(0.0, 0.999))

        def reptile_step() -> None:
            batch = draw()
            total = [torch.zeros_like(p) for p in params]
            for i in range(batch.num_tasks):
                start = tuple(p.detach().clone().requires_grad_() for p in params)
                adapted = functional_adapt(adam, start, batch.support_x[i], batch.support_y[i], inplace=True)
                for t, q in zip(total, adapted):
                    t.add_(q.detach())
            meta_opt.zero_grad()
            reptile_meta_step(params, total, batch.num_tasks, meta_opt)

        result.step = reptile_step
        return result

    meta_opt = torch.optim.Adam(params, lr=case.meta_lr)
    if case.is_first_order:
        sgd = torchopt.sgd(lr=case.inner_lr)

        def fomaml_step() -> None:
            batch = draw()
            meta_opt.zero_grad()
            losses = []
            for i in range(batch.num_tasks):
                adapted = functional_adapt(sgd, tuple(params), batch.support_x[i], batch.support_y[i], inplace=False)
                losses.append(loss_at(adapted, batch.query_x[i], batch.query_y[i]))
            torch.mean(torch.stack(losses)).backward()
            meta_opt.step()

        result.step = fomaml_step
        return result

    inner_opt = torchopt.MetaSGD(net, lr=case.inner_lr)

    def maml_step() -> None:
        batch = draw()
        meta_opt.zero_grad()
        net_state = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
        optim_state = torchopt.extract_state_dict(inner_opt, by="reference")
        losses = []
        for i in range(batch.num_tasks):
            for _ in range(case.inner_steps):
                inner_opt.step(F.cross_entropy(net(batch.support_x[i]), batch.support_y[i]))
            losses.append(F.cross_entropy(net(batch.query_x[i]), batch.query_y[i]))
            torchopt.recover_state_dict(net, net_state)
            torchopt.recover_state_dict(inner_opt, optim_state)
        torch.mean(torch.stack(losses)).backward()
        meta_opt.step()

    result.step = maml_step
    return result
