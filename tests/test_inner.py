"""The engine's gradients against hand-built references (learn2learn's habit)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from lit_meta.algorithms import MAML
from lit_meta.inner import SGD, Adam, adapt
from lit_meta.tasks import TaskBatch, task_spec
from tests.episodes import adapt_one, run


def tiny_maml(inner_steps: int = 2, first_order: bool = False, lr: float = 0.3) -> MAML:
    spec = task_spec("toy", "regression", [2], ways=1)
    model = MAML(spec, backbone="mlp", backbone_kwargs={"hidden": (3,)}, inner_lr=lr,
                 inner_steps=inner_steps, first_order=first_order).double()
    return model


def toy_batch(tasks: int = 3, n: int = 4) -> TaskBatch:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tasks, 2 * n, 2, generator=g, dtype=torch.float64)
    y = torch.randn(tasks, 2 * n, 1, generator=g, dtype=torch.float64)
    return TaskBatch(x[:, :n], y[:, :n], x[:, n:], y[:, n:])


def reference_meta_grad(model: MAML, batch: TaskBatch, steps: int, first_order: bool):
    """Per-task Python loop with plain autograd: θ' = θ − α∇L_s, ∇_θ mean_i L_q(θ'_i)."""
    params = dict(model.net.named_parameters())
    total = 0.0
    for i in range(batch.num_tasks):
        fast = dict(params)
        for _ in range(steps):
            loss = F.mse_loss(functional_call(model.net, fast, (batch.support_x[i],)), batch.support_y[i])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {n: p - model.inner_lr * g for (n, p), g in zip(fast.items(), grads)}
        total = total + F.mse_loss(functional_call(model.net, fast, (batch.query_x[i],)), batch.query_y[i])
    total = total / batch.num_tasks
    return dict(zip(params, torch.autograd.grad(total, list(params.values())))), total


def engine_meta_grad(model: MAML, batch: TaskBatch, steps: int, first_order: bool):
    out = run(model, batch, steps, first_order=first_order, training=True)
    loss = out["query_loss"].mean()
    params = dict(model.net.named_parameters())
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())))), out


def test_second_order_matches_per_task_autograd_reference():
    model, batch = tiny_maml(inner_steps=2), toy_batch()
    ours, _ = engine_meta_grad(model, batch, 2, first_order=False)
    ref, _ = reference_meta_grad(model, batch, 2, first_order=False)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-10, atol=1e-12)


def test_second_order_matches_finite_differences():
    model, batch = tiny_maml(inner_steps=2), toy_batch(tasks=2)
    ours, _ = engine_meta_grad(model, batch, 2, first_order=False)
    eps = 1e-6
    for name, p in model.net.named_parameters():
        flat = p.data.view(-1)
        for k in range(flat.numel()):
            old = flat[k].item()
            flat[k] = old + eps
            up = run(model, batch, 2, True, True)["query_loss"].mean().item()
            flat[k] = old - eps
            down = run(model, batch, 2, True, True)["query_loss"].mean().item()
            flat[k] = old
            # first_order only changes the gradient, not the loss value, so this is the MAML objective.
            assert abs((up - down) / (2 * eps) - ours[name].view(-1)[k].item()) < 1e-6


def test_second_order_differs_from_first_order():
    model, batch = tiny_maml(inner_steps=2), toy_batch()
    second, _ = engine_meta_grad(model, batch, 2, first_order=False)
    first, _ = engine_meta_grad(model, batch, 2, first_order=True)
    assert any((second[n] - first[n]).abs().max() > 1e-6 for n in second)


def test_first_order_gradient_is_query_gradient_at_adapted_params():
    model, batch = tiny_maml(inner_steps=2, first_order=True), toy_batch()
    ours, _ = engine_meta_grad(model, batch, 2, first_order=True)
    ref, _ = reference_meta_grad(model, batch, 2, first_order=True)
    # Explicitly: mean over tasks of ∇_{θ'} L_q(θ'), θ' computed without graph.
    params = {n: p.detach() for n, p in model.net.named_parameters()}
    manual = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(batch.num_tasks):
        fast = dict(params)
        for _ in range(2):
            fast = {n: p.detach().requires_grad_() for n, p in fast.items()}
            loss = F.mse_loss(functional_call(model.net, fast, (batch.support_x[i],)), batch.support_y[i])
            grads = torch.autograd.grad(loss, list(fast.values()))
            fast = {n: (p - 0.3 * g).detach() for (n, p), g in zip(fast.items(), grads)}
        fast = {n: p.requires_grad_() for n, p in fast.items()}
        q = F.mse_loss(functional_call(model.net, fast, (batch.query_x[i],)), batch.query_y[i])
        for n, g in zip(fast, torch.autograd.grad(q, list(fast.values()))):
            manual[n] += g / batch.num_tasks
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours[name], manual[name], rtol=1e-10, atol=1e-12)


def test_vmap_equals_python_loop_over_tasks():
    model, batch = tiny_maml(inner_steps=3), toy_batch(tasks=5)
    out = run(model, batch, 3, first_order=False, training=True)
    params = dict(model.net.named_parameters())
    grads_vmap = torch.autograd.grad(out["query_loss"].sum(), list(params.values()))
    losses, grads_loop = [], [torch.zeros_like(p) for p in params.values()]
    for i in range(batch.num_tasks):
        one = run(model, batch.slice(i, i + 1), 3, first_order=False, training=True)
        losses.append(one["query_loss"][0])
        for acc, g in zip(grads_loop, torch.autograd.grad(one["query_loss"][0], list(params.values()))):
            acc += g
    torch.testing.assert_close(out["query_loss"], torch.stack(losses), rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_vmap, grads_loop):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_adaptation_lowers_support_loss_and_updates_are_theta_minus_theta_prime():
    model, batch = tiny_maml(inner_steps=5, lr=0.05), toy_batch()
    out = run(model, batch, 5, first_order=True, training=False)
    assert (out["query_loss"].shape, out["before_loss"].shape) == ((3,), (3,))
    params = {n: p.detach() for n, p in model.net.named_parameters()}
    adapted = adapt_one(model, params, batch.support_x[0], batch.support_y[0], 5, True, False)
    assert adapted.support_losses[-1] < adapted.support_losses[0]
    for n in params:
        torch.testing.assert_close(out["updates"][n][0], params[n] - adapted.params[n])


def test_adam_rule_matches_torch_adam():
    torch.manual_seed(0)
    w = torch.randn(5, dtype=torch.float64)
    target = torch.randn(5, dtype=torch.float64)

    def loss(p, step):
        return ((p["w"] - target) ** 4).sum()

    ours = adapt(loss, {"w": w.clone()}, 4, Adam(lr=0.1, betas=(0.0, 0.999)), first_order=True).params["w"]
    ref = w.clone().requires_grad_()
    opt = torch.optim.Adam([ref], lr=0.1, betas=(0.0, 0.999), eps=1e-8)
    for _ in range(4):
        opt.zero_grad()
        ((ref - target) ** 4).sum().backward()
        opt.step()
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-10, atol=1e-12)


def test_sgd_rule_accepts_per_parameter_and_per_step_rates():
    params = {"a": torch.ones(2), "b": torch.ones(2)}
    grads = {"a": torch.ones(2), "b": torch.ones(2)}
    new, _ = SGD({"a": torch.tensor(0.5), "b": torch.tensor(0.25)})(0, params, grads, torch.zeros(()), None)
    assert new["a"].tolist() == [0.5, 0.5] and new["b"].tolist() == [0.75, 0.75]
    new, _ = SGD(lambda step, name: 0.1 * (step + 1))(2, params, grads, torch.zeros(()), None)
    torch.testing.assert_close(new["a"], torch.full((2,), 0.7))


def test_second_order_through_conv4_batchnorm_matches_per_task_autograd():
    """Second order through conv + BatchNorm under vmap (pytorch/functorch#534 breaks
    nn.BatchNorm2d here): exact against plain autograd, and a conv bias that feeds batch
    norm gets exactly zero meta-gradient."""
    spec = task_spec("toy-images", "classification", [1, 12, 12], ways=3)
    model = MAML(spec, backbone_kwargs={"filters": 4, "blocks": 2}, inner_lr=0.4, inner_steps=2).double()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat(2, 2)
    batch = TaskBatch(torch.randn(2, 6, 1, 12, 12, generator=g, dtype=torch.float64), y,
                      torch.randn(2, 6, 1, 12, 12, generator=g, dtype=torch.float64), y.clone())
    ours, _ = engine_meta_grad(model, batch, 2, first_order=False)
    params = dict(model.net.named_parameters())
    total = 0.0
    for i in range(2):
        fast = dict(params)
        for step in range(2):
            loss = F.cross_entropy(functional_call(model.net, fast, (batch.support_x[i],)), batch.support_y[i])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - 0.4 * gr for (n, p), gr in zip(fast.items(), grads)}
        total = total + F.cross_entropy(functional_call(model.net, fast, (batch.query_x[i],)), batch.query_y[i]) / 2
    ref = dict(zip(params, torch.autograd.grad(total, list(params.values()))))
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-9, atol=1e-11)
    assert ours["body.0.bias"].abs().max() < 1e-12
