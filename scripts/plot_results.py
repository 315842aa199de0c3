"""Curves of one or several runs: ``python scripts/plot_results.py RUN... --output FILE.png``.

Each RUN is a ``results.json``, a run directory (``logs/<name>/version_N``) or a folder
above runs (its newest run). The figure has two panels: the validation curve over
training, from the CSV logger's ``metrics.csv`` (or results.json's ``val_curve`` without
it), against meta-training steps (``--x step``, default) or wall-clock minutes (``--x
time``); and the test adaptation curve, the test accuracy (or MSE) after each inner step
0..eval_inner_steps (results.json's ``test/acc_by_step`` / ``test/mse_by_step``).
``--labels`` names the runs in the legend (default: algorithm and run directory).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lit_meta.curves import plot_runs, read_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="results.json files or run directories")
    parser.add_argument("--output", "-o", required=True, type=Path, help="the PNG to write")
    parser.add_argument("--x", choices=("step", "time"), default="step", help="validation curve against steps or time")
    parser.add_argument("--labels", nargs="*", default=None, help="one legend label per run")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        parser.error(f"--labels needs one label per run ({len(args.runs)}), got {len(args.labels)}")
    try:
        runs = [read_run(run, None if args.labels is None else args.labels[i]) for i, run in enumerate(args.runs)]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not any(run.validation or run.test_by_step for run in runs):
        print("error: none of the runs has a validation or test curve", file=sys.stderr)
        return 2
    print(f"figure: {plot_runs(runs, args.output, x=args.x, title=args.title).resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
