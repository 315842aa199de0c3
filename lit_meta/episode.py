"""One episode of a meta-batch: adapt on the support set, predict the query set, and hand the
meta-step what it needs; ``vmap``-ed over the tasks (functorch's
``maml-omniglot-transforms.py``: a vmapped ``loss_for_task``).

What each piece owns:

- :class:`EpisodeContext`: where an episode runs, passed down the call and never stored on
  the module or a layer: training or evaluation, the split, the training step, the global
  index of the batch's first task, the data seed and the task stream's epoch (all four from
  the batch's :class:`~lit_meta.tasks.Origin`, so a resumed run and any DDP world size see
  the same values), how BatchNorm normalises predictions, and whether the inner loop runs
  in fp32 (under 16-mixed). ``MetaLearner.context`` builds it once per batch.
- :class:`EpisodeAlgorithm`: the hooks an algorithm provides (what adapts, the update rule
  and its state, the derivative order, the support loss, prediction, the per-task
  objective and extra outputs). ``lit_meta.algorithms.base.MetaLearner`` implements them
  with MAML's behaviour; each algorithm overrides the few that differ.
- the functions: :func:`adapt_task` (the one inner loop, ``lit_meta.inner.adapt``, on a
  task's support loss), :func:`task_outputs` (everything one task contributes),
  :func:`run_tasks` (vmapped over a batch, optionally ``task_chunk_size`` tasks at a
  time), :func:`outer_update_in_chunks` (the meta-step in chunks of tasks: the same
  function per chunk, so the chunked and whole-batch paths cannot differ) and
  :func:`inner_schedule` (the inner mini-batches, seeded by the context).

Inner mini-batches (Reptile, Nichol et al. 2018: each inner iteration trains on a
mini-batch of the task's training set): with an ``inner_batch_size`` the support loss of
inner step ``k`` reads rows ``schedule[k]`` of the support set, drawn outside ``vmap``
from a generator seeded by (data seed, split, step, global task index). The schedule is
data of the one inner loop, not a second loop.

Evaluation curves: with ``by_step`` the inner loop keeps its trajectory and the query loss
and accuracy are computed after every inner step ``0..steps``; the last entry is the same
prediction as the final one, so a curve ends exactly at the reported metric.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.func import vmap

from lit_meta.data.base import derive_seed
from lit_meta.devices import to_device
from lit_meta.inner import Adapted, Params, adapt
from lit_meta.tasks import Origin, TaskBatch
from lit_meta.update_rules import UpdateRule

# How evaluation normalises the query (``transductive``): the query batch's own statistics
# (the MAML papers), each query example beside the support set (Nichol et al. 2018), or the
# support set's statistics (Ravi & Larochelle 2017's test-time BatchNorm); MAML++ with BNRS
# adds its per-step running statistics. Training always uses the batch's statistics.
BN_MODES = ("transductive", "per_example", "support", "running")


@dataclass(frozen=True)
class EpisodeContext:
    """Where an episode runs (the module docstring). ``step`` is the training step (0 in
    evaluation); ``task_offset`` the global index of the batch's first task: its place in
    the global meta-batch in training, among the split's fixed tasks in evaluation."""

    training: bool
    split: str = "train"
    step: int = 0
    task_offset: int = 0
    seed: int = 0
    epoch: int = 0
    bn: str = "transductive"
    inner_fp32: bool = False

    def __post_init__(self) -> None:
        if self.bn not in BN_MODES:
            raise ValueError(f"bn must be one of {BN_MODES}, got {self.bn!r}")

    @classmethod
    def of(cls, batch: TaskBatch, training: bool, **fields: Any) -> EpisodeContext:
        """The context of ``batch``: its origin's split, step, first task, seed and epoch (a
        batch made by hand has none: step 0, task 0, seed 0), and ``fields``."""
        origin = batch.origin or Origin("train" if training else "test")
        return cls(training=training, split=origin.split, step=origin.step if training else 0,
                   task_offset=origin.first_task, seed=origin.seed, epoch=origin.epoch, **fields)

    def chunk(self, start: int) -> EpisodeContext:
        """The context of the tasks from ``start`` on of this batch."""
        return replace(self, task_offset=self.task_offset + start)


