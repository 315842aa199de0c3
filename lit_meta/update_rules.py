"""Update rules of the inner-loop engine (``lit_meta.inner.adapt``): how a gradient becomes a step.

A rule is anything with ``init_state(params)`` and ``__call__(step, params, grads, loss,
state) -> (new params, state)`` (:class:`UpdateRule`); the engine calls it once per inner
step, inside ``vmap``, so rules are pure functions of tensors.

- :class:`SGD`: θ ← θ − α∇ with a scalar, per-parameter (Meta-SGD, Li et al. 2017) or
  per-step (MAML++, Antoniou et al. 2019) rate.
- :class:`Adam` (Kingma & Ba 2015; β1 = 0 for Reptile, Nichol et al. 2018),
  :class:`RMSprop` (Tieleman & Hinton 2012) and :class:`NAG` (Nesterov momentum, Sutskever
  et al. 2013), each as its ``torch.optim`` namesake computes it.
- :class:`CarryForward`: a rule on per-step parameters (MAML++'s per-step BatchNorm
  weights) whose step ``k`` update reaches the rows the later steps read.
- :data:`HAND_DESIGNED`: these four by name, from a learning rate with torch.optim's
  defaults (the baselines a learned optimizer is compared against, Andrychowicz et al. 2016).

Learned rules (an LSTM over all coordinates) see the parameters as one flat vector:
:func:`flatten` / :func:`unflatten`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

Params = dict[str, Tensor]


class UpdateRule(Protocol):
    """How a gradient becomes a step. For inner checkpointing (``lit_meta.inner_checkpoint``) a
    rule also has ``tensors() -> Params`` (every tensor it reads that may need a gradient:
    learned rates, an LSTM's weights) and ``with_tensors(tensors)`` (the same rule reading
    those instead), and no randomness; one that draws random numbers sets
    ``not_recomputable`` to say so."""

    def init_state(self, params: Params) -> Any: ...

    def __call__(self, step: int, params: Params, grads: Params, loss: Tensor, state: Any) -> tuple[Params, Any]: ...


def flatten(params: Params) -> Tensor:
    """All coordinates of ``params`` as one vector, in dict order."""
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten(flat: Tensor, like: Params) -> Params:
    """The inverse of :func:`flatten`: ``flat`` cut into tensors shaped (and named) as ``like``."""
    sizes = [p.numel() for p in like.values()]
    return {n: t.reshape(p.shape) for (n, p), t in zip(like.items(), flat.split(sizes))}


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
    """Adam on the inner loop, as Reptile uses (Nichol et al. 2018 use β1 = 0).

    Its state is ``(m, v)``, fresh for every task, with the bias correction of inner step
    ``step``; or ``(m, v, t)`` with ``t`` the number of updates before (a tensor), for a
    state carried over from earlier tasks (supervised-reptile keeps one Adam optimizer for
    the inner loop for all of training: ``Reptile(persistent_inner_state=True)``)."""

    lr: float
    betas: tuple[float, float] = (0.0, 0.999)
    eps: float = 1e-8

    def init_state(self, params: Params) -> tuple[Params, Params]:
        return ({n: torch.zeros_like(p) for n, p in params.items()}, {n: torch.zeros_like(p) for n, p in params.items()})

    def tensors(self) -> Params:
        return {}

    def with_tensors(self, tensors: Params) -> Adam:
        return self

    def __call__(self, step: int, params: Params, grads: Params, loss: Tensor, state: tuple[Any, ...]):
        b1, b2 = self.betas
        m, v = state[0], state[1]
        t = state[2] + 1 if len(state) == 3 else step + 1
        m = {n: b1 * m[n] + (1 - b1) * g for n, g in grads.items()}
        v = {n: b2 * v[n] + (1 - b2) * g * g for n, g in grads.items()}
        new = {}
        for n, p in params.items():
            m_hat = m[n] / (1 - b1**t)
            v_hat = v[n] / (1 - b2**t)
            new[n] = p - self.lr * m_hat / (v_hat.sqrt() + self.eps)
        return new, ((m, v, t) if len(state) == 3 else (m, v))


@dataclass
class RMSprop:
    """As ``torch.optim.RMSprop``: v ← αv + (1−α)g², θ ← θ − lr g / (√v + ε)."""

    lr: float
    alpha: float = 0.99
    eps: float = 1e-8

    def init_state(self, params: Params) -> Params:
        return {n: torch.zeros_like(p) for n, p in params.items()}

    def __call__(self, step: int, params: Params, grads: Params, loss: Tensor, state: Params):
        v = {n: self.alpha * state[n] + (1 - self.alpha) * g * g for n, g in grads.items()}
        return {n: p - self.lr * grads[n] / (v[n].sqrt() + self.eps) for n, p in params.items()}, v


@dataclass
class NAG:
    """Nesterov momentum as ``torch.optim.SGD(nesterov=True)``: b ← μb + g, θ ← θ − lr (g + μb)."""

    lr: float
    momentum: float = 0.9

    def init_state(self, params: Params) -> Params:
        return {n: torch.zeros_like(p) for n, p in params.items()}

    def __call__(self, step: int, params: Params, grads: Params, loss: Tensor, state: Params):
        b = {n: self.momentum * state[n] + g for n, g in grads.items()}
        return {n: p - self.lr * (grads[n] + self.momentum * b[n]) for n, p in params.items()}, b


@dataclass
class CarryForward:
    """``rule`` on parameters of which some (``names``) hold one row per inner step
    (MAML++'s per-step BatchNorm weights, BNWB): step ``k`` reads row ``k`` and its gradient
    is in that row alone, so a plain update of row ``k`` would be read by no later step.
    Here the step taken from row ``k``'s gradient is applied to row ``k`` and every later
    row, so the adapted value is what the later steps and the query read."""

    rule: UpdateRule
    names: frozenset[str]

    def init_state(self, params: Params) -> Any:
        return self.rule.init_state(params)

    @property
    def not_recomputable(self) -> str | None:
        return getattr(self.rule, "not_recomputable", None)

    def tensors(self) -> Params:
        return self.rule.tensors()

    def with_tensors(self, tensors: Params) -> CarryForward:
        return replace(self, rule=self.rule.with_tensors(tensors))

    def __call__(self, step: int, params: Params, grads: Params, loss: Tensor, state: Any) -> tuple[Params, Any]:
        carried = {}
        for n, g in grads.items():
            if n in self.names:
                row = min(step, g.shape[0] - 1)
                later = (torch.arange(g.shape[0], device=g.device) >= row).to(g.dtype)
                g = later.view(-1, *([1] * (g.dim() - 1))) * g[row].unsqueeze(0)
            carried[n] = g
        return self.rule(step, params, carried, loss, state)


HAND_DESIGNED: dict[str, Callable[[float], UpdateRule]] = {
    "sgd": SGD,
    "rmsprop": RMSprop,
    "adam": lambda lr: Adam(lr, betas=(0.9, 0.999)),  # torch.optim's betas, not Reptile's
    "nag": NAG,
}
