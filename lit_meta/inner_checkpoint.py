"""Inner checkpointing: exact second-order meta-gradients in memory that does not grow
with the number of inner steps (beyond the parameter trajectory).

Stored-graph MAML keeps, for every inner step k, the graph of ∇L_s(θ_k) (the support
forward and backward, recorded for a second differentiation) until the outer backward
reaches it, so memory grows linearly with the steps. Here each second-order step is one
:class:`RecomputedStep`, a ``torch.autograd.Function`` whose

- forward computes θ_{k+1} = rule(θ_k, ∇L_s(θ_k)) with ``torch.func.grad_and_value`` and
  keeps no graph: it saves only its inputs (θ_k, the rule's state and learned tensors,
  the parameters that do not adapt, the support data), which the trajectory holds anyway;
- backward, when the outer backward reaches step k, recomputes that one step under
  ``torch.func.vjp`` and pulls the cotangents of (θ_{k+1}, L_s(θ_k), state_{k+1}) back to
  every input that needs a gradient. For SGD that is v − α·H·v to θ_k, −v·∇L_s to a
  learned rate (Meta-SGD, MAML++'s per-layer per-step rates), the mixed second
  derivative to parameters that do not adapt but shape the support loss (ANIL's body,
  which the head's steps depend on), and the same to MAML++'s per-step BN weights.

So the peak is one step's second-order graph plus the trajectory, and the gradient is the
stored-graph one to rounding (tested in float64 to 1e-10). The cost is one extra support
forward and backward per inner step, in the outer backward.

Why not ``torch.utils.checkpoint``: it works by saved-tensor hooks, which
``torch.func.grad``/``vjp`` refuse ("torch.func.{grad, vjp, jacrev, hessian} don't yet
support saved tensor hooks", pytorch#122729, #146036), and the inner loop is
``torch.func.grad_and_value`` under ``vmap``. A custom Function composes with both
(checked in torch 2.15: ``torch.func.grad`` inside its forward, ``torch.func.vjp`` inside
its backward). Called inside ``MetaLearner.run_tasks``' ``vmap``, its ``vmap`` staticmethod
takes it down to the batched level: one Function per step for all the tasks, whose
forward is ``vmap(step)`` and whose backward is ``vjp(vmap(step))``, the transform order
of the stored graph. (``generate_vmap_rule = True`` also gives exact gradients, but
batches the double backward per task, ``vmap(vjp(step))``: on conv4 Omniglot, 5 and 10
steps, 1.46-1.49x the stored-graph CPU time against 1.35-1.38x this way.) Everything the
step reads that is batched or needs a gradient is an explicit input, never a closure: a
closed-over tensor would be a constant of the Function (no gradient), and a batched one
belongs to a ``vmap`` level that is gone when the outer backward runs.

Precision: the recomputation re-enters the autocast state the forward ran under (the
outer backward runs under the training step's autocast, which differs under
``16-mixed``, where the inner loop runs in fp32), so the recomputed step is the forward's.

Which rules: a rule is recomputed through its ``tensors()`` (every tensor it reads that
may need a gradient) and ``with_tensors(tensors)`` (the same rule reading those instead);
see ``lit_meta.inner.UpdateRule``. A rule without them, or one that sets
``not_recomputable`` to a reason (anything that draws random numbers: the backward would
redraw them and differentiate a different step), is refused with one line by
:func:`recompute_problem`. First-order steps are not checkpointed: their gradient is
detached, so no second-order graph is kept to begin with.

The support loss must be deterministic too: the built-in networks are (no dropout). On
CUDA a recomputed step may differ from the forward's in the last bits where cuDNN picks a
non-deterministic kernel; that moves the point the Hessian is taken at by rounding only.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor
from torch.func import grad_and_value, vjp, vmap
from torch.utils import _pytree as pytree  # torch's own pytree: the rule's state is any nest of tensors

Params = dict[str, Tensor]
TENSOR = object()  # marks a tensor's place among a state's leaves


def recompute_problem(rule: Any) -> str | None:
    """Why ``rule`` cannot be recomputed exactly in the outer backward; None if it can."""
    reason = getattr(rule, "not_recomputable", None)
    if reason:
        return f"{type(rule).__name__} cannot be recomputed exactly: {reason}"
    if not (callable(getattr(rule, "tensors", None)) and callable(getattr(rule, "with_tensors", None))):
        return (f"{type(rule).__name__} cannot be recomputed: it does not say which tensors it reads "
                "(tensors() / with_tensors())")
    return None


@dataclass(frozen=True)
class StateLayout:
    """A rule's state (any nest of tensors, with None or numbers in it) as a flat list of
    tensors: the Function's inputs and outputs are tensors only."""

    spec: Any
    constants: tuple[Any, ...]  # the leaves that are not tensors; TENSOR where one is

    @staticmethod
    def of(state: Any) -> StateLayout:
        leaves, spec = pytree.tree_flatten(state)
        return StateLayout(spec, tuple(TENSOR if isinstance(x, Tensor) else x for x in leaves))

    @staticmethod
    def tensors(state: Any) -> list[Tensor]:
        return [x for x in pytree.tree_leaves(state) if isinstance(x, Tensor)]

    @property
    def num_tensors(self) -> int:
        return sum(c is TENSOR for c in self.constants)

    def unflatten(self, tensors: list[Tensor]) -> Any:
        it = iter(tensors)
        return pytree.tree_unflatten([next(it) if c is TENSOR else c for c in self.constants], self.spec)


