"""Timing and peak memory of meta-steps, for any :class:`~lit_meta.bench.case.Case`.

Sides: ``"ours"`` (lit_meta, :func:`~lit_meta.bench.case.build_ours`) and the peers of
:mod:`lit_meta.bench.peers` (``learn2learn``, ``higher``, ``torchopt``, ``parallel_metalearn``,
``jax``). :func:`build_sides` builds the sides asked for from one data build and the same
initial weights; a peer that cannot run the case is left out with its reason (``absent``).
When timing, JAX runs in a child process pinned to the thread count
(:func:`~lit_meta.bench.jax_baseline.spawn_jax`: XLA's threads cannot be set otherwise).

Time (:func:`timed`, :func:`time_interleaved`): wall clock (``perf_counter``) around one
step, on CUDA with a ``synchronize`` before the clock is read. Several sides alternate
step by step (A B, B A, ...) after ``warmup`` untimed steps each, so a noisy machine slows
them alike.

Peak memory (``peak_mem_mb``):

- :func:`peak_memory_mb` runs the side alone in a fresh subprocess
  (``python -m lit_meta.bench.measure``), so nothing another case left behind counts.
  On CPU, after the data and network are built, the kernel's resident-set high-water
  mark is reset (``/proc/self/clear_refs``), ``steps`` steps run (the first creates the
  optimizer state), and the figure is ``VmHWM - VmRSS at the reset``: the extra
  resident memory training needed at its peak, torch's allocations and Python objects
  alike. On CUDA: ``torch.cuda.max_memory_allocated`` over the steps minus the
  allocation before them, after one untimed step (cuBLAS and cuDNN allocate their
  workspaces at their first call, and the optimizer its state: neither is the step's).
- On CUDA :func:`timed` also gives each step's ``max_memory_allocated`` above the
  allocation at its start; :func:`time_interleaved` keeps the largest.

:func:`measure_case` puts these together: per side, seconds per step, tasks per
second and peak memory, as a JSON-ready dict.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any, Callable, Iterable, Sequence

import torch

from lit_meta.algorithms.base import MetaLearner
from lit_meta.bench.case import Case, CaseData, build_data, build_ours
from lit_meta.bench.peers import PEERS, PeerAbsent, build_peer, subprocess_env

SIDES = ("ours", *PEERS)
Step = Callable[[], None]


@dataclass
class CaseSides:
    """A case built for measuring: the step of each side asked for, the data they share,
    our model (whose initial weights the peers' copies start from), the peers that cannot
    run it (``absent``: side -> one-line reason) and what a side reports beside its timing
    (``info``: JAX's ``compile_s``)."""

    steps: dict[str, Step]
    data: CaseData
    model: MetaLearner
    absent: dict[str, str] = field(default_factory=dict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)


def build_sides(case: Case, sides: Iterable[str] = ("ours",), threads: int | None = None) -> CaseSides:
    """The steps of ``sides`` for ``case``: one data build, the same initial weights. With
    ``threads`` (timing) JAX runs in a child process on that many CPUs, else in this one."""
    sides = list(sides)
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        raise ValueError(f"sides must be among {SIDES}, got {unknown}")
    torch.manual_seed(case.seed)
    data = build_data(case)
    model, ours = build_ours(case, data)
    steps: dict[str, Step] = {}
    if "ours" in sides:
        steps["ours"] = ours
    built = CaseSides(steps, data, model)
    for peer in (s for s in sides if s != "ours"):
        try:
            if peer == "jax" and threads:
                from lit_meta.bench.jax_baseline import spawn_jax

                steps[peer] = spawn_jax(case, model.net, threads)
            else:
                steps[peer] = build_peer(peer, case, model.net, data.images)
        except PeerAbsent as why:
            built.absent[peer] = str(why)
            continue
        built.info[peer] = dict(getattr(steps[peer], "info", {}))
    return built


# ----------------------------------------------------------------------------- time
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Step, device: torch.device) -> tuple[float, float]:
    """Seconds for one call of ``step``, and (CUDA; NaN elsewhere) its peak allocation
    above the allocation at its start, in MB."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else float("nan")
    return seconds, peak


def time_interleaved(steps_by_side: dict[str, Step], steps: int, warmup: int,
                     device: torch.device) -> dict[str, dict[str, Any]]:
    """``{side: {"seconds": [one per timed step], "peak_mem_mb": max CUDA peak (NaN on CPU)}}``."""
    names = list(steps_by_side)
    for _ in range(warmup):
        for name in names:
            steps_by_side[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, list[float]] = {n: [] for n in names}
    for i in range(steps):
        order = names if i % 2 == 0 else names[::-1]  # A B, B A, ...: neither always goes first
        for name in order:
            s, p = timed(steps_by_side[name], device)
            times[name].append(s)
            peaks[name].append(p)
    return {n: {"seconds": times[n], "peak_mem_mb": max(peaks[n]) if peaks[n] else float("nan")} for n in names}


# ----------------------------------------------------------------------------- memory
def rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def peak_memory_here(case: Case, side: str = "ours", steps: int = 3) -> float:
    """``side``'s peak extra memory over ``steps`` steps, in MB, measured in this process
    (see the module docstring): what :func:`peak_memory_mb`'s subprocess runs."""
    step = build_sides(case, [side]).steps[side]
    device = torch.device(case.device)
    if device.type == "cuda":
        # one step first: cuBLAS/cuDNN allocate their workspaces at their first call, which
        # would otherwise count as the step's memory (and once only, so not as its growth)
        step()
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            step()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base = rss_kb("VmRSS")
    for _ in range(steps):
        step()
    return (rss_kb("VmHWM") - base) / 1024


def peak_memory_mb(case: Case, side: str = "ours", steps: int = 3, threads: int | None = None) -> float:
    """``side``'s peak extra memory over ``steps`` steps, in MB, in a fresh subprocess that
    imports this same lit_meta and runs ``threads`` torch threads (default: this process's)."""
    threads = threads or torch.get_num_threads()
    env = subprocess_env()  # the child measures this same code
    cmd = [sys.executable, "-m", "lit_meta.bench.measure", json.dumps(case.to_dict()), side, str(steps), str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"memory measurement of {side} failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mem_mb"]


# ----------------------------------------------------------------------------- together
def measure_case(case: Case, sides: Sequence[str] = ("ours",), steps: int = 10, warmup: int = 2,
                 memory: bool = True, memory_steps: int = 3, threads: int | None = None) -> dict[str, dict[str, Any]]:
    """Per side: ``seconds`` (each timed step), ``seconds_per_step`` (their median),
    ``tasks_per_s`` (meta-batch x steps / total seconds), ``peak_mem_mb`` (CUDA: from the
    timed steps; CPU: :func:`peak_memory_mb` when ``memory``, else None), ``data`` (where
    the tasks came from) and ``info`` (JAX: ``compile_s``); a peer that cannot run the case,
    ``{"absent": reason}``."""
    device = torch.device(case.device)
    built = build_sides(case, sides, threads=threads or torch.get_num_threads())
    result = time_interleaved(built.steps, steps, warmup, device)
    out: dict[str, dict[str, Any]] = {side: {"absent": why} for side, why in built.absent.items()}
    for side, r in result.items():
        if device.type == "cuda":
            peak = r["peak_mem_mb"]
        else:
            peak = peak_memory_mb(case, side, memory_steps, threads) if memory else None
        out[side] = {"seconds": r["seconds"], "seconds_per_step": median(r["seconds"]),
                     "tasks_per_s": case.meta_batch_size * steps / sum(r["seconds"]), "peak_mem_mb": peak,
                     "data": built.data.source, "info": built.info.get(side, {})}
    return out


def add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    """``--steps``, ``--warmup``, ``--threads`` and ``--compare`` (which sides run)."""
    parser.add_argument("--steps", type=int, default=30, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--compare", nargs="+", choices=("none", *PEERS), default=["learn2learn"], metavar="PEER",
                        help=f"the peers timed beside ours, any of {', '.join(PEERS)}; or none (ours alone)")


def main(argv: list[str] | None = None) -> None:
    """The subprocess of :func:`peak_memory_mb`: ``CASE_JSON SIDE STEPS THREADS`` -> one JSON line."""
    case_json, side, steps, threads = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(int(threads))
    if side == "jax":  # XLA's threads: the CPUs this process may use, set before jax starts
        from lit_meta.bench.jax_baseline import pin_threads

        pin_threads(int(threads))
    peak = peak_memory_here(Case.from_dict(json.loads(case_json)), side, int(steps))
    print(json.dumps({"side": side, "peak_mem_mb": peak}), flush=True)


if __name__ == "__main__":
    main()
