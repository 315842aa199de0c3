"""Peak memory and time per meta-step against the number of inner steps, with and without
inner checkpointing (``model.init_args.inner_checkpointing``), second-order MAML; or iMAML
(``--algorithm imaml``: its inner loop keeps no graph and no trajectory, so its memory must
not grow with the steps).

    python benchmarks/memory.py --dataset omniglot --inner-steps 1 5 10 20 [--inner-checkpointing] \\
        [--device cpu|cuda] [--threads N] [--compare learn2learn] [--algorithm maml|imaml] \\
        [--backbone conv4|resnet12]

prints one JSON line per point (``dataset``, ``inner_steps``, ``inner_checkpointing``,
``peak_mem_mb``, ``seconds_per_step``, and ``side``, ``algorithm``, the shapes, ``device``,
``threads``, ``memory``, ``date``). With ``--compare learn2learn`` each point also gets a
learn2learn row (``side: learn2learn``, its stored-graph ``MAML`` clone/adapt loop, always
``inner_checkpointing: false``); a point that cannot run (out of memory, learn2learn not
installed) is a row with ``error`` and null figures.

The two shapes of the issue, on synthetic images (no download; memory and time do not
depend on pixel values):
- ``omniglot``: 5-way 1-shot, 1 query per class, 28×28×1, conv4 with 64 filters and
  stride 2, meta-batch 32, inner rate 0.4 (Finn et al. 2017; learn2learn's example);
- ``miniimagenet``: 5-way 1-shot, 15 queries per class, 84×84×3, conv4 with 32 filters
  and max-pool, meta-batch 4, inner rate 0.01.

What a step is: ``MetaLearner.outer_update`` on a fresh task batch (the vmapped inner
loop, the query loss, one backward, Adam) for ours; for learn2learn the loop of its
``maml_omniglot.py`` (``benchmarks/speed.py``'s port, which this reuses).

How it measures (``measure`` is the only code here that reads clocks or memory):
- every point and side runs in fresh processes, so no point inherits another's allocator
  state or high-water mark;
- CPU, ``peak_mem_mb``: after the model, optimizer and images exist, the kernel's
  resident-set high-water mark is reset (``/proc/self/clear_refs``) and two meta-steps
  run (the first creates Adam's state); the figure is ``VmHWM`` minus the ``VmRSS`` at
  the reset: everything the steps needed at their peak, torch's allocations and Python's
  alike (``tracemalloc`` does not see torch's allocator). That process runs with glibc's
  mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_=131072``), so freed tensors leave RSS at
  once; with glibc's default, a long-lived tensor allocated above freed ones (the
  checkpointed trajectory, between recomputations) keeps them resident, and RSS counts
  that heap fragmentation too. ``peak_mem_default_malloc_mb`` is that default-allocator
  figure, from the timing process;
- CUDA, ``peak_mem_mb``: ``torch.cuda.max_memory_allocated`` minus the allocation before
  the steps (tensors alive; the caching allocator's reserve is not counted);
- ``seconds_per_step``: the median wall time of steps 2..``--steps`` (``perf_counter``,
  after a CUDA synchronize), glibc's default allocator; ``cpu_seconds_per_step``: the
  same in process CPU time (with ``--threads 1`` on a shared CPU machine, the figure the
  load distorts least). On a shared machine only the memory figures are exact.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from statistics import median
from typing import Any, Callable

import torch

from lit_meta.bench.case import DATASETS, Case
from lit_meta.bench.measure import build_sides, rss_kb

# Per dataset: the episode sizes of the two shapes (network, image size and MAML's inner
# rate are the harness's: lit_meta.bench.case.DATASETS).
SHAPES: dict[str, dict[str, Any]] = {
    "omniglot": {"ways": 5, "shots": 1, "queries": 1, "meta_batch_size": 32},
    "miniimagenet": {"ways": 5, "shots": 1, "queries": 15, "meta_batch_size": 4},
}
assert set(SHAPES) == set(DATASETS)


# ----------------------------------------------------------------------------- measuring
def measure(step: Callable[[], None], steps: int, device: torch.device) -> dict[str, float]:
    """Run ``step`` ``steps`` times: the peak extra memory (MB) over all of them, and the
    median wall and process-CPU seconds of steps 2..n (CPU time is what a shared machine
    distorts least: waiting for a core is not counted)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = rss_kb("VmRSS") * 1024
    wall, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss_kb("VmHWM") * 1024
    return {"peak_mem_mb": (peak - base) / 2**20, "seconds_per_step": median(wall[1:] or wall),
            "cpu_seconds_per_step": median(cpu[1:] or cpu)}


