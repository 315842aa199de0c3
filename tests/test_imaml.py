"""iMAML (lit_meta/algorithms/imaml.py): the implicit meta-gradient, on problems small enough to
solve exactly in float64.

The bound: v* = A⁻¹g solves the system and CG's v leaves the residual r = Av − g, so
‖v − v*‖ = ‖A⁻¹r‖ ≤ ‖r‖ / λ_min(A); with the inner problem solved (∇L_s + λ(φ − θ) = 0), v*
is the exact meta-gradient of L_q(φ*(θ)). Each test checks v against the exact value within
that bound (and a margin for the inner solve's own error)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian

from lit_meta.algorithms import IMAML
from lit_meta.algorithms.imaml import implicit_gradient
from lit_meta.episode import run_tasks
from lit_meta.tasks import TaskBatch, task_spec
from lit_meta.update_rules import flatten, unflatten

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cg_solves_the_linear_system_of_a_quadratic_within_its_residual():
    """L_s(φ) = ½ φᵀQφ − bᵀφ: H = Q exactly; v must equal (I + Q/λ)⁻¹ g up to ‖r‖/λ_min(A)."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    q, b = m @ m.T + 0.1 * torch.eye(6, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    query = {"w": torch.randn(6, generator=g, dtype=torch.float64)}
    lam = 2.0
    a = torch.eye(6, dtype=torch.float64) + q / lam
    exact = torch.linalg.solve(a, query["w"])
    for steps in (2, 6):
        v, residual = implicit_gradient(lambda p: 0.5 * p["w"] @ q @ p["w"] - b @ p["w"], query,
                                        {"w": torch.zeros(6, dtype=torch.float64)}, lam, steps)
        bound = residual / torch.linalg.eigvalsh(a).min()
        assert (v["w"] - exact).norm() <= bound * (1 + 1e-6) + 1e-12
    assert residual < 1e-8  # 6 steps of CG on a 6-dimensional system: exact up to rounding


def test_cg_stops_at_non_positive_curvature_instead_of_an_infinite_step():
    """A = I + H/λ is indefinite when the support loss curves down faster than λ (a small λ on a
    non-convex network): the step that meets p·Ap ≤ 0 is not taken, so v stays finite, and the
    steps before it are CG's."""
    h = torch.diag(torch.tensor([1.0, -3.0], dtype=torch.float64))  # A = diag(2, -2) at λ = 1
    g = {"w": torch.tensor([1.0, 1.0], dtype=torch.float64)}  # p·Ap = 0 at the first step

    def loss(p):
        return 0.5 * p["w"] @ h @ p["w"]

    v, _ = implicit_gradient(loss, g, {"w": torch.zeros(2, dtype=torch.float64)}, 1.0, 5)
    assert torch.equal(v["w"], torch.zeros(2, dtype=torch.float64))
    g = {"w": torch.tensor([1.0, 0.5], dtype=torch.float64)}  # first step taken (p·Ap = 1.5), then it stops
    v, _ = implicit_gradient(loss, g, {"w": torch.zeros(2, dtype=torch.float64)}, 1.0, 5)
    assert torch.isfinite(v["w"]).all()
    torch.testing.assert_close(v["w"], (1.25 / 1.5) * g["w"])


def test_the_implicit_gradient_of_a_converged_inner_loop_is_the_exact_meta_gradient():
    """A 2-3-2 network in float64, its inner loop (proximal SGD) run to convergence: the
    meta-gradient iMAML writes equals d L_q(φ*(θ)) / dθ = (I + H/λ)⁻¹ ∇L_q(φ*) with H the
    exact Hessian (torch.func.hessian), to the tolerance that CG's residual explains."""
    torch.manual_seed(0)
    spec = task_spec("toy", "regression", [2], ways=2)
    lam, steps = 4.0, 600
    model = IMAML(task_spec=spec, backbone_kwargs={"hidden": (3,)}, lam=lam, inner_lr=0.05, inner_steps=steps,
                  cg_steps=40, meta_batch_size=1, meta_optimizer="sgd", meta_lr=1.0).double()
    g = torch.Generator().manual_seed(1)
    sx, qx = torch.randn(1, 8, 2, generator=g, dtype=torch.float64), torch.randn(1, 8, 2, generator=g, dtype=torch.float64)
    sy, qy = torch.randn(1, 8, 2, generator=g, dtype=torch.float64), torch.randn(1, 8, 2, generator=g, dtype=torch.float64)
    b = TaskBatch(sx, sy, qx, qy)
    theta = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    out = run_tasks(model, b, model.context(True, b), steps, True, differentiable=False)
    phi = {n: theta[n] - out["updates"][n][0] for n in theta}

    def support(p):
        return F.mse_loss(functional_call(model.net, p, (sx[0],)), sy[0])

    def query(p):
        return F.mse_loss(functional_call(model.net, p, (qx[0],)), qy[0])

    # the inner problem is solved: ∇L_s(φ) + λ(φ − θ) = 0
    stationarity = flatten(grad(support)(phi)) + lam * (flatten(phi) - flatten(theta))
    assert stationarity.norm() < 1e-8
    flat_hessian = hessian(lambda f: support(unflatten(f, phi)))(flatten(phi))
    a = torch.eye(flat_hessian.shape[0], dtype=torch.float64) + flat_hessian / lam
    exact = torch.linalg.solve(a, flatten(grad(query)(phi)))
    got = flatten({n: out["task_grads"][n][0] for n in phi})
    _, residual = implicit_gradient(support, grad(query)(phi), phi, lam, 40)
    bound = residual / torch.linalg.eigvalsh(a).min()
    assert (got - exact).norm() <= bound + 1e-8, ((got - exact).norm(), bound)
    assert (got - exact).norm() / exact.norm() < 1e-6
    # and the meta-step hands exactly that to the meta-optimizer (SGD at 1: θ ← θ − v)
    model.outer_update(b)
    after = flatten({n: p.detach() for n, p in model.net.named_parameters()})
    torch.testing.assert_close(flatten(theta) - after, got, rtol=1e-9, atol=1e-12)


