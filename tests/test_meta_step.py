"""The shared meta-step: task weights against hand computations, and what lands in .grad."""
from __future__ import annotations

import pytest
import torch

from lit_meta.meta_step import MetaStep, gradient_agreement_weights, task_weights
from tests.test_inner import tiny_maml, toy_batch
from tests.episodes import run


def test_gradient_agreement_matches_hand_computation():
    g = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    # Gram rows: [1, 1, -1], [1, 2, -1], [-1, -1, 1]; row sums 1, 2, -1; Σ|G| = 10.
    w = gradient_agreement_weights(g)
    torch.testing.assert_close(w, torch.tensor([0.1, 0.2, -0.1]))
    # The task whose update opposes the others gets the lowest, negative, weight.
    assert w.argmin() == 2 and w[2] < 0


def test_gradient_agreement_of_agreeing_tasks_is_uniform():
    g = torch.tensor([[2.0, 1.0]] * 4)
    torch.testing.assert_close(gradient_agreement_weights(g), torch.full((4,), 0.25))


def test_uniform_weights_are_the_mean():
    torch.testing.assert_close(task_weights("uniform", None, 4), torch.full((4,), 0.25))


def test_unknown_weighting_is_rejected():
    with pytest.raises(ValueError, match="weighting must be one of"):
        MetaStep("agreement")


def _grads_after(model, step: MetaStep, out) -> dict[str, torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step(model, out["updates"], query_losses=out["query_loss"], optimizer=opt)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_uniform_meta_step_reproduces_plain_mean_gradient():
    model, batch = tiny_maml(inner_steps=1), toy_batch(tasks=4)
    out = run(model, batch, 1, first_order=False, training=True)
    ours = _grads_after(model, MetaStep("uniform"), out)
    out = run(model, batch, 1, first_order=False, training=True)
    ref = torch.autograd.grad(out["query_loss"].mean(), list(model.parameters()))
    for (name, g), r in zip(ours.items(), ref):
        torch.testing.assert_close(g, r)


def test_gradient_agreement_meta_step_weights_the_task_gradients():
    model, batch = tiny_maml(inner_steps=1), toy_batch(tasks=4)
    out = run(model, batch, 1, first_order=False, training=True)
    ours = _grads_after(model, MetaStep("gradient_agreement"), out)
    out = run(model, batch, 1, first_order=False, training=True)
    updates = torch.cat([u.reshape(4, -1) for u in out["updates"].values()], 1)
    gram = updates @ updates.T
    w = gram.sum(1) / gram.abs().sum()
    assert w.std() > 0  # the weights really differ from uniform here
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(4):
        for acc, g in zip(expected, torch.autograd.grad(out["query_loss"][i], list(model.parameters()), retain_graph=True)):
            acc += w[i] * g
    for (name, g), e in zip(ours.items(), expected):
        torch.testing.assert_close(g, e)


def test_task_gradient_contributions_are_weighted_sums_and_step_the_optimizer():
    model = tiny_maml()
    params = dict(model.named_parameters())
    contributions = {n: torch.randn(3, *p.shape, dtype=p.dtype) for n, p in params.items()}
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    w = MetaStep("gradient_agreement")(model, contributions, task_grads=contributions, optimizer=opt)
    flat = torch.cat([c.reshape(3, -1) for c in contributions.values()], 1)
    torch.testing.assert_close(w, gradient_agreement_weights(flat))
    for n, p in params.items():
        expected_grad = (w.view(3, *[1] * p.dim()) * contributions[n]).sum(0)
        torch.testing.assert_close(p.detach(), before[n] - 0.5 * expected_grad)