# ----------------------------------------------------------------------------- the two sides
def build_case(args: argparse.Namespace, inner_steps: int, side: str, device: torch.device) -> Callable[[], None]:
    """One meta-step of ``side`` ("ours" or "learn2learn") on the dataset's shape (random images)."""
    shape = SHAPES[args.dataset]
    checkpointing = bool(args.inner_checkpointing and side == "ours")
    case = Case(dataset=args.dataset, algorithm="maml", ways=shape["ways"], shots=shape["shots"],
                queries=args.queries or shape["queries"],
                meta_batch_size=args.meta_batch_size or shape["meta_batch_size"], inner_steps=inner_steps,
                task_chunk_size=args.task_chunk_size,
                model_kwargs={**({"inner_checkpointing": True} if checkpointing else {}),
                              **({"backbone": "resnet12", "backbone_kwargs": {}} if args.backbone == "resnet12" else {})},
                device=str(device), random_images=True, seed=args.seed)
    torch.manual_seed(args.seed)
    if args.algorithm == "imaml":
        return imaml_step(case, device)
    return build_sides(case, [side]).steps[side]


def imaml_step(case: Case, device: torch.device) -> Callable[[], None]:
    """iMAML's meta-step on the case's tasks and network: the inner steps without a graph, then
    the implicit gradient (5 conjugate-gradient steps, as the paper's Omniglot setting)."""
    from lit_meta.algorithms import IMAML
    from lit_meta.bench.case import build_data

    data = build_data(case)
    model = IMAML(task_spec=data.datamodule.task_spec, backbone="conv4", inner_lr=case.inner_lr,
                  inner_steps=case.inner_steps, meta_batch_size=case.meta_batch_size, cg_steps=5,
                  backbone_kwargs=dict(case.shape.backbone_kwargs)).to(device)
    model.train()
    index = [0]

    def step() -> None:
        model.outer_update(data.datamodule.train_batch(index[0]).to(device))
        index[0] += 1

    return step


# ----------------------------------------------------------------------------- points
# glibc's malloc raises its mmap threshold as large blocks are freed, after which freed
# tensors stay in its heap, resident, whenever a longer-lived one sits above them: the
# RSS peak then counts heap fragmentation too. A fixed threshold maps every block of
# 128 KiB or more on its own and unmaps it on free, so RSS follows the tensors alive.
LIVE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def point_row(args: argparse.Namespace, inner_steps: int, side: str) -> dict[str, Any]:
    shape = SHAPES[args.dataset]
    cuda = args.device.startswith("cuda")
    return {"dataset": args.dataset, "inner_steps": inner_steps,
            "inner_checkpointing": bool(args.inner_checkpointing and side == "ours"),
            "backbone": args.backbone, "peak_mem_mb": None, "seconds_per_step": None, "side": side, "algorithm": args.algorithm,
            "ways": shape["ways"], "shots": shape["shots"], "queries": args.queries or shape["queries"],
            "meta_batch_size": args.meta_batch_size or shape["meta_batch_size"],
            "task_chunk_size": args.task_chunk_size, "device": args.device, "threads": torch.get_num_threads(),
            "steps": args.steps, "torch": torch.__version__,
            "memory": ("cuda max_memory_allocated above the pre-step allocation" if cuda else
                       "peak RSS above the pre-step RSS in a fresh process, malloc with a fixed mmap threshold "
                       f"({LIVE_MALLOC['MALLOC_MMAP_THRESHOLD_']} B); peak_mem_default_malloc_mb: the same with "
                       "glibc's defaults, in the timing process"),
            "date": date.today().isoformat()}


