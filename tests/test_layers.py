"""``PerStepBatchNorm`` (lit_meta/models/layers.py) against torch's native batch norm."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lit_meta.models.layers import Norm, PerStepBatchNorm


def test_batch_norm_matches_native_to_second_order():
    """Output, gradient and the gradient of a gradient norm (what MAML's second order
    differentiates) equal ``F.batch_norm`` in training mode, in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 4, 5, 5, generator=g, dtype=torch.float64)
    norm = PerStepBatchNorm(4, steps=0, per_step_weights=False, per_step_stats=False).double()

    def second_order(forward):
        y = forward(x, weight, bias)
        grads = torch.autograd.grad(((y - target) ** 2).sum(), (x, weight, bias), create_graph=True)
        meta = torch.autograd.grad(sum((gr * gr).sum() for gr in grads), (x, weight, bias))
        return (y, *grads, *meta)

    ours = second_order(lambda x, w, b: torch.func.functional_call(norm, {"weight": w, "bias": b}, (x,)))
    native = second_order(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True, eps=norm.eps))
    for a, b in zip(ours, native):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_recorded_stats_and_running_stats_path():
    norm = PerStepBatchNorm(3, steps=2)
    x = torch.randn(8, 3, 4, 4)
    recorded: list = []
    norm(x, step=1, norm=Norm(record=recorded))
    [(slot, mean, var)] = recorded
    assert slot == 1
    torch.testing.assert_close(mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False))
    norm.update_running_stats(slot, mean, var)
    expected = (x - norm.running_mean[1].view(1, -1, 1, 1)) * torch.rsqrt(norm.running_var[1].view(1, -1, 1, 1) + norm.eps)
    torch.testing.assert_close(norm(x, step=1, norm=Norm(running=True)), expected)
    # the layer holds no mode of its own: the next forward normalises with the batch again
    torch.testing.assert_close(norm(x, step=1), F.batch_norm(x, None, None, training=True, eps=norm.eps))