def test_the_implicit_gradient_matches_differentiating_through_a_long_inner_loop():
    """The same meta-gradient by brute force: second-order autograd through all 300 proximal
    SGD steps (the unrolled one converges to the implicit one as the inner loop converges)."""
    torch.manual_seed(0)
    spec = task_spec("toy", "regression", [2], ways=1)
    lam, steps, lr = 4.0, 300, 0.05
    model = IMAML(task_spec=spec, backbone_kwargs={"hidden": (3,)}, lam=lam, inner_lr=lr, inner_steps=steps,
                  cg_steps=30, meta_batch_size=1).double()
    g = torch.Generator().manual_seed(2)
    sx, qx = torch.randn(1, 6, 2, generator=g, dtype=torch.float64), torch.randn(1, 6, 2, generator=g, dtype=torch.float64)
    sy, qy = torch.randn(1, 6, 1, generator=g, dtype=torch.float64), torch.randn(1, 6, 1, generator=g, dtype=torch.float64)
    b = TaskBatch(sx, sy, qx, qy)
    out = run_tasks(model, b, model.context(True, b), steps, True, differentiable=False)
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.net.named_parameters()}
    phi = dict(theta)
    for _ in range(steps):
        loss = F.mse_loss(functional_call(model.net, phi, (sx[0],)), sy[0]) + \
            0.5 * lam * sum(((phi[n] - theta[n]) ** 2).sum() for n in phi)
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
        phi = {n: p - lr * gr for (n, p), gr in zip(phi.items(), grads)}
    unrolled = torch.autograd.grad(F.mse_loss(functional_call(model.net, phi, (qx[0],)), qy[0]), list(theta.values()))
    got = torch.cat([out["task_grads"][n][0].flatten() for n in theta])
    expected = torch.cat([u.flatten() for u in unrolled])
    assert (got - expected).norm() / expected.norm() < 1e-5


def test_memory_does_not_keep_the_inner_trajectory():
    """No graph to θ and no trajectory: the tensors alive after the inner loop do not grow with
    its length (counted through the autograd graph: none is built)."""
    model = IMAML(task_spec=task_spec("toy", "regression", [2], ways=1), inner_steps=50, meta_batch_size=2)
    b = TaskBatch(torch.randn(2, 5, 2), torch.randn(2, 5, 1), torch.randn(2, 5, 2), torch.randn(2, 5, 1))
    out = run_tasks(model, b, model.context(True, b), 50, True, differentiable=False)
    assert all(g.grad_fn is None for g in out["task_grads"].values())
    assert all(u.grad_fn is None for u in out["updates"].values())


def test_imaml_options_are_checked():
    spec = task_spec("toy", "regression", [2], ways=1)
    with pytest.raises(ValueError, match="first_order: true"):
        IMAML(task_spec=spec, first_order=False)
    with pytest.raises(ValueError, match="adapt: all"):
        IMAML(task_spec=spec, adapt="head")
    with pytest.raises(ValueError, match="lam must be > 0"):
        IMAML(task_spec=spec, lam=0.0)
    assert math.isclose(IMAML(task_spec=spec).lam, 2.0)


def test_the_cg_probe_finds_indefinite_systems_and_solves_definite_ones():
    """benchmarks/imaml_cg.py (docs/RESULTS.md's diagnostic of the Omniglot run): with λ = 100,
    A ≈ I is definite and 5 steps solve it; with λ = 0.01 the sine network's support Hessian makes
    A indefinite and CG meets non-positive curvature on every task."""
    import importlib.util

    from lit_meta.data.sine import SineDataModule
    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("imaml_cg", REPO / "benchmarks" / "imaml_cg.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    torch.manual_seed(0)
    dm = SineDataModule(meta_batch_size=8)
    rows = {lam: probe.probe(IMAML(task_spec=dm.task_spec, inner_steps=5, inner_lr=0.01, cg_steps=5, lam=lam,
                                   meta_batch_size=8), dm.train_batch(0)) for lam in (0.01, 100.0)}
    assert rows[100.0]["stopped"] == 0 and rows[100.0]["residual_max"] < 1e-4
    assert rows[0.01]["stopped"] >= 6 and rows[0.01]["residual_median"] > 0.1
