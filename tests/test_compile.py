"""``compile_tasks``: the captured paths give eager's numbers; second order stays eager.

On the CPU the ``aot_eager`` backend checks the capture (Dynamo + AOTAutograd, forward and
backward graphs) without code generation; whether Inductor or CUDA graphs pay is measured
on a GPU by ``benchmarks/gpu_check.py``.
"""
from __future__ import annotations

import pytest
import torch

from lit_meta.algorithms import MAML, Reptile
from lit_meta.internals import compiled_graph_count
from lit_meta.tasks import TaskBatch, task_spec
from tests.episodes import run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SPEC = task_spec("toy-images", "classification", [1, 8, 8], ways=3)


def batch() -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat(4, 2)
    return TaskBatch(torch.randn(4, 6, 1, 8, 8, generator=g), y, torch.randn(4, 6, 1, 8, 8, generator=g), y.clone())


def pair(cls, **kwargs):
    models = []
    for mode in (None, "aot_eager"):
        torch.manual_seed(0)
        models.append(cls(task_spec=SPEC, backbone_kwargs={"filters": 4}, inner_lr=0.1, inner_steps=2, compile_tasks=mode,
                          **kwargs))
    return models


def params_after_a_meta_step(model) -> dict[str, torch.Tensor]:
    model.outer_update(batch())
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("cls,kwargs", [(MAML, {"first_order": True}),
                                        pytest.param(Reptile, {}, marks=pytest.mark.slow)], ids=["fomaml", "reptile"])
def test_compiled_meta_step_equals_eager(cls, kwargs):
    eager, compiled = pair(cls, **kwargs)
    torch.compiler.reset()
    graphs = compiled_graph_count()
    for _ in range(2):  # the second call runs the cached compiled function
        a, b = params_after_a_meta_step(eager), params_after_a_meta_step(compiled)
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    assert len(compiled.task_compiler.compiled) == 1 and not eager.task_compiler.compiled
    # one whole graph (fullgraph: a break would be an error), captured once and then reused
    assert compiled_graph_count() == graphs + 1


@pytest.mark.slow  # a second compilation (9 s): the training step's capture is asserted above
def test_compiled_evaluation_equals_eager():
    eager, compiled = pair(MAML)
    torch.compiler.reset()
    graphs = compiled_graph_count()
    with torch.enable_grad():
        a = run(eager, batch(), 3, first_order=True, training=False)
        b = run(compiled, batch(), 3, first_order=True, training=False)
    for key in ("final_query_loss", "before_loss", "query_acc"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert len(compiled.task_compiler.compiled) == 1 and compiled_graph_count() == graphs + 1


def test_second_order_is_never_compiled():
    eager, compiled = pair(MAML)
    a, b = params_after_a_meta_step(eager), params_after_a_meta_step(compiled)
    assert not compiled.task_compiler.compiled  # a double backward: eager
    for name in a:
        assert torch.equal(a[name], b[name])


def test_bad_compile_mode_is_a_one_line_error():
    with pytest.raises(ValueError, match="compile_tasks must be null or one of default, reduce-overhead, max-autotune, cudagraphs, aot_eager, got .fast."):
        MAML(task_spec=SPEC, compile_tasks="fast")
