"""The per-task computation of a meta-batch, ``vmap``-ed over its tasks.

One task: adapt the network's parameters on the support set with the one inner loop
(``lit_meta.inner.adapt``), predict the query set, and return what the meta-step and the
metrics need. :func:`run_tasks` ``vmap``s that over the ``tasks`` dimension of a
:class:`~lit_meta.tasks.TaskBatch` (functorch's ``maml-omniglot-transforms.py`` pattern),
optionally ``task_chunk_size`` tasks at a time.

These functions hold no state: they take a :class:`~lit_meta.algorithms.base.MetaLearner`
and call its hooks (``adapt_names``, ``update_rule``, ``forward_fn``, ``loss_fn``,
``predict``, ``trace_inner``, ``query_objective``, ``extra_task_outputs``,
``absorb_task_outputs``; see its docstring), so an algorithm changes what one task does
by overriding hooks, never this file.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.func import vmap

from lit_meta.inner import Adapted, Params, adapt
from lit_meta.tasks import TaskBatch

if TYPE_CHECKING:  # for annotations only: base.py imports this module
    from lit_meta.algorithms.base import MetaLearner


def inner_precision(learner: "MetaLearner") -> AbstractContextManager:
    """Under 16-mixed the inner loop runs in fp32: Lightning's GradScaler scales only
    ``manual_backward``, so fp16 inner gradients (``torch.func.grad``) could underflow.
    The query forward stays in fp16 and the outer backward is scaled as usual. bf16
    has fp32's range, so under bf16-mixed the inner loop stays in autocast."""
    trainer = learner._trainer
    if trainer is not None and str(trainer.precision).startswith("16"):
        return torch.autocast(device_type=learner.device.type, enabled=False)
    return nullcontext()


def adapt_task(learner: "MetaLearner", params: Params, support_x: Tensor, support_y: Tensor, steps: int,
               first_order: bool, training: bool, trace: bool = False) -> Adapted:
    """``steps`` inner steps of the learner's rule on one task's support loss."""
    # The data are arguments, not closed over: inner checkpointing recomputes a step from its inputs.
    def support_loss(p: Params, step: int, x: Tensor, y: Tensor) -> Tensor:
        return learner.loss_fn(learner.forward_fn(p, x, step), y)

    with inner_precision(learner):
        return adapt(support_loss, params, steps, learner.update_rule(training), first_order,
                     learner.adapt_names(), trace=trace, checkpoint=learner.inner_checkpointing,
                     data=(support_x, support_y))


def task_outputs(learner: "MetaLearner", params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                 query_y: Tensor, steps: int, first_order: bool, training: bool) -> dict[str, Any]:
    """Everything one task contributes; ``vmap``-ed over the meta-batch by :func:`run_tasks`."""
    adapted = adapt_task(learner, params, support_x, support_y, steps, first_order, training,
                         trace=learner.trace_inner(training))
    prediction = learner.predict(adapted.params, support_x, query_x, steps, training)
    final_loss = learner.loss_fn(prediction, query_y)
    out: dict[str, Any] = {
        "query_loss": learner.query_objective(adapted, support_x, query_x, query_y, final_loss, training),
        "final_query_loss": final_loss.detach(),
        "query_acc": learner.accuracy(prediction, query_y),
        "updates": {n: (params[n] - adapted.params[n]).detach() for n in learner.adapt_names()},
        **learner.extra_task_outputs(adapted, support_x, training),
    }
    if not training:
        before = learner.predict(params, support_x, query_x, 0, training)
        out["before_loss"] = learner.loss_fn(before, query_y).detach()
        out["before_acc"] = learner.accuracy(before, query_y)
    return out


def run_tasks(learner: "MetaLearner", batch: TaskBatch, steps: int, first_order: bool, training: bool,
              differentiable: bool | None = None, absorb: bool = True) -> dict[str, Any]:
    """vmap :func:`task_outputs` over the tasks. ``differentiable`` (default: ``training``)
    keeps the graph to θ; algorithms whose outer step needs no backward turn it off.
    ``absorb``: hand training outputs to ``absorb_task_outputs`` (once per meta-batch)."""
    params = learner.inner_params()
    differentiable = training if differentiable is None else differentiable
    if not differentiable:
        params = {n: p.detach() for n, p in params.items()}

    def build():
        fn = partial(task_outputs, learner, steps=steps, first_order=first_order, training=training)
        return vmap(fn, in_dims=(None, 0, 0, 0, 0), randomness="different", chunk_size=learner.task_chunk_size)

    # torch.compile (``compile_tasks``) only where no double backward runs: second order and
    # step-dependent orders run eagerly (lit_meta.compile)
    capturable = not differentiable or first_order is True
    batched = learner.task_compiler((steps, first_order, training, differentiable), build, capturable)
    out = batched(params, batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    if training and absorb:
        learner.absorb_task_outputs(out)
    return out


def outer_update_in_chunks(learner: "MetaLearner", batch: TaskBatch, chunk: int) -> dict[str, Any]:
    """MAML's meta-step, ``chunk`` tasks at a time: each chunk is adapted and back-propagated
    before the next, so only one chunk's second-order graph is alive; ``.grad``
    accumulates the same Σ_i w_i ∇L_i as one pass over the meta-batch."""
    steps, first_order, meta_step = learner.inner_steps, learner.first_order_at(True), learner.meta_step
    updates = None
    if meta_step.weighting != "uniform":
        # Gradient Agreement needs every task's update before the first backward. The
        # updates' values do not depend on the graph, so a graph-free pass finds them.
        updates = run_tasks(learner, batch, steps, first_order=True, training=True, differentiable=False,
                            absorb=False)["updates"]
    weights = meta_step.weights(updates, batch.num_tasks, batch.query_x)
    optimizer = meta_step.begin(learner)
    outs = []
    for start in range(0, batch.num_tasks, chunk):
        out = run_tasks(learner, batch.slice(start, start + chunk), steps, first_order=first_order, training=True,
                        absorb=False)
        meta_step.accumulate(learner, weights[start:start + chunk], query_losses=out["query_loss"])
        out["query_loss"] = out["query_loss"].detach()
        outs.append(out)
    out = cat_task_outputs(outs)
    learner.absorb_task_outputs(out)
    meta_step.finish(learner, optimizer, weights)
    return out


def cat_task_outputs(outs: list[Any]) -> Any:
    """Concatenate per-chunk :func:`run_tasks` outputs (nested dicts of [tasks, ...] tensors)."""
    first = outs[0]
    if isinstance(first, dict):
        return {k: cat_task_outputs([o[k] for o in outs]) for k in first}
    return torch.cat(outs)
