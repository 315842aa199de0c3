"""benchmarks/conv_layouts.py: the four layouts of a vmapped convolution compute one function."""
from __future__ import annotations

from benchmarks import conv_layouts


def test_grouped_and_per_task_convolutions_in_either_layout_agree(one_thread):
    result = conv_layouts.measure(tasks=3, images=4, channels=4, size=6, repeats=1)
    assert set(result["layouts"]) == {"grouped_contiguous", "grouped_channels_last", "per_task_contiguous",
                                      "per_task_channels_last"}
    for name, row in result["layouts"].items():
        assert row["max_rel_diff"] < 1e-5, (name, row)  # outputs and both gradients
        assert row["forward_ms"] > 0 and row["forward_backward_ms"] > 0, (name, row)
