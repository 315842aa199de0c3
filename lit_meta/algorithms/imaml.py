"""iMAML (Rajeswaran, Finn, Kakade & Levine 2019, "Meta-Learning with Implicit Gradients").

The inner loop minimises the support loss plus a proximal term around the meta-parameters,
φ* ≈ argmin_φ L_s(φ) + (λ/2)‖φ − θ‖² (``inner_penalty``; ``inner_steps`` of the one inner
loop, first order, with no graph kept: memory does not grow with the number of steps). At
the solution ∇L_s(φ*) + λ(φ* − θ) = 0, so dφ*/dθ = (I + H/λ)⁻¹ with H the support loss's
Hessian at φ*, and the meta-gradient of the query loss is the solution v of

    (I + H/λ) v = ∇_φ L_q(φ*)

found by ``cg_steps`` steps of conjugate gradient (the paper's Algorithm 2), each with one
Hessian-vector product of the support loss (``torch.func.grad`` of ∇L·v, inside the task's
``vmap``): :func:`implicit_gradient`. Each task's v is its contribution to the shared
meta-step (``task_gradient``, weighted like Reptile's θ − θ'ᵢ: uniform or Gradient Agreement).

As the reference code (aravindr93/imaml_dev ``examples/omniglot_implicit_maml.py`` and
``measure_accuracy.py``): SGD inner steps (16 at α = 0.1 on Omniglot, λ = 2, 5 CG steps),
Adam outer steps, and no proximal term at test time (``eval_proximal: false``). That code also
damps the system, A = (1 + cg_damping) I + H/(λ + lam_damping) with 1.0 and 10.0, and pulls
the weights back towards θ in one extra step instead of adding the term to every step; here
the paper's form is the default (both dampings 0, the term in every step), and the dampings
are options.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.func import grad

from lit_meta.algorithms.base import MetaLearner
from lit_meta.episode import EpisodeContext, run_tasks
from lit_meta.inner import Adapted, Params
from lit_meta.tasks import TaskBatch


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[n] * b[n]).sum() for n in a)


def implicit_gradient(support_loss: Callable[[Params], Tensor], query_grad: Params, phi: Params, lam: float,
                      steps: int, damping: float = 0.0, lam_damping: float = 0.0) -> tuple[Params, Tensor]:
    """(v, ‖A v − g‖) for A = (1 + damping) I + H/(λ + lam_damping), H the Hessian of
    ``support_loss`` at ``phi`` and g = ``query_grad``, after ``steps`` steps of conjugate gradient
    from v = 0 (a fixed count: no branch on a tensor value, so it runs inside ``vmap``), or fewer
    where a direction of non-positive curvature stops it (then v is the last iterate before it)."""
    gradient = grad(support_loss)

    def apply(v: Params) -> Params:
        # Hv as the gradient of ∇L·v (reverse over reverse, the double backward MAML's second
        # order uses; forward-over-reverse hits functorch's immutable zero tensors in some
        # backward formulas)
        hv = grad(lambda p: _dot(gradient(p), v))(phi)
        return {n: (1 + damping) * v[n] + hv[n] / (lam + lam_damping) for n in v}

    v = {n: torch.zeros_like(g) for n, g in query_grad.items()}
    r = dict(query_grad)
    p = dict(r)
    rr = _dot(r, r)
    tiny = torch.finfo(rr.dtype).tiny
    # A is positive definite only where the support loss is locally convex enough (H > -λ);
    # along a direction of non-positive curvature CG's step would be infinite or uphill, so the
    # iteration stops there (truncated CG, Steihaug 1983), keeping the last v: a flag, not a branch.
    stopped = torch.zeros((), dtype=torch.bool, device=rr.device)
    for _ in range(steps):
        ap = apply(p)
        pap = _dot(p, ap)
        stopped = stopped | (pap <= tiny) | (rr <= tiny)
        alpha = torch.where(stopped, torch.zeros_like(rr), rr / pap.clamp_min(tiny))
        v = {n: v[n] + alpha * p[n] for n in v}
        r = {n: r[n] - alpha * ap[n] for n in r}
        new = _dot(r, r)
        p = {n: r[n] + (new / rr.clamp_min(tiny)) * p[n] for n in p}
        rr = new
    residual = apply(v)
    return v, torch.sqrt(sum(((residual[n] - query_grad[n]) ** 2).sum() for n in v))


class IMAML(MetaLearner):
    algorithm = "imaml"

    def __init__(self, lam: float = 2.0, cg_steps: int = 5, eval_proximal: bool = False, cg_damping: float = 0.0,
                 lam_damping: float = 0.0, first_order: bool = True, **kwargs: Any) -> None:
        if not lam > 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        if cg_steps < 1:
            raise ValueError(f"cg_steps must be >= 1, got {cg_steps}")
        if not first_order:
            raise ValueError("iMAML's meta-gradient is implicit: its inner loop is first order (first_order: true)")
        super().__init__(first_order=True, **kwargs)
        if kwargs.get("adapt", "all") != "all" or not self.adapt_bn:
            raise ValueError("iMAML's implicit gradient is for parameters that all adapt: set adapt: all, "
                             "adapt_bn: true")
        self.lam, self.cg_steps, self.eval_proximal = lam, cg_steps, eval_proximal
        self.cg_damping, self.lam_damping = cg_damping, lam_damping

    def inner_penalty(self, params: Params, start: Params, ctx: EpisodeContext) -> Tensor | None:
        if not (ctx.training or self.eval_proximal):
            return None
        return 0.5 * self.lam * sum(((params[n] - start[n].detach()) ** 2).sum() for n in start)

    def task_gradient(self, adapted: Adapted, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                      query_y: Tensor, ctx: EpisodeContext) -> Params:
        phi = {n: adapted.params[n].detach() for n in self.adapt_names()}
        steps = self.inner_steps

        def query_loss(p: Params) -> Tensor:
            return self.loss_fn(self.predict(p, support_x, support_y, query_x, steps, ctx), query_y)

        def support_loss(p: Params) -> Tensor:
            return self.support_loss_fn(self.forward_fn(p, support_x, steps), support_y)

        v, _ = implicit_gradient(support_loss, grad(query_loss)(phi), phi, self.lam, self.cg_steps,
                                 self.cg_damping, self.lam_damping)
        return {n: g.detach() for n, g in v.items()}

    def outer_update(self, batch: TaskBatch, ctx: EpisodeContext | None = None) -> dict[str, Tensor]:
        ctx = self.context(True, batch) if ctx is None else ctx
        # no graph to θ: the inner loop's memory is its parameters, whatever the number of steps
        out = run_tasks(self, batch, ctx, self.inner_steps, first_order=True, differentiable=False)
        self.meta_step(self, out["updates"], task_grads={f"net.{n}": g for n, g in out["task_grads"].items()})
        return out
