"""Meta-training speed, side by side with learn2learn 0.2.0.

    python benchmarks/speed.py --algorithm maml --dataset omniglot --ways 5 --shots 1 \\
        --queries 1 --meta-batch-size 32 --inner-steps 1 --steps 30 --compare learn2learn

The harness is ``lit_meta.bench``: what one timed step is on each side is in the
docstrings of ``lit_meta.bench.case`` (ours: ``dm.train_batch(step)`` then
``MetaLearner.outer_update``) and ``lit_meta.bench.learn2learn_baseline`` (the loops of
learn2learn's MAML and Reptile examples); how time and peak memory are measured, in
``lit_meta.bench.measure``.

Both sides get the same network (``lit_meta.models.Conv4``; learn2learn gets a
``deepcopy`` with identical weights), the same task shapes, the same device, the same
meta-optimizer, the same thread count, and draw tasks from images already in memory
(no file I/O on either side). ``--dataset omniglot`` uses the real pack in
``../shared/data/omniglot`` when it is there; ``--dataset miniimagenet`` is random
images of its shape (3x84x84, conv4/32 with max-pool). learn2learn's tasks come from its
own ``TaskDataset`` (``--baseline-sampler taskdataset``) or plain tensor indexing
(``--baseline-sampler tensor``, the cheapest draw there is).

The two sides alternate step by step (A B B A A B ...) after ``--warmup`` untimed steps
each, so a noisy shared machine slows both alike; the ratio is the headline figure.
Peak memory (``*_peak_mem_mb``): on CPU each side alone in a fresh subprocess (peak RSS
above the RSS before training, ``--memory-steps`` steps); on CUDA
``max_memory_allocated`` above the step's start, maximised over the timed steps.

``--scaling`` times ours (and learn2learn unless ``--no-scaling-baseline``) for meta-batch
sizes 4..64 and inner steps 1, 5, 10, one JSON line per point. ``--short`` is CI's smoke
mode: a few small steps, no memory subprocesses, and it fails unless every side asked for
ran (``--compare none``: ours alone) and the ratio is a positive finite number.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from datetime import date
from typing import Any

import torch

from lit_meta.bench.case import Case, add_case_arguments, case_from_args
from lit_meta.bench.measure import add_timing_arguments, measure_case
from lit_meta.bench.peers import PeerAbsent, peer_version


def compare(case: Case, args: argparse.Namespace, memory: bool) -> list[dict[str, Any]]:
    """One JSON row per peer asked for (one for ours alone with ``--compare none``): both
    sides' tasks/s and median step, the ratio, peak memory, the case; a peer that is not
    installed or cannot run the case, ``absent`` with the reason."""
    peers = [p for p in args.compare if p != "none"]
    versions: dict[str, str] = {}
    absent: dict[str, str] = {}
    for peer in peers:
        try:
            versions[peer] = peer_version(peer)
        except PeerAbsent as why:
            absent[peer] = str(why)
    result = measure_case(case, ["ours", *versions], steps=args.steps, warmup=args.warmup, memory=memory,
                          memory_steps=args.memory_steps, threads=torch.get_num_threads())
    ours = result["ours"]
    device = torch.device(case.device)
    fields = dict(
        algorithm=case.algorithm, dataset=case.dataset, ways=case.ways, shots=case.shots, queries=case.queries,
        meta_batch_size=case.meta_batch_size, inner_steps=case.inner_steps, task_chunk_size=case.task_chunk_size,
        first_order=case.is_first_order, steps=args.steps, warmup=args.warmup, device=str(device),
        threads=torch.get_num_threads(), torch=torch.__version__, data=ours["data"],
        memory=("cuda max_memory_allocated above step start" if device.type == "cuda"
                else "peak RSS above pre-training RSS, one subprocess per side" if memory else None),
        date=date.today().isoformat(),
    )
    rows = []
    for peer in peers or [None]:
        theirs = result.get(peer, {"absent": absent.get(peer)}) if peer else None
        row: dict[str, Any] = {"peer": peer, "peer_version": versions.get(peer)}
        if theirs is not None and "absent" in theirs:
            row["absent"] = absent.get(peer) or theirs["absent"]
            theirs = None
        row.update(ours_tasks_per_s=ours["tasks_per_s"], ours_step_s_median=ours["seconds_per_step"])
        if theirs is not None:
            row.update(baseline_tasks_per_s=theirs["tasks_per_s"], baseline_step_s_median=theirs["seconds_per_step"],
                       ratio=ours["tasks_per_s"] / theirs["tasks_per_s"])
            if "compile_s" in theirs["info"]:
                row["baseline_compile_s"] = theirs["info"]["compile_s"]
        if ours["peak_mem_mb"] is not None:
            row["ours_peak_mem_mb"] = ours["peak_mem_mb"]
        if theirs is not None and theirs["peak_mem_mb"] is not None:
            row["baseline_peak_mem_mb"] = theirs["peak_mem_mb"]
        row.update(fields, learn2learn=versions.get("learn2learn") if peer == "learn2learn" else None,
                   baseline_sampler=case.baseline_sampler if peer == "learn2learn" and theirs else None)
        rows.append(row)
    return rows


def scaling(case: Case, args: argparse.Namespace) -> None:
    for inner in (1, 5, 10):
        for batch in (4, 8, 16, 32, 64):
            point = argparse.Namespace(**vars(args))
            if not args.scaling_baseline:
                point.compare = ["none"]
            for row in compare(dataclasses.replace(case, meta_batch_size=batch, inner_steps=inner), point,
                               memory=False):
                print(json.dumps(row), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_arguments(p)
    add_timing_arguments(p)
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="measure CPU peak memory in subprocesses (default: on, off with --short)")
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--scaling", action="store_true", help="meta-batch 4..64 x inner steps 1, 5, 10")
    p.add_argument("--scaling-baseline", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--short", action="store_true", help="CI smoke mode: 2+1 steps of 4 tasks, checks the output")
    args = p.parse_args(argv)
    if args.short:
        args.steps, args.warmup, args.meta_batch_size, args.memory_steps = 2, 1, 4, 2
    if args.memory is None:
        args.memory = not args.short
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        case = case_from_args(args)
        if args.scaling:
            scaling(case, args)
            return
        rows = compare(case, args, memory=args.memory)
    except (ImportError, ValueError) as error:
        raise SystemExit(f"speed.py: {error}") from None
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.short:
        for row in rows:
            keys = ("ours_tasks_per_s",) + (("baseline_tasks_per_s", "ratio") if row["peer"] and "absent" not in row
                                            else ())
            if not all(math.isfinite(row.get(k, float("nan"))) and row[k] > 0 for k in keys):
                raise SystemExit(f"speed.py --short: {row['peer'] or 'ours'} did not run or its ratio is not "
                                 "a positive number")


if __name__ == "__main__":
    main()
