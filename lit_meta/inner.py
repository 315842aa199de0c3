"""The one inner-loop engine: a few update steps on a task's support loss, in torch.func.

``adapt`` runs on a single task; algorithms ``vmap`` it over the tasks of a meta-batch
(see ``MetaLearner.run_tasks``), following functorch's ``maml-omniglot-transforms.py``.
Algorithms differ only in what they plug in:

- ``support_loss(params, step)``: the task's loss at inner step ``step`` (per-step layers read it);
- ``adapt_names``: which parameters adapt (all for MAML, the head for ANIL);
- ``rule``: how a gradient becomes a step (SGD with a scalar, per-parameter or per-step
  rate; Adam for Reptile; an LSTM for Ravi & Larochelle).
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

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import Tensor
from torch.func import grad_and_value

from lit_meta.inner_checkpoint import recompute_problem, recomputed_step

Params = dict[str, Tensor]
SupportLoss = Callable[..., Tensor]  # (params, step, *data) -> scalar


class UpdateRule(Protocol):
    """How a gradient becomes a step. For ``checkpoint=True`` a rule also has
    ``tensors() -> Params`` (every tensor it reads that may need a gradient: learned rates,
    an LSTM's weights) and ``with_tensors(tensors)`` (the same rule reading those instead),
    and no randomness; one that draws random numbers sets ``not_recomputable`` to say so."""

    def init_state(self, params: Params) -> Any: ...

    def __call__(self, step: int, params: Params, grads: Params, loss: Tensor, state: Any) -> tuple[Params, Any]: ...


@dataclass
class SGD:
    """θ ← θ − α ∇. ``lr`` is a float (MAML), a dict of per-parameter tensors (Meta-SGD; with
    ``per_step``, each tensor's row k is the rate of step k and the last row serves later
    steps: MAML++'s per-layer per-step rates), or ``lr(step, name) -> Tensor`` (closes over
    its tensors, so it cannot be checkpointed)."""

    lr: float | Params | Callable[[int, str], Tensor]
    per_step: bool = False

    def init_state(self, params: Params) -> None:
        return None

    def rate(self, step: int, name: str) -> float | Tensor:
        if callable(self.lr):
            return self.lr(step, name)
        if isinstance(self.lr, dict):
            rate = self.lr[name]
            return rate[min(step, rate.shape[0] - 1)] if self.per_step else rate
        return self.lr

    @property
    def not_recomputable(self) -> str | None:
        return "its rate is a Python callable; give a dict of tensors (per_step=True)" if callable(self.lr) else None

    def tensors(self) -> Params:
        return dict(self.lr) if isinstance(self.lr, dict) else {}

    def with_tensors(self, tensors: Params) -> SGD:
        return replace(self, lr=dict(tensors)) if isinstance(self.lr, dict) else self

    def __call__(self, step: int, params: Params, grads: Params, loss: Tensor, state: None) -> tuple[Params, None]:
        return {n: p - self.rate(step, n) * grads[n] for n, p in params.items()}, None


@dataclass
class Adam:
    """Adam on the inner loop, as Reptile uses (Nichol et al. 2018 use β1 = 0)."""

    lr: float
    betas: tuple[float, float] = (0.0, 0.999)
    eps: float = 1e-8

    def init_state(self, params: Params) -> tuple[Params, Params]:
        return ({n: torch.zeros_like(p) for n, p in params.items()}, {n: torch.zeros_like(p) for n, p in params.items()})

    def tensors(self) -> Params:
        return {}

    def with_tensors(self, tensors: Params) -> Adam:
        return self

    def __call__(self, step: int, params: Params, grads: Params, loss: Tensor, state: tuple[Params, Params]):
        b1, b2 = self.betas
        m, v = state
        t = step + 1
        m = {n: b1 * m[n] + (1 - b1) * g for n, g in grads.items()}
        v = {n: b2 * v[n] + (1 - b2) * g * g for n, g in grads.items()}
        new = {}
        for n, p in params.items():
            m_hat = m[n] / (1 - b1**t)
            v_hat = v[n] / (1 - b2**t)
            new[n] = p - self.lr * m_hat / (v_hat.sqrt() + self.eps)
        return new, (m, v)


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
