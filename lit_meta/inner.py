"""The one inner-loop engine: a few update steps on a task's support loss, in torch.func.

``adapt`` runs on a single task; algorithms ``vmap`` it over the tasks of a meta-batch
(see ``MetaLearner.run_tasks``), following functorch's ``maml-omniglot-transforms.py``.
Algorithms differ only in what they plug in:

- ``support_loss(params, step)``: the task's loss at inner step ``step`` (per-step layers read it);
- ``adapt_names``: which parameters adapt (all for MAML, the head for ANIL);
- ``rule``: how a gradient becomes a step (SGD with a scalar, per-parameter or per-step
  rate; Adam for Reptile; an LSTM for Ravi & Larochelle): ``lit_meta.update_rules``.
- ``checkpoint``: keep only each step's parameters and recompute a second-order step when
  the outer backward reaches it (``lit_meta.inner_checkpoint``): the same meta-gradient
  in memory that does not grow with ``steps``. The support loss then takes its data as
  explicit arguments, ``support_loss(params, step, *data)``.

Second order comes for free: ``torch.func.grad`` keeps the graph to the outer
parameters, so a later ``backward`` of the query loss differentiates through every
inner step (Finn et al. 2017, eq. 1). First order detaches the inner gradients, so
dθ'/dθ = I and the outer gradient is the query gradient at θ'.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from torch import Tensor
from torch.func import grad_and_value

# The rules live beside the loop; imported here so ``lit_meta.inner`` is the engine's one entry point.
from lit_meta.inner_checkpoint import recompute_problem, recomputed_step
from lit_meta.update_rules import NAG, SGD, Adam, Params, RMSprop, UpdateRule, flatten, unflatten  # noqa: F401

SupportLoss = Callable[..., Tensor]  # (params, step, *data) -> scalar


@dataclass
class Adapted:
    params: Params
    support_losses: list[Tensor]
    # params after each step (index k = after k steps, 0 = the start), when traced
    trajectory: list[Params] = field(default_factory=list)
    state: Any = None


def adapt(
    support_loss: SupportLoss,
    params: Params,
    steps: int,
    rule: UpdateRule,
    first_order: bool | Callable[[int], bool] = False,
    adapt_names: Iterable[str] | None = None,
    trace: bool = False,
    state: Any = None,
    checkpoint: bool = False,
    data: tuple[Tensor, ...] = (),
) -> Adapted:
    """Take ``steps`` steps of ``rule`` on ``support_loss(params, step, *data)`` from ``params``.

    ``first_order`` may be a function of the step, which is how MAML++ anneals the
    derivative order. ``state`` continues a previous call (truncated unrolls).
    ``checkpoint``: second-order steps are recomputed in the outer backward instead of
    keeping their graphs (``lit_meta.inner_checkpoint``); every tensor the support loss
    reads that is batched or needs a gradient must then come in ``params`` or ``data``.
    """
    if checkpoint and (problem := recompute_problem(rule)):
        raise ValueError(f"inner_checkpointing: {problem}")
    names = list(params) if adapt_names is None else list(adapt_names)
    fast = dict(params)
    if state is None:
        state = rule.init_state({n: fast[n] for n in names})
    losses: list[Tensor] = []
    trajectory = [fast] if trace else []
    for step in range(steps):
        order_one = first_order(step) if callable(first_order) else first_order
        if checkpoint and not order_one:
            new, loss, state = recomputed_step(support_loss, step, fast, names, rule, state, data)
        else:
            def loss_of(sub: Params, step: int = step) -> Tensor:
                return support_loss({**fast, **sub}, step, *data)

            grads, loss = grad_and_value(loss_of)({n: fast[n] for n in names})
            if order_one:
                grads = {n: g.detach() for n, g in grads.items()}
            new, state = rule(step, {n: fast[n] for n in names}, grads, loss, state)
        fast = {**fast, **new}
        losses.append(loss)
        if trace:
            trajectory.append(fast)
    return Adapted(fast, losses, trajectory, state)
