"""benchmarks/gpu_check.py: the prepared GPU check works before a GPU is at hand.

``--cpu-smoke`` runs every part (pytest -m gpu, speed.py per case, the timed fits with
the sync guard, compile against eager) with tiny sizes on the CPU; the summary must have
every key the GPU run reports. About a minute of subprocess start-ups on an idle 2-core
machine, so it runs once per session (module fixture).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from tests.conftest import REPO


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu_check")
    out, log = folder / "summary.json", folder / "parts.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out", str(out),
                           "--log", str(log)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = done.stdout.strip().splitlines()[-1]
    assert json.loads(out.read_text()) == json.loads(line)  # --out holds the printed summary
    headers = [line for line in log.read_text().splitlines() if line.startswith("===== ")]  # one per part run
    assert len(headers) == 7 and sum("benchmarks/speed.py" in h for h in headers) == 4
    assert any("-m pytest -m gpu" in h for h in headers) and any("--worker compile" in h for h in headers)
    return json.loads(line)


def test_smoke_summary_has_every_part(smoke):
    assert {"device", "tests", "speed", "fit", "compile"} <= set(smoke)
    assert smoke["mode"] == "cpu-smoke" and smoke["device"]["torch"] == torch.__version__
    tests = smoke["tests"]
    assert all(isinstance(tests[k], int) for k in ("passed", "failed", "errors", "skipped"))
    assert tests["failed"] == tests["errors"] == 0 and tests["skipped"] >= 1  # the gpu tests, skipped on a CPU


def test_smoke_speed_has_each_case_with_both_sides(smoke):
    cases = {entry["case"]: entry for entry in smoke["speed"]}
    assert set(cases) == {"maml_omniglot_5w1s", "fomaml_omniglot_5w1s", "reptile_omniglot_5w1s",
                          "maml_miniimagenet_shaped_5w1s"}
    for entry in cases.values():
        assert "error" not in entry, entry
        assert entry["ours_tasks_per_s"] > 0
        assert {"ratio", "ours_peak_mem_mb", "baseline_peak_mem_mb"} <= set(entry)
    assert cases["maml_miniimagenet_shaped_5w1s"]["dataset"] == "miniimagenet"
    assert cases["reptile_omniglot_5w1s"]["algorithm"] == "reptile"


def test_smoke_fit_times_both_precisions_under_the_sync_guard(smoke):
    for precision in ("32-true", "bf16-mixed"):
        fit = smoke["fit"][precision]
        assert "error" not in fit, fit
        assert fit["steps_per_s"] > 0 and fit["projected_60k_minutes"] > 0
        # the mean over the smoke's 8 validation tasks x 5 ways x 2 queries: a multiple of 1/80
        assert fit["val_acc"] * 80 == pytest.approx(round(fit["val_acc"] * 80), abs=1e-2)
        assert fit["sync_check"].startswith("ok"), fit["sync_check"]
        assert fit["sample_ms"] > 0


def test_smoke_compile_matches_eager_on_every_path(smoke):
    compiled = {c["path"]: c for c in smoke["compile"]["cases"] if c["mode"] == "aot_eager"}
    assert set(compiled) == {"reptile", "fomaml", "eval"}
    for case in compiled.values():
        assert "error" not in case, case
        assert case["max_abs_diff"] <= 1e-5 and case["ms_per_call"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer")
def test_without_cuda_it_stops_at_once_with_one_line():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--cpu-smoke" in lines[0]


def test_a_part_past_its_limit_is_killed_and_reported(tmp_path):
    args = gpu_check.parse_args(["--cpu-smoke"])
    runner = gpu_check.Runner(args, dict(os.environ))
    begin = time.monotonic()
    code, _, seconds = runner.run([sys.executable, "-c", "import time; time.sleep(60)"], timeout=2)
    assert code is None and seconds < 30 and time.monotonic() - begin < 30
    code, output, _ = runner.run([sys.executable, "-c", "raise RuntimeError('broken part')"], timeout=60)
    assert code != 0 and gpu_check.last_error_line(output) == "RuntimeError: broken part"