def run_child(args: argparse.Namespace) -> None:
    """A child process: one side at one step count; prints its peak and median step time."""
    device = torch.device(args.device)
    step = build_case(args, args.inner_steps[0], args.point, device)
    print(json.dumps(measure(step, args.steps, device)), flush=True)


def spawn(args: argparse.Namespace, inner_steps: int, side: str, steps: int,
          env: dict[str, str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--dataset", args.dataset, "--inner-steps", str(inner_steps),
           "--device", args.device, "--steps", str(steps), "--seed", str(args.seed), "--point", side,
           "--algorithm", args.algorithm, "--backbone", args.backbone]
    for flag, value in (("--threads", args.threads), ("--queries", args.queries),
                        ("--meta-batch-size", args.meta_batch_size), ("--task-chunk-size", args.task_chunk_size)):
        if value is not None:
            cmd += [flag, str(value)]
    if args.inner_checkpointing:
        cmd.append("--inner-checkpointing")
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
    return {"error": f"exit code {out.returncode} (killed: out of memory?)" if out.returncode < 0 else tail}


def measure_point(args: argparse.Namespace, inner_steps: int, side: str) -> dict[str, Any]:
    """Time (and on CUDA memory) in one fresh process; on CPU the memory in a second one."""
    row = point_row(args, inner_steps, side)
    timing = spawn(args, inner_steps, side, args.steps)
    if "error" in timing:
        return {**row, **timing}
    row["seconds_per_step"], row["cpu_seconds_per_step"] = timing["seconds_per_step"], timing["cpu_seconds_per_step"]
    if args.device.startswith("cuda"):
        row["peak_mem_mb"] = timing["peak_mem_mb"]
        return row
    row["peak_mem_default_malloc_mb"] = timing["peak_mem_mb"]
    live = spawn(args, inner_steps, side, min(args.steps, 2), LIVE_MALLOC)
    return {**row, **live} if "error" in live else {**row, "peak_mem_mb": live["peak_mem_mb"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=list(SHAPES), default="omniglot")
    p.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5, 10, 20])
    p.add_argument("--inner-checkpointing", action="store_true", help="ours: recompute the inner steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--steps", type=int, default=3, help="meta-steps per point (the first is not timed)")
    p.add_argument("--compare", choices=("none", "learn2learn"), default="none",
                   help="add a learn2learn row per point")
    p.add_argument("--queries", type=int, default=None, help="override the dataset's queries per class")
    p.add_argument("--meta-batch-size", type=int, default=None, help="override the dataset's meta-batch")
    p.add_argument("--task-chunk-size", type=int, default=None, help="ours: tasks adapted and back-propagated together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", choices=("conv4", "resnet12"), default="conv4",
                   help="ours: the dataset's conv4, or ResNet-12 (MetaOptNet's 64-160-320-640, lit_meta.models.resnet12)")
    p.add_argument("--algorithm", choices=("maml", "imaml"), default="maml",
                   help="second-order MAML, or iMAML (its implicit gradient; ours only)")
    p.add_argument("--point", choices=("ours", "learn2learn"), help=argparse.SUPPRESS)  # a child process
    args = p.parse_args(argv)
    if min(args.inner_steps) < 1 or args.steps < 1:
        p.error("--inner-steps and --steps must be >= 1")
    if args.algorithm == "imaml" and (args.compare != "none" or args.inner_checkpointing):
        p.error("--algorithm imaml: ours only, and it keeps no graph to checkpoint")
    if args.backbone != "conv4" and (args.compare != "none" or args.algorithm != "maml"):
        p.error(f"--backbone {args.backbone}: MAML, ours only (learn2learn's side is its example's conv4)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.point:
        run_child(args)
        return
    sides = ["ours"] + (["learn2learn"] if args.compare == "learn2learn" else [])
    for inner_steps in args.inner_steps:
        for side in sides:
            print(json.dumps(measure_point(args, inner_steps, side)), flush=True)


if __name__ == "__main__":
    main()
