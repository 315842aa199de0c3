"""Optional ``torch.compile`` of the per-task computation (``model.init_args.compile_tasks``).

What can be captured: the vmapped ``task_outputs`` of a path with no backward through the
inner loop's gradients, i.e. evaluation, Reptile (no outer backward at all), Gradient
Agreement's graph-free pass and first-order training (the outer backward reaches θ only
through θ' = θ − α·stopgrad(∇)). Second-order MAML needs a double backward, which
AOTAutograd does not compile, so it always runs eagerly; so does a step-dependent
``first_order`` (MAML++'s annealing).

Modes: ``default``, ``max-autotune`` (Inductor kernels), ``reduce-overhead`` (Inductor plus
CUDA graphs: one replay per meta-batch instead of hundreds of kernel launches),
``cudagraphs`` (CUDA graphs of the captured aten graph, no Inductor: quick to compile) and
``aot_eager`` (captures the graph with AOTAutograd and runs it eagerly: no code generation,
used by the CPU tests to check the capture and its numbers). Whether any of them pays
is a GPU question: ``benchmarks/gpu_check.py`` compares each with eager on the same batch
(docs/RESULTS.md). Off by default.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable

import torch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "cudagraphs", "aot_eager")
BACKENDS = {"cudagraphs": "cudagraphs", "aot_eager": "aot_eager"}  # modes that name a backend, not an Inductor mode
CUDA_GRAPHS = ("reduce-overhead", "cudagraphs")


def check_compile_mode(mode: str | None) -> None:
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"compile_tasks must be null or one of {', '.join(COMPILE_MODES)}, got {mode!r}")


class TaskCompiler:
    """Caches one compiled function per path (``key``); eager where ``capturable`` is False."""

    def __init__(self, mode: str | None) -> None:
        check_compile_mode(mode)
        self.mode = mode
        self.compiled: dict[Hashable, Callable[..., Any]] = {}

    def __call__(self, key: Hashable, build: Callable[[], Callable[..., Any]], capturable: bool) -> Callable[..., Any]:
        if self.mode is None or not capturable:
            return build()
        fn = self.compiled.get(key)
        if fn is None:
            fn = self.compiled[key] = self._compile(build())
        return fn

    def _compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        backend = BACKENDS.get(self.mode)
        # fullgraph: a graph break would run the rest eagerly and quietly; here it is an error
        compiled = torch.compile(fn, backend=backend, fullgraph=True) if backend else \
            torch.compile(fn, mode=self.mode, fullgraph=True)
        if self.mode not in CUDA_GRAPHS:
            return compiled

        def replay(*args: Any, **kwargs: Any) -> Any:
            # CUDA graph trees reuse output memory on the next replay unless a new step is marked
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(*args, **kwargs)

        return replay

    def __getstate__(self) -> dict[str, Any]:
        # compiled functions do not pickle (ddp_spawn pickles the module): recompiled on first use
        return {"mode": self.mode, "compiled": {}}
