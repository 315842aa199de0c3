"""One convolution layer of a vmapped meta-batch, four ways: what the layout costs on this CPU.

    python benchmarks/conv_layouts.py --threads 1            # miniImageNet conv4/32, layer 2

``torch.func.vmap`` over per-task weights turns T tasks' convolutions into one grouped
convolution (``groups=T`` over ``[N, T*C, H, W]``); a per-task loop (learn2learn, or
``task_chunk_size: 1``) runs T plain ones. Each can run on contiguous (NCHW) or channels-last
(NHWC) tensors. This times forward and forward + backward (input and weight gradients) of the
four, on the same numbers, and checks that they compute the same function (the largest
difference of the outputs and gradients from the per-task contiguous ones, relative to each
tensor's largest entry). One JSON line.

Why: on the miniImageNet shape the vmapped step's convolutions ran at half the per-task loop's
speed (docs/RESULTS.md, "Chunked against unchunked"); whether a layout closes that is a
measurement, not a guess.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Mean milliseconds of ``fn`` after one untimed call."""
    fn()
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - begin) / repeats


def layer(x: Tensor, w: Tensor, tasks: int, grouped: bool, channels_last: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Output, input gradient and weight gradient of the layer on ``x`` [T, N, C, H, W] with
    per-task weights ``w`` [T, C, C, 3, 3] (the gradients of the outputs' sum)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if grouped:  # what vmap's batching rule runs: tasks folded into the channels
        n, c = x.shape[1], x.shape[2]
        xi = x.permute(1, 0, 2, 3, 4).reshape(n, tasks * c, *x.shape[3:]).contiguous(memory_format=fmt)
        wi = w.reshape(tasks * c, *w.shape[2:]).contiguous(memory_format=fmt)
        xi.requires_grad_(), wi.requires_grad_()
        out = F.conv2d(xi, wi, padding=1, groups=tasks)
        out.sum().backward()
        unfold = lambda t: t.reshape(n, tasks, c, *t.shape[2:]).permute(1, 0, 2, 3, 4)  # noqa: E731
        return unfold(out.detach()), unfold(xi.grad), wi.grad.reshape(w.shape)
    outs, gx, gw = [], [], []
    for t in range(tasks):
        xi = x[t].contiguous(memory_format=fmt).requires_grad_()
        wi = w[t].contiguous(memory_format=fmt).requires_grad_()
        out = F.conv2d(xi, wi, padding=1)
        out.sum().backward()
        outs.append(out.detach()), gx.append(xi.grad), gw.append(wi.grad)
    return torch.stack(outs), torch.stack(gx), torch.stack(gw)


def forward_only(x: Tensor, w: Tensor, tasks: int, grouped: bool, channels_last: bool) -> None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.no_grad():
        if grouped:
            n, c = x.shape[1], x.shape[2]
            F.conv2d(x.permute(1, 0, 2, 3, 4).reshape(n, tasks * c, *x.shape[3:]).contiguous(memory_format=fmt),
                     w.reshape(tasks * c, *w.shape[2:]).contiguous(memory_format=fmt), padding=1, groups=tasks)
        else:
            for t in range(tasks):
                F.conv2d(x[t].contiguous(memory_format=fmt), w[t].contiguous(memory_format=fmt), padding=1)


def measure(tasks: int, images: int, channels: int, size: int, repeats: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tasks, images, channels, size, size, generator=g)
    w = torch.randn(tasks, channels, channels, 3, 3, generator=g) / (3 * channels ** 0.5)
    reference = layer(x, w, tasks, grouped=False, channels_last=False)
    rows = {}
    for grouped in (True, False):
        for channels_last in (False, True):
            name = f"{'grouped' if grouped else 'per_task'}_{'channels_last' if channels_last else 'contiguous'}"
            values = layer(x, w, tasks, grouped, channels_last)
            rows[name] = {
                "forward_ms": round(timed(lambda: forward_only(x, w, tasks, grouped, channels_last), repeats), 1),
                "forward_backward_ms": round(timed(lambda: layer(x, w, tasks, grouped, channels_last), repeats), 1),
                # relative to each tensor's largest entry: the weight gradients sum N*H*W terms
                "max_rel_diff": max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(values, reference)),
            }
    return {"tasks": tasks, "images": images, "channels": channels, "size": size,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "layouts": rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--images", type=int, default=80, help="support + query images a task (5w1s, 15 queries: 80)")
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--size", type=int, default=42, help="the layer's input size (conv4 on 84x84: 42 at layer 2)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.tasks, args.images, args.channels, args.size, args.repeats)))


if __name__ == "__main__":
    main()
