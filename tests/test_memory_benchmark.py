"""benchmarks/memory.py: its command-line interface, and (slow) that inner checkpointing keeps
the measured peak flat in the inner steps where storing the graph does not."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

KEYS = ("dataset", "inner_steps", "inner_checkpointing", "peak_mem_mb", "seconds_per_step")


def run_memory(*args: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "benchmarks/memory.py", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.slow  # benchmark tooling: a subprocess per point (17 s)
def test_one_json_line_per_point_with_the_interface_keys():
    rows = run_memory("--dataset", "omniglot", "--inner-steps", "2", "--inner-checkpointing", "--threads", "1",
                      "--meta-batch-size", "2", "--steps", "2")
    assert len(rows) == 1
    row = rows[0]
    assert all(key in row for key in KEYS), row
    assert row["dataset"] == "omniglot" and row["inner_steps"] == 2 and row["inner_checkpointing"] is True
    assert row["peak_mem_mb"] > 0 and row["seconds_per_step"] > 0 and "error" not in row


@pytest.mark.slow
def test_checkpointed_peak_stays_flat_where_the_stored_graph_grows():
    """Measured as the benchmark measures (peak RSS in fresh processes), on a shape where
    one step's second-order graph is large against the parameter trajectory."""
    common = ("--dataset", "miniimagenet", "--inner-steps", "1", "8", "--threads", "1", "--meta-batch-size", "2",
              "--queries", "2", "--steps", "2")
    stored = {r["inner_steps"]: r["peak_mem_mb"] for r in run_memory(*common)}
    ckpt = {r["inner_steps"]: r["peak_mem_mb"] for r in run_memory(*common, "--inner-checkpointing")}
    assert ckpt[8] <= 1.5 * ckpt[1], ckpt
    assert stored[8] >= 3 * stored[1], stored


@pytest.mark.slow
def test_imaml_peak_does_not_grow_with_the_inner_steps():
    """iMAML keeps no graph to θ and no trajectory: 16 inner steps need what 1 needs (the
    implicit gradient's CG is the same 5 Hessian-vector products either way)."""
    common = ("--dataset", "miniimagenet", "--algorithm", "imaml", "--inner-steps", "1", "16", "--threads", "1",
              "--meta-batch-size", "2", "--queries", "2", "--steps", "2")
    peak = {r["inner_steps"]: r["peak_mem_mb"] for r in run_memory(*common)}
    assert peak[16] <= 1.2 * peak[1], peak
