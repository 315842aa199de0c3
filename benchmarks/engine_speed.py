"""Meta-iterations per second of the lit_meta engine (no Trainer, no logging).

Times one full meta-step: sample a meta-batch from the DataModule's sampler, adapt every
task (vmap over tasks), the query loss, the backward through the inner loop, and the
meta-optimizer step through the shared MetaStep. Warm-up steps are excluded.

    python benchmarks/engine_speed.py --problem sine --steps 200
    python benchmarks/engine_speed.py --problem omniglot-shape --steps 20 --first-order
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from lit_meta.algorithms import MAML
from lit_meta.bench.case import TensorTasks
from lit_meta.data.base import EpisodicDataModule
from lit_meta.data.sine import SineDataModule
from lit_meta.episode import run_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", choices=["sine", "omniglot-shape"], default="sine")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--meta-batch-size", type=int, default=None)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--first-order", action="store_true")
    args = parser.parse_args()

    if args.problem == "sine":
        batch_size = args.meta_batch_size or 25
        dm: EpisodicDataModule = SineDataModule(meta_batch_size=batch_size)
        model = MAML(dm.task_spec, inner_lr=0.01, inner_steps=args.inner_steps, first_order=args.first_order)
    else:
        batch_size = args.meta_batch_size or 32
        # Omniglot-shaped episodes (1x28x28) from an in-memory random pool of 200 classes x 20:
        # the same batched-gather sampling cost as the real DataModule, without the data.
        pool = torch.rand(200, 20, 1, 28, 28)
        dm = TensorTasks(pool, ways=5, shots=1, queries=1, meta_batch_size=batch_size, dataset="omniglot-shape")
        model = MAML(dm.task_spec, inner_lr=0.4, inner_steps=args.inner_steps, first_order=args.first_order)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def one_step(step: int) -> None:
        batch = dm.train_batch(step)
        out = run_tasks(model, batch, model.context(True, batch), args.inner_steps, args.first_order)
        model.meta_step(model, out["updates"], query_losses=out["query_loss"], optimizer=optimizer)

    for step in range(args.warmup):
        one_step(step)
    start = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        one_step(step)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "problem": args.problem, "meta_batch_size": batch_size, "inner_steps": args.inner_steps,
        "first_order": args.first_order, "steps": args.steps,
        "meta_iters_per_s": round(args.steps / seconds, 2),
        "tasks_per_s": round(args.steps * batch_size / seconds, 1),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
    }))


if __name__ == "__main__":
    main()
