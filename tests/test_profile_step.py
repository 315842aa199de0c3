"""benchmarks/profile_step.py attributes a step's time to the convolution kernels or not."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks import profile_step


def test_convolution_share_separates_convolution_from_elementwise_work(one_thread):
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    weight = torch.randn(16, 16, 3, 3, requires_grad=True)

    def convolutions() -> None:
        F.conv2d(x, weight, padding=1).sum().backward()

    def elementwise() -> None:
        (x * 2.0 + 1.0).relu().sum().backward()

    conv = profile_step.profile_side(convolutions, warmup=1, steps=3)
    other = profile_step.profile_side(elementwise, warmup=1, steps=3)
    assert conv["convolution_share"] > 0.7, conv
    assert other["convolution_ms"] == 0.0 and other["convolution_share"] == 0.0, other
    assert conv["step_ms"] > 0 and "aten::convolution_backward" in conv["top_self_ms"]


def test_count_ops_counts_each_dispatched_operator_of_one_step(one_thread):
    x = torch.randn(4, 3, requires_grad=True)
    forward = profile_step.count_ops(lambda: (x * 2.0 + 1.0).sum(), warmup=1)
    assert forward == {"ops": 3, "most_frequent": {"aten.mul": 1, "aten.add": 1, "aten.sum": 1}}
    # the backward adds its own: the seed gradient, the sum's expand, the mul's grad * 2, the accumulation
    both = profile_step.count_ops(lambda: (x * 2.0 + 1.0).sum().backward(), warmup=1)
    assert both["ops"] > forward["ops"] and both["most_frequent"]["aten.mul"] == 2