class EpisodeAlgorithm(Protocol):
    """The hooks of one algorithm that the per-episode computation calls (see
    ``MetaLearner``'s docstring for what each does and who overrides it)."""

    inner_checkpointing: bool
    task_chunk_size: int | None
    task_compiler: Any

    def inner_params(self) -> Params: ...
    def adapt_names(self) -> list[str]: ...
    def update_rule(self, ctx: EpisodeContext) -> UpdateRule: ...
    def initial_rule_state(self, ctx: EpisodeContext) -> Any: ...
    def inner_batch_size_of(self, ctx: EpisodeContext) -> int | None: ...
    def forward_fn(self, params: Params, x: Tensor, step: int = 0, norm: Any = None) -> Tensor: ...
    def inner_norm(self, ctx: EpisodeContext) -> Any: ...
    def support_loss_fn(self, prediction: Tensor, target: Tensor) -> Tensor: ...
    def loss_fn(self, prediction: Tensor, target: Tensor) -> Tensor: ...
    def accuracy(self, prediction: Tensor, target: Tensor) -> Tensor: ...
    def meta_loss_scale(self, support_y: Tensor, query_y: Tensor) -> Tensor | float: ...
    def predict(self, params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor, step: int,
                ctx: EpisodeContext) -> Tensor: ...
    def trace_inner(self, ctx: EpisodeContext) -> bool: ...
    def query_objective(self, adapted: Adapted, support_x: Tensor, query_x: Tensor, query_y: Tensor,
                        final_loss: Tensor, ctx: EpisodeContext) -> Tensor: ...
    def extra_task_outputs(self, adapted: Adapted, support_x: Tensor, ctx: EpisodeContext) -> dict[str, Any]: ...
    def inner_penalty(self, params: Params, start: Params, ctx: EpisodeContext) -> Tensor | None: ...
    def task_gradient(self, adapted: Adapted, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                      query_y: Tensor, ctx: EpisodeContext) -> Params | None: ...
    def absorb_task_outputs(self, out: dict[str, Any]) -> None: ...


def inner_precision(ctx: EpisodeContext, device_type: str) -> AbstractContextManager:
    """Under 16-mixed the inner loop runs in fp32: Lightning's GradScaler scales only
    ``manual_backward``, so fp16 inner gradients (``torch.func.grad``) could underflow.
    The query forward stays in fp16 and the outer backward is scaled as usual. bf16 has
    fp32's range, so under bf16-mixed the inner loop stays in autocast."""
    if ctx.inner_fp32 and torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return nullcontext()


