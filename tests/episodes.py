"""Running a model's episodes in tests: the batch's context from the model, then the one
per-episode computation (``lit_meta.episode``), as ``training_step`` and the evaluation steps do."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from lit_meta.episode import adapt_task, inner_schedule, run_tasks
from lit_meta.inner import Adapted, Params
from lit_meta.tasks import TaskBatch


def run(model: Any, batch: TaskBatch, steps: int, first_order: bool, training: bool, **options: Any) -> dict[str, Any]:
    """``lit_meta.episode.run_tasks`` over ``batch`` in ``model.context(training, batch)``."""
    return run_tasks(model, batch, model.context(training, batch), steps, first_order, **options)


def adapt_one(model: Any, params: Params, support_x: Tensor, support_y: Tensor, steps: int, first_order: bool,
              training: bool, trace: bool = False) -> Adapted:
    """One task's inner loop (its own inner mini-batch schedule when the model has one)."""
    ctx = model.context(training)
    schedule = inner_schedule(support_x[None], steps, model.inner_batch_size_of(ctx), ctx)
    return adapt_task(model, params, support_x, support_y, steps, first_order, ctx, trace=trace,
                      schedule=None if schedule is None else schedule[0])


def predict(model: Any, params: Params, support_x: Tensor, query_x: Tensor, step: int, training: bool,
            support_y: Tensor | None = None) -> Tensor:
    """``model.predict`` in ``model.context(training)`` (the algorithms here read no support labels)."""
    return model.predict(params, support_x, support_y, query_x, step, model.context(training))
