"""One whole meta-step captured as a CUDA graph and replayed: what kernel launches cost a step.

On the H200, second-order MAML on Omniglot 5-way 1-shot (meta-batch 32) takes 32 ms a step for a
few GFLOP: it is launch-bound (docs/RESULTS.md, "GPU figures"). ``torch.compile`` cannot capture
its double backward (``compile_tasks`` leaves second order eager), but a CUDA graph
(``torch.cuda.CUDAGraph``, PyTorch's "whole-network capture") records the kernels of the eager
step itself: the vmapped inner loop with ``create_graph``, the outer backward, the divergence
guard and ``Adam(capturable=True)``; a replay launches them all at once. lit_meta's step makes no
host sync and copies no host tensor in (``lit_meta.rehearsal``), which capture requires.

What this is for: ``benchmarks/gpu_check.py`` (its compile part, path ``maml2``) measures the
replay against the eager step on one fixed batch, so the next GPU session can say whether a
graphed training mode is worth building. It is not one: what the eager step reads on the host
each step is frozen at capture (the step index in the guard's counters), the guard's counters do
not accumulate across replays, and only the unchunked step with an Adam meta-optimizer and no
inner mini-batches (whose schedule is drawn on the host each step) is taken.

Off CUDA (``capture=False``) the same static-buffer step runs eagerly, so the plumbing is
tested on the CPU (``tests/test_graphed_step.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from lit_meta.algorithms.base import MetaLearner
from lit_meta.episode import run_tasks
from lit_meta.tasks import TaskBatch


class GraphedStep:
    """``step(batch)``: copy ``batch`` into the static buffers, then replay the captured
    meta-step (or run it, without capture). Returns the first meta-parameter."""

    def __init__(self, model: MetaLearner, batch: TaskBatch, capture: bool | None = None, warmup: int = 3) -> None:
        self.model = model
        self.capture = batch.support_x.is_cuda if capture is None else capture
        if self.capture and not batch.support_x.is_cuda:
            raise ValueError("GraphedStep: capture needs the batch and the model on a CUDA device")
        # what the step below is: MetaLearner.outer_update's unchunked path with an Adam meta-optimizer
        if model.meta_optimizer_name != "adam":
            raise ValueError(f"GraphedStep: meta_optimizer {model.meta_optimizer_name!r}: only adam is captured")
        if model.task_chunk_size is not None and model.task_chunk_size < batch.num_tasks:
            raise ValueError(f"GraphedStep: task_chunk_size={model.task_chunk_size}: only the unchunked step is captured")
        if model.inner_batch_size_of(model.context(True, batch)) is not None:
            raise ValueError("GraphedStep: inner mini-batches draw their schedule on the host each step; not captured")
        self.static = TaskBatch(*(t.clone() for t in (batch.support_x, batch.support_y, batch.query_x,
                                                      batch.query_y)))
        # capturable: Adam keeps its step count on the device and never reads it on the host
        self.optimizer = torch.optim.Adam(model.meta_parameters(), lr=model.meta_lr, capturable=self.capture)
        self.graph: torch.cuda.CUDAGraph | None = None
        if not self.capture:
            return
        side = torch.cuda.Stream()  # warm-up off the default stream, as capture asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # the optimizer's state and cuDNN's choices are made here
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def _step(self) -> None:
        """``outer_update`` on the static batch, with this object's (capturable) Adam."""
        model, batch = self.model, self.static
        ctx = model.context(True, batch)
        out = run_tasks(model, batch, ctx, model.inner_steps, model.first_order_at(ctx))
        model.meta_step(model, out["updates"], query_losses=out["query_loss"], optimizer=self.optimizer)

    def __call__(self, batch: TaskBatch) -> Tensor:
        for static, new in zip((self.static.support_x, self.static.support_y, self.static.query_x,
                                self.static.query_y), (batch.support_x, batch.support_y, batch.query_x, batch.query_y)):
            static.copy_(new, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        return next(self.model.meta_parameters()).detach()