def inner_schedule(support_x: Tensor, steps: int, size: int | None, ctx: EpisodeContext) -> Tensor | None:
    """``[tasks, steps, size]`` rows of the support sets ``support_x`` (``[tasks, n, ...]``) for
    each inner step, or None without an inner mini-batch size.

    Each task's rows are a stream of random permutations of its support set, cut into
    consecutive mini-batches (supervised-reptile's ``_mini_batches``: no example repeats
    within a pass). Each task draws from its own generator, seeded by (data seed, split,
    step, global task index): so a resumed run and any world size draw the same rows for
    the same task."""
    if size is None or steps == 0:
        return None
    tasks, n = support_x.shape[:2]
    total = steps * size
    passes = -(-total // n)
    draws = []
    for task in range(tasks):
        generator = torch.Generator().manual_seed(
            derive_seed(ctx.seed, f"inner/{ctx.split}/{ctx.step}", ctx.task_offset + task))
        draws.append(torch.rand(passes, n, generator=generator))
    order = torch.stack(draws).argsort(-1).reshape(tasks, passes * n)
    rows = order[:, :total].reshape(tasks, steps, size)
    return to_device(rows, support_x.device)  # pinned, non-blocking: no host sync


def adapt_task(algorithm: EpisodeAlgorithm, params: Params, support_x: Tensor, support_y: Tensor, steps: int,
               first_order: bool, ctx: EpisodeContext, trace: bool = False,
               schedule: Tensor | None = None) -> Adapted:
    """``steps`` inner steps of the algorithm's rule on one task's support loss; with
    ``schedule`` (``[steps, batch]``), step ``k`` trains on support rows ``schedule[k]``."""
    norm = algorithm.inner_norm(ctx)
    start = {n: params[n] for n in algorithm.adapt_names()}

    # The data are arguments, not closed over: inner checkpointing recomputes a step from its inputs.
    def support_loss(p: Params, step: int, x: Tensor, y: Tensor, *rows: Tensor) -> Tensor:
        if rows:
            x, y = x[rows[0][step]], y[rows[0][step]]
        loss = algorithm.support_loss_fn(algorithm.forward_fn(p, x, step, norm), y)
        penalty = algorithm.inner_penalty(p, start, ctx)
        return loss if penalty is None else loss + penalty

    data = (support_x, support_y) if schedule is None else (support_x, support_y, schedule)
    with inner_precision(ctx, support_x.device.type):
        return adapt(support_loss, params, steps, algorithm.update_rule(ctx), first_order,
                     algorithm.adapt_names(), trace=trace, state=algorithm.initial_rule_state(ctx),
                     checkpoint=algorithm.inner_checkpointing, data=data)


def task_outputs(algorithm: EpisodeAlgorithm, params: Params, support_x: Tensor, support_y: Tensor,
                 query_x: Tensor, query_y: Tensor, schedule: Tensor | None, steps: int, first_order: bool,
                 ctx: EpisodeContext, query: bool = True, by_step: bool = False) -> dict[str, Any]:
    """Everything one task contributes; ``vmap``-ed over the meta-batch by :func:`run_tasks`.
    ``query``: predict the query set (an algorithm whose outer step needs no query, Reptile,
    skips that forward); ``by_step``: the query metrics after every inner step too."""
    adapted = adapt_task(algorithm, params, support_x, support_y, steps, first_order, ctx,
                         trace=by_step or algorithm.trace_inner(ctx), schedule=schedule)
    out: dict[str, Any] = {
        "updates": {n: (params[n] - adapted.params[n]).detach() for n in algorithm.adapt_names()},
        **algorithm.extra_task_outputs(adapted, support_x, ctx),
    }
    if adapted.support_losses:
        out["final_support_loss"] = adapted.support_losses[-1].detach()
    if not query:
        return out
    prediction = algorithm.predict(adapted.params, support_x, support_y, query_x, steps, ctx)
    final_loss = algorithm.loss_fn(prediction, query_y)
    objective = algorithm.query_objective(adapted, support_x, query_x, query_y, final_loss, ctx)
    out.update({
        "query_loss": objective * algorithm.meta_loss_scale(support_y, query_y),
        "final_query_loss": final_loss.detach(),
        "query_acc": algorithm.accuracy(prediction, query_y),
    })
    if ctx.training:
        task_grads = algorithm.task_gradient(adapted, support_x, support_y, query_x, query_y, ctx)
        if task_grads is not None:
            out["task_grads"] = task_grads
        return out
    # the query after k = 0..steps inner steps; the last is the prediction above, so the curve ends at it
    predictions = [algorithm.predict(p, support_x, support_y, query_x, k, ctx)
                   for k, p in enumerate(adapted.trajectory[:-1])] if by_step else []
    before = predictions[0] if predictions else prediction if steps == 0 else \
        algorithm.predict(params, support_x, support_y, query_x, 0, ctx)
    out["before_loss"] = algorithm.loss_fn(before, query_y).detach()
    out["before_acc"] = algorithm.accuracy(before, query_y)
    if by_step:
        out["loss_by_step"] = torch.stack([algorithm.loss_fn(p, query_y).detach() for p in predictions]
                                          + [out["final_query_loss"]])
        out["acc_by_step"] = torch.stack([algorithm.accuracy(p, query_y) for p in predictions] + [out["query_acc"]])
    return out


def run_tasks(algorithm: EpisodeAlgorithm, batch: TaskBatch, ctx: EpisodeContext, steps: int, first_order: bool,
              differentiable: bool | None = None, absorb: bool = True, query: bool = True, by_step: bool = False,
              schedule: Tensor | None = None) -> dict[str, Any]:
    """vmap :func:`task_outputs` over the tasks of ``batch``. ``differentiable`` (default: in
    training) keeps the graph to θ; algorithms whose outer step needs no backward turn it off.
    ``absorb``: hand training outputs to ``absorb_task_outputs`` (once per meta-batch).
    ``query`` / ``by_step``: see :func:`task_outputs`. ``schedule``: the inner mini-batch
    schedule of these tasks (default: drawn for them from ``ctx``)."""
    params = algorithm.inner_params()
    differentiable = ctx.training if differentiable is None else differentiable
    if not differentiable:
        params = {n: p.detach() for n, p in params.items()}
    if schedule is None:
        schedule = inner_schedule(batch.support_x, steps, algorithm.inner_batch_size_of(ctx), ctx)

    def build():
        fn = partial(task_outputs, algorithm, steps=steps, first_order=first_order, ctx=ctx, query=query,
                     by_step=by_step)
        return vmap(fn, in_dims=(None, 0, 0, 0, 0, None if schedule is None else 0), randomness="different",
                    chunk_size=algorithm.task_chunk_size)

    # torch.compile (``compile_tasks``) only where no double backward runs: second order and
    # step-dependent orders run eagerly (lit_meta.compile). The context's step and task offset
    # change every batch and are read outside the compiled graph (the schedule), so they are
    # not part of the key.
    capturable = not differentiable or first_order is True
    key = (steps, first_order, ctx.training, ctx.bn, ctx.inner_fp32, differentiable, query, by_step,
           schedule is None)
    batched = algorithm.task_compiler(key, build, capturable)
    out = batched(params, batch.support_x, batch.support_y, batch.query_x, batch.query_y, schedule)
    if ctx.training and absorb:
        algorithm.absorb_task_outputs(out)
    return out


def outer_update_in_chunks(algorithm: Any, batch: TaskBatch, ctx: EpisodeContext, steps: int,
                           first_order: bool, chunk: int) -> dict[str, Any]:
    """MAML's meta-step, ``chunk`` tasks at a time: each chunk is adapted and back-propagated
    before the next, so only one chunk's second-order graph is alive; ``.grad`` accumulates
    the same Σ_i w_i ∇L_i as one pass over the meta-batch. ``algorithm`` also holds the
    ``meta_step`` (``lit_meta.meta_step.MetaStep``)."""
    meta_step = algorithm.meta_step
    updates = None
    if meta_step.weighting != "uniform":
        # Gradient Agreement needs every task's update before the first backward. The
        # updates' values do not depend on the graph, so a graph-free pass finds them.
        updates = run_tasks(algorithm, batch, ctx, steps, first_order=True, differentiable=False,
                            absorb=False)["updates"]
    weights = meta_step.weights(updates, batch.num_tasks, batch.query_x)
    optimizer = meta_step.begin(algorithm)
    # the whole meta-batch's schedule, as the unchunked path draws it
    schedule = inner_schedule(batch.support_x, steps, algorithm.inner_batch_size_of(ctx), ctx)
    outs = []
    for start in range(0, batch.num_tasks, chunk):
        out = run_tasks(algorithm, batch.slice(start, start + chunk), ctx.chunk(start), steps, first_order,
                        absorb=False, schedule=None if schedule is None else schedule[start:start + chunk])
        meta_step.accumulate(algorithm, weights[start:start + chunk], query_losses=out["query_loss"])
        out["query_loss"] = out["query_loss"].detach()
        outs.append(out)
    out = cat_task_outputs(outs)
    algorithm.absorb_task_outputs(out)
    meta_step.finish(algorithm, optimizer, weights)
    return out


def cat_task_outputs(outs: list[Any]) -> Any:
    """Concatenate per-chunk :func:`run_tasks` outputs (nested dicts of [tasks, ...] tensors)."""
    first = outs[0]
    if isinstance(first, dict):
        return {k: cat_task_outputs([o[k] for o in outs]) for k in first}
    return torch.cat(outs)
