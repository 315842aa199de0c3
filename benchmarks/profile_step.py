"""Where a meta-training step's time goes, ours and learn2learn's, by ATen operator.

    python benchmarks/profile_step.py --threads 1 --steps 5

Builds both sides exactly as ``benchmarks/speed.py`` does (``lit_meta.bench``: the same
case flags, network and tasks), runs ``--warmup`` steps, then profiles ``--steps`` steps of each side with
``torch.profiler`` (CPU activities, no shapes). Prints one JSON line per side: profiled
ms per step, the convolution kernels' self time per step (``mkldnn_convolution``,
``convolution_backward`` and the ``convolution`` wrappers' own time), the share of that
in the step, and the ten operators with the most self time.

``--count-ops``: instead, the ATen operators one step dispatches, per side (a
``TorchDispatchMode`` around one step after the warm-up: forward, inner gradients, backward,
optimizer), the total and the most frequent. On a GPU where each operator is a kernel launch
and the kernels are small, the step's time follows this count (docs/RESULTS.md, "GPU figures").

Shapes are not recorded: with ``record_shapes=True`` our vmapped step profiled 4.4x
slower (1159 vs 261 ms, elementwise operators most), learn2learn's 2.1x, so the
per-shape times would mislead.

Why: a speed target is a claim about the whole step; the convolution share says how much
of it any change outside the convolution kernels can still remove.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

from lit_meta.bench.case import add_case_arguments, case_from_args
from lit_meta.bench.measure import add_timing_arguments, build_sides

CONVOLUTION_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution",
                   "aten::convolution", "aten::thnn_conv2d", "aten::_slow_conv2d_forward",
                   "aten::_slow_conv2d_backward")


def profile_side(step: Callable[[], None], warmup: int, steps: int) -> dict[str, Any]:
    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    rows = [(e.key, e.self_cpu_time_total / 1e3 / steps) for e in prof.key_averages()]
    total = sum(ms for _, ms in rows)
    conv = sum(ms for key, ms in rows if key in CONVOLUTION_OPS)
    top = sorted(rows, key=lambda r: -r[1])[:10]
    return {"step_ms": round(total, 1), "convolution_ms": round(conv, 1),
            "convolution_share": round(conv / total, 3),
            "top_self_ms": {key: round(ms, 1) for key, ms in top}}


def count_ops(step: Callable[[], None], warmup: int, top: int = 12) -> dict[str, Any]:
    """The ATen operators one call of ``step`` dispatches: their number and the ``top`` most frequent."""
    from lit_meta.internals import TorchDispatchMode

    class Counting(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.counts: Counter[str] = Counter()

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            self.counts[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    for _ in range(warmup):
        step()
    with Counting() as mode:
        step()
    return {"ops": sum(mode.counts.values()), "most_frequent": dict(mode.counts.most_common(top))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_arguments(p)
    add_timing_arguments(p)
    p.add_argument("--count-ops", action="store_true", help="count the ATen operators of one step instead of timing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    case = case_from_args(args)
    if case.device != "cpu":
        raise SystemExit(f"--device {args.device}: this profile reads CPU self time; use the CPU")
    # the torch profiler sees torch's operators only: JAX's step would show as one opaque call
    sides = ["ours", *(p for p in args.compare if p not in ("none", "jax"))]
    for name, step in build_sides(case, sides).steps.items():
        result = count_ops(step, args.warmup) if args.count_ops else profile_side(step, args.warmup, args.steps)
        print(json.dumps({"side": name, "algorithm": case.algorithm, "meta_batch_size": case.meta_batch_size,
                          "inner_steps": case.inner_steps, "threads": torch.get_num_threads(), **result}))


if __name__ == "__main__":
    main()
