"""The JAX side of a benchmark :class:`~lit_meta.bench.case.Case` (CPU only).

JAX has no official Omniglot MAML; this ports our Conv4 and protocol onto the structure of
tristandeleu/jax-meta-learning ``jax_meta/metalearners/maml.py`` and ``base.py`` (commit
589940c): ``adapt`` is a ``lax.scan`` of ``grad(loss)`` steps of gradient descent,
``outer_loss`` the query loss of the adapted weights, ``batch_outer_loss`` its ``vmap`` over
the tasks (mean), ``train_step`` its ``jax.grad`` and an optax outer step (Adam at
``meta_lr``), and the whole ``train_step`` is one ``jax.jit``. The network is
:mod:`lit_meta.bench.jax_conv4` (our Conv4 in ``jax.lax``, NHWC, the same weights;
jax-meta-learning builds its Conv4 with Haiku, which is not needed for a fixed network).
BatchNorm uses each forward's batch statistics, as ours: jax-meta-learning's Haiku
BatchNorm in training mode normalises with batch statistics too, and ``adapt`` there does
not update the state.

- FOMAML: the inner gradient through ``lax.stop_gradient`` (JAX's first order).
- Reptile (not in jax-meta-learning): ``adapt`` scans ``optax.adam(inner_lr, b1=0)`` from a
  fresh state per task; θ − mean θ' goes to ``optax.sgd(meta_lr)``, as ours.

Compile time is separate: :func:`build_jax` compiles ``train_step`` ahead of time
(``jit(...).lower(...).compile()``) and reports the seconds as ``info["compile_s"]``;
every timed step then runs compiled code. Tasks are drawn in torch (the same
``TensorTasks`` draw as the other peers) and copied to JAX arrays in the step.

Threads: XLA's CPU thread pool is sized when JAX starts, from the CPUs the process may run
on; ``XLA_FLAGS`` (``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``) did
not cap it here (jaxlib 0.10.2: up to 2 busy cores with them set). So for timing at
``threads`` T the JAX side runs in a child process (``python -m lit_meta.bench.jax_baseline``)
pinned to T CPUs (``os.sched_setaffinity``, before jax is imported, with those flags set as
well), which the parent drives one step per line over a pipe, alternating with ours as
every side does (:func:`spawn_jax`). In-process (tests, the memory subprocess) it runs on
whatever the process has.

An optional extra (``bash benchmarks/install_peers.sh jax``: jax, jaxlib, optax).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import weakref
from typing import Any, Callable

import torch
from torch import Tensor

from lit_meta.bench.case import Case
from lit_meta.bench.peers import PeerStep, meta_batches, subprocess_env
from lit_meta.tasks import TaskBatch


def pin_threads(threads: int) -> None:
    """Run this process (and so XLA's thread pool) on ``threads`` CPUs; before jax is imported."""
    if "jax" in sys.modules:
        raise RuntimeError("pin_threads must run before jax is imported: XLA sizes its thread pool at start")
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    multi = "true" if threads > 1 else "false"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_cpu_multi_thread_eigen={multi} intra_op_parallelism_threads={threads}").strip()


def make_train_step(case: Case, shape) -> Callable:
    """``train_step(params, opt_state, sx, sy, qx, qy) -> (params, opt_state, meta_gradient)`` and its optax optimizer."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax import lax

    from lit_meta.bench.jax_conv4 import apply

    def loss(params, x, y):
        logp = jax.nn.log_softmax(apply(params, x, shape))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    if case.algorithm == "reptile":
        inner = optax.adam(case.inner_lr, b1=0.0, b2=0.999, eps=1e-8)
        outer = optax.sgd(case.meta_lr)

        def adapt(params, x, y):
            def update(carry, _):
                p, state = carry
                updates, state = inner.update(jax.grad(loss)(p, x, y), state, p)
                return (optax.apply_updates(p, updates), state), None
            return lax.scan(update, (params, inner.init(params)), None, length=case.inner_steps)[0][0]

        def meta_gradient(params, sx, sy, qx, qy):
            adapted = jax.vmap(adapt, in_axes=(None, 0, 0))(params, sx, sy)
            return jax.tree_util.tree_map(lambda p, a: p - a.mean(0), params, adapted)
    else:
        outer = optax.adam(case.meta_lr)
        first_order = case.is_first_order

        def adapt(params, x, y):
            def update(p, _):
                g = jax.grad(loss)(p, x, y)
                if first_order:
                    g = lax.stop_gradient(g)
                return jax.tree_util.tree_map(lambda w, d: w - case.inner_lr * d, p, g), None
            return lax.scan(update, params, None, length=case.inner_steps)[0]

        def batch_outer_loss(params, sx, sy, qx, qy):
            outer_loss = lambda p, a, b, c, d: loss(adapt(p, a, b), c, d)  # noqa: E731
            return jnp.mean(jax.vmap(outer_loss, in_axes=(None, 0, 0, 0, 0))(params, sx, sy, qx, qy))

        meta_gradient = jax.grad(batch_outer_loss)

    def train_step(params, opt_state, sx, sy, qx, qy):
        grads = meta_gradient(params, sx, sy, qx, qy)
        updates, opt_state = outer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grads

    return train_step, outer


def to_jax(batch: TaskBatch) -> tuple[Any, ...]:
    """The batch as JAX arrays, images NHWC."""
    import jax.numpy as jnp

    def images(x: Tensor):
        return jnp.asarray(x.detach().cpu().permute(0, 1, 3, 4, 2).numpy())

    return (images(batch.support_x), jnp.asarray(batch.support_y.cpu().numpy()),
            images(batch.query_x), jnp.asarray(batch.query_y.cpu().numpy()))


def build_jax(case: Case, net: torch.nn.Module, images: Tensor, seed: int = 1,
              tasks: Callable[[], TaskBatch] | None = None) -> PeerStep:
    """JAX's meta-step for ``case`` in this process, from ``net``'s weights (its dtype: float64
    needs ``jax_enable_x64``), compiled before it returns."""
    import jax

    from lit_meta.bench.jax_conv4 import Conv4Shape, from_torch, to_torch

    if case.device != "cpu":
        raise ValueError("the JAX port runs on the CPU only")
    shape = Conv4Shape.of(net)
    draw = meta_batches(case, images, seed, tasks)
    train_step, outer = make_train_step(case, shape)
    state: dict[str, Any] = {"params": from_torch(net, shape)}
    state["opt_state"] = outer.init(state["params"])
    begin = time.perf_counter()
    example = to_jax(meta_batches(case, images, seed, tasks)())  # its own draw: the steps' tasks stay the other peers'
    compiled = jax.jit(train_step).lower(state["params"], state["opt_state"], *example).compile()
    compile_s = time.perf_counter() - begin

    def step() -> None:
        params, opt_state, grads = compiled(state["params"], state["opt_state"], *to_jax(draw()))
        jax.block_until_ready(params)
        state.update(params=params, opt_state=opt_state, grads=grads)

    return PeerStep(step, lambda: to_torch(state["params"], shape), lambda: to_torch(state["grads"], shape),
                    info={"compile_s": compile_s})


def spawn_jax(case: Case, net: torch.nn.Module, threads: int, seed: int = 1) -> PeerStep:
    """:func:`build_jax` in a child process pinned to ``threads`` CPUs, from ``net``'s weights
    (sent as a state dict) and the case's own data (rebuilt there from the case's seed)."""
    import tempfile

    weights = tempfile.NamedTemporaryFile(suffix=".pt", delete=False)
    torch.save(net.state_dict(), weights.name)
    cmd = [sys.executable, "-m", "lit_meta.bench.jax_baseline", json.dumps(case.to_dict()), str(threads),
           str(seed), weights.name]
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=subprocess_env())
    weakref.finalize(child, lambda: (child.poll() is None and child.kill(), os.unlink(weights.name)))

    def ask(command: str) -> dict[str, Any]:
        if command:
            child.stdin.write(command + "\n")
            child.stdin.flush()
        line = child.stdout.readline()
        if not line:
            child.wait()
            last = (child.stderr.read().strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"the JAX side's process ended: {last}")
        return json.loads(line)

    ready = ask("")

    def unavailable() -> list[Tensor]:
        raise NotImplementedError("the JAX child process times steps only; build_jax in-process for weights")

    return PeerStep(lambda: ask("step") and None, unavailable, unavailable, info={"compile_s": ready["compile_s"]})


def serve(argv: list[str]) -> None:
    """The child of :func:`spawn_jax`: ``CASE_JSON THREADS SEED WEIGHTS``; one JSON line when
    compiled, then one per ``step`` line read."""
    case_json, threads, seed, weights = argv
    pin_threads(int(threads))
    torch.set_num_threads(int(threads))
    from lit_meta.bench.case import build_data, build_ours

    case = Case.from_dict(json.loads(case_json))
    data = build_data(case)
    model, _ = build_ours(case, data)
    model.net.load_state_dict(torch.load(weights))
    side = build_jax(case, model.net, data.images, seed=int(seed))
    print(json.dumps({"compile_s": side.info["compile_s"]}), flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            side.step()
            print(json.dumps({"ok": True}), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1:])
