"""The per-task computation of a meta-batch, ``vmap``-ed over its tasks.

One task: adapt the network's parameters on the support set with the one inner loop
(``lit_meta.inner.adapt``), predict the query set, and return what the meta-step and the
metrics need. :func:`run_tasks` ``vmap``s that over the ``tasks`` dimension of a
:class:`~lit_meta.tasks.TaskBatch` (functorch's ``maml-omniglot-transforms.py`` pattern),
optionally ``task_chunk_size`` tasks at a time.

Inner mini-batches (Reptile, Nichol et al. 2018: each inner iteration trains on a
mini-batch of the task's training set, not on all of it): when the learner gives an
``inner_schedule`` (``[tasks, steps, batch]`` indices into each support set, drawn outside
``vmap`` from a generator seeded by the step, so a resumed run draws the same ones), the
support loss of inner step ``k`` reads rows ``schedule[k]`` of the support set. The
schedule is data of the one inner loop, not a second loop.

Evaluation curves: with ``by_step`` the inner loop keeps its trajectory and the query
loss and accuracy are computed after every inner step ``0..steps`` (``loss_by_step``,
``acc_by_step``); the last entry is the same prediction as the final one, so the curve
ends exactly at the reported metric.

These functions hold no state: they take a :class:`~lit_meta.algorithms.base.MetaLearner`
and call its hooks (``adapt_names``, ``update_rule``, ``initial_rule_state``,
``forward_fn``, ``loss_fn``, ``support_loss_fn``, ``meta_loss_scale``, ``predict``,
``trace_inner``, ``query_objective``, ``extra_task_outputs``, ``absorb_task_outputs``,
``inner_schedule``; see its docstring), so an algorithm changes what one task does by
overriding hooks, never this file.
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
               first_order: bool, training: bool, trace: bool = False, schedule: Tensor | None = None) -> Adapted:
    """``steps`` inner steps of the learner's rule on one task's support loss; with ``schedule``
    (``[steps, batch]``), step ``k`` trains on support rows ``schedule[k]``."""
    # The data are arguments, not closed over: inner checkpointing recomputes a step from its inputs.
    def support_loss(p: Params, step: int, x: Tensor, y: Tensor, *rows: Tensor) -> Tensor:
        if rows:
            x, y = x[rows[0][step]], y[rows[0][step]]
        return learner.support_loss_fn(learner.forward_fn(p, x, step), y)

    data = (support_x, support_y) if schedule is None else (support_x, support_y, schedule)
    with inner_precision(learner):
        return adapt(support_loss, params, steps, learner.update_rule(training), first_order,
                     learner.adapt_names(), trace=trace, state=learner.initial_rule_state(training),
                     checkpoint=learner.inner_checkpointing, data=data)


def task_outputs(learner: "MetaLearner", params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                 query_y: Tensor, schedule: Tensor | None, steps: int, first_order: bool, training: bool,
                 query: bool = True, by_step: bool = False) -> dict[str, Any]:
    """Everything one task contributes; ``vmap``-ed over the meta-batch by :func:`run_tasks`.
    ``query``: predict the query set (an algorithm whose outer step needs no query, Reptile,
    skips that forward); ``by_step``: the query metrics after every inner step too."""
    adapted = adapt_task(learner, params, support_x, support_y, steps, first_order, training,
                         trace=by_step or learner.trace_inner(training), schedule=schedule)
    out: dict[str, Any] = {
        "updates": {n: (params[n] - adapted.params[n]).detach() for n in learner.adapt_names()},
        **learner.extra_task_outputs(adapted, support_x, training),
    }
    if adapted.support_losses:
        out["final_support_loss"] = adapted.support_losses[-1].detach()
    if not query:
        return out
    prediction = learner.predict(adapted.params, support_x, query_x, steps, training)
    final_loss = learner.loss_fn(prediction, query_y)
    objective = learner.query_objective(adapted, support_x, query_x, query_y, final_loss, training)
    out.update({
        "query_loss": objective * learner.meta_loss_scale(support_y, query_y),
        "final_query_loss": final_loss.detach(),
        "query_acc": learner.accuracy(prediction, query_y),
    })
    if training:
        return out
    # the query after k = 0..steps inner steps; the last is the prediction above, so the curve ends at it
    predictions = [learner.predict(p, support_x, query_x, k, training)
                   for k, p in enumerate(adapted.trajectory[:-1])] if by_step else []
    before = predictions[0] if predictions else prediction if steps == 0 else \
        learner.predict(params, support_x, query_x, 0, training)
    out["before_loss"] = learner.loss_fn(before, query_y).detach()
    out["before_acc"] = learner.accuracy(before, query_y)
    if by_step:
        out["loss_by_step"] = torch.stack([learner.loss_fn(p, query_y).detach() for p in predictions]
                                          + [out["final_query_loss"]])
        out["acc_by_step"] = torch.stack([learner.accuracy(p, query_y) for p in predictions] + [out["query_acc"]])
    return out


def run_tasks(learner: "MetaLearner", batch: TaskBatch, steps: int, first_order: bool, training: bool,
              differentiable: bool | None = None, absorb: bool = True, query: bool = True,
              by_step: bool = False, schedule: Tensor | None = None) -> dict[str, Any]:
    """vmap :func:`task_outputs` over the tasks. ``differentiable`` (default: ``training``)
    keeps the graph to θ; algorithms whose outer step needs no backward turn it off.
    ``absorb``: hand training outputs to ``absorb_task_outputs`` (once per meta-batch).
    ``query`` / ``by_step``: see :func:`task_outputs`. ``schedule``: the inner mini-batch
    schedule of these tasks (default: the learner's ``inner_schedule`` for them)."""
    params = learner.inner_params()
    differentiable = training if differentiable is None else differentiable
    if not differentiable:
        params = {n: p.detach() for n, p in params.items()}
    if schedule is None:
        schedule = learner.inner_schedule(batch.support_x, steps, training)

    def build():
        fn = partial(task_outputs, learner, steps=steps, first_order=first_order, training=training, query=query,
                     by_step=by_step)
        return vmap(fn, in_dims=(None, 0, 0, 0, 0, None if schedule is None else 0), randomness="different",
                    chunk_size=learner.task_chunk_size)

    # torch.compile (``compile_tasks``) only where no double backward runs: second order and
    # step-dependent orders run eagerly (lit_meta.compile)
    capturable = not differentiable or first_order is True
    key = (steps, first_order, training, differentiable, query, by_step, schedule is None)
    batched = learner.task_compiler(key, build, capturable)
    out = batched(params, batch.support_x, batch.support_y, batch.query_x, batch.query_y, schedule)
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
    schedule = learner.inner_schedule(batch.support_x, steps, True)  # the whole meta-batch's, as unchunked
    outs = []
    for start in range(0, batch.num_tasks, chunk):
        out = run_tasks(learner, batch.slice(start, start + chunk), steps, first_order=first_order, training=True,
                        absorb=False, schedule=None if schedule is None else schedule[start:start + chunk])
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