@dataclass
class StepPlan:
    """Everything about inner step ``step`` that is not a tensor, and the order of the
    Function's tensor inputs: adapted params, other params, rule tensors, state leaves, data."""

    support_loss: Callable[..., Tensor]
    step: int
    names: list[str]
    rest: list[str]
    rule: Any
    rule_names: list[str]
    state: StateLayout
    device_type: str
    autocast: tuple[bool, torch.dtype] | None  # None: the device has no autocast (e.g. meta)
    # (in_dims, randomness) of each vmap level the step runs under, innermost first
    levels: tuple[tuple[tuple[int | None, ...], str], ...] = ()

    def split(self, tensors: tuple[Tensor, ...]) -> tuple[Params, Params, Params, Any, tuple[Tensor, ...]]:
        sizes = (len(self.names), len(self.rest), len(self.rule_names), self.state.num_tensors)
        it = iter(tensors)
        sub, rest, rule, leaves = ([next(it) for _ in range(n)] for n in sizes)
        data = tuple(it)
        return (dict(zip(self.names, sub)), dict(zip(self.rest, rest)), dict(zip(self.rule_names, rule)),
                self.state.unflatten(leaves), data)

    def run(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """The step as a pure function of its tensors: (θ_{k+1}[names]..., L_s(θ_k), state leaves...)."""
        sub, rest, rule_tensors, state, data = self.split(tensors)

        def loss_of(adapted: Params) -> Tensor:
            return self.support_loss({**rest, **adapted}, self.step, *data)

        grads, loss = grad_and_value(loss_of)(sub)
        new, state = self.rule.with_tensors(rule_tensors)(self.step, sub, grads, loss, state)
        if StateLayout.of(state) != self.state:
            raise ValueError(f"{type(self.rule).__name__} changed the structure of its state at step {self.step}")
        return (*(new[n] for n in self.names), loss, *StateLayout.tensors(state))

    def batched(self) -> Callable[..., tuple[Tensor, ...]]:
        """``run`` under the vmap levels it was called from: one batched step for all tasks."""
        fn = self.run
        for in_dims, randomness in self.levels:
            fn = vmap(fn, in_dims=in_dims, randomness=randomness)
        return fn

    def precision(self) -> AbstractContextManager:
        if self.autocast is None:
            return nullcontext()
        enabled, dtype = self.autocast
        return torch.autocast(self.device_type, dtype=dtype, enabled=enabled)


class RecomputedStep(torch.autograd.Function):
    """One inner step that saves its inputs and recomputes itself in the backward."""

    @staticmethod
    def forward(plan: StepPlan, *tensors: Tensor) -> tuple[Tensor, ...]:
        return plan.batched()(*tensors)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], plan: StepPlan, *tensors: Tensor):
        # Under vmap: apply the Function once at the batched level, the step vmapped
        # inside it (see the module docstring for why not generate_vmap_rule).
        level = (tuple(in_dims[1:]), info.randomness)
        out = RecomputedStep.apply(replace(plan, levels=plan.levels + (level,)), *tensors)
        return out, (0,) * len(out)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.plan = inputs[0]
        ctx.save_for_backward(*inputs[1:])
        # Outputs nothing differentiates (the support loss, in MAML) get None, not zeros:
        # a zero cotangent would still walk the support forward's backward.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, *cotangents: Tensor | None) -> tuple[Tensor | None, ...]:
        plan: StepPlan = ctx.plan
        saved = ctx.saved_tensors
        # Only what needs a gradient: differentiating the support images too would add a
        # convolution input-gradient per layer that stored-graph backprop never computes.
        wrt = [i for i, need in enumerate(ctx.needs_input_grad[1:]) if need]
        used = [j for j, c in enumerate(cotangents) if c is not None]
        grads: list[Tensor | None] = [None] * len(saved)
        if wrt and used:
            def step_of(*chosen: Tensor) -> tuple[Tensor, ...]:
                full = list(saved)
                for i, t in zip(wrt, chosen):
                    full[i] = t
                out = plan.batched()(*full)
                return tuple(out[j] for j in used)

            with plan.precision():
                _, pullback = vjp(step_of, *(saved[i] for i in wrt))
                for i, g in zip(wrt, pullback(tuple(cotangents[j] for j in used))):
                    grads[i] = g
        return (None, *grads)


def recomputed_step(support_loss: Callable[..., Tensor], step: int, fast: Params, names: list[str], rule: Any,
                    state: Any, data: tuple[Tensor, ...]) -> tuple[Params, Tensor, Any]:
    """One inner step through :class:`RecomputedStep`: (new adapted params, support loss, state)."""
    adapted = set(names)
    rest = [n for n in fast if n not in adapted]
    rule_tensors = rule.tensors()
    layout = StateLayout.of(state)
    sub = [fast[n] for n in names]
    device_type = sub[0].device.type
    autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)) \
        if torch.amp.is_autocast_available(device_type) else None
    plan = StepPlan(support_loss, step, list(names), rest, rule, list(rule_tensors), layout, device_type, autocast)
    out = RecomputedStep.apply(plan, *sub, *(fast[n] for n in rest), *rule_tensors.values(),
                               *StateLayout.tensors(state), *data)
    new = dict(zip(names, out[: len(names)]))
    return new, out[len(names)], layout.unflatten(list(out[len(names) + 1:]))
