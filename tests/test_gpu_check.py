"""benchmarks/gpu_check.py: the prepared GPU check works before a GPU is at hand.

``--cpu-smoke`` runs every part (the meta-device rehearsal, pytest -m gpu, speed.py per case,
the sync-check and timed fits, compile against eager) with tiny sizes on the CPU; the summary
must have every key the GPU run reports. About a minute of subprocesses on an idle 2-core
machine, so it is in the slow tier, and .ci/run runs it after the default tier. The default
tier checks what is cheap: the time budget adds up, a failed setup still ends in the JSON line,
a part past its time is killed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import gpu_check
from tests.conftest import REPO


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu_check")
    out, log = folder / "summary.json", folder / "parts.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    begin = time.monotonic()
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out", str(out),
                           "--log", str(log)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - begin
    assert done.returncode == 0, done.stderr[-3000:]
    line = done.stdout.strip().splitlines()[-1]
    assert json.loads(out.read_text()) == json.loads(line)  # --out holds the printed summary
    headers = [line for line in log.read_text().splitlines() if line.startswith("===== ")]  # one per part run
    assert sum("benchmarks/speed.py" in h for h in headers) == 4
    assert any("-m pytest -m gpu" in h for h in headers) and any("--worker compile" in h for h in headers)
    assert any("--worker rehearsal" in h for h in headers) and any("--worker fit" in h for h in headers)
    return {**json.loads(line), "wall_s": seconds}


@pytest.mark.slow
def test_smoke_has_every_part_within_three_minutes(smoke):
    assert {"setup", "device", "rehearsal", "tests", "speed", "fit", "compile", "graph"} <= set(smoke)
    assert smoke["mode"] == "cpu-smoke" and smoke["device"]["torch"] == torch.__version__
    # 3 minutes: the speed part runs the four torch peers beside learn2learn on one of its cases
    # (measured 124-130 s on an idle 2-core AMD machine, 2026-12-03; Intel machines run ~1.15x longer)
    assert smoke["wall_s"] < 180, smoke["wall_s"]
    tests = smoke["tests"]
    assert all(isinstance(tests[k], int) for k in ("passed", "failed", "errors", "skipped"))
    assert tests["failed"] == tests["errors"] == 0 and tests["skipped"] >= 1  # the gpu tests, skipped on a CPU
    assert isinstance(smoke["setup"]["imports"]["jsonargparse"], str)


@pytest.mark.slow
def test_smoke_rehearses_every_algorithm(smoke):
    from lit_meta.rehearsal import CASES

    rehearsal = smoke["rehearsal"]
    assert rehearsal["ok"] and [c["case"] for c in rehearsal["cases"]] == list(CASES)


@pytest.mark.slow
def test_smoke_speed_has_each_case_and_the_baseline_when_it_imports(smoke):
    cases = {entry["case"]: entry for entry in smoke["speed"]}
    assert set(cases) == {"maml_omniglot_5w1s", "fomaml_omniglot_5w1s", "reptile_omniglot_5w1s",
                          "maml_miniimagenet_shaped_5w1s"}
    l2l = isinstance(smoke["setup"]["imports"]["learn2learn"], str)
    for entry in cases.values():
        assert "error" not in entry, entry
        assert entry["ours_tasks_per_s"] > 0
        assert {"ratio", "ours_peak_mem_mb", "baseline_peak_mem_mb"} <= set(entry)
        # without learn2learn: ours alone, and the entry says why (not a ratio of zero)
        assert (entry["ratio"] > 0) if l2l else (entry["ratio"] is None and "does not import" in entry["baseline"])
        # every torch peer has its row or says why it is absent (parallel_metalearn: no Reptile)
        assert set(entry["peers"]) == set(gpu_check.TORCH_PEERS), entry["peers"]
        for peer, row in entry["peers"].items():
            assert ("absent" in row) != (row.get("ratio", 0) > 0), (peer, row)
    for name in gpu_check.SMOKE_PEER_CASES:  # where the smoke runs them, every importing peer has its figure
        for peer, row in cases[name]["peers"].items():
            assert isinstance(smoke["setup"]["imports"].get(peer), str) == ("absent" not in row), (name, peer, row)
    assert cases["maml_miniimagenet_shaped_5w1s"]["dataset"] == "miniimagenet"
    assert cases["reptile_omniglot_5w1s"]["algorithm"] == "reptile"


@pytest.mark.slow
def test_smoke_fit_checks_syncs_over_logging_steps_and_a_validation_and_times_both_precisions(smoke):
    for precision in ("32-true", "bf16-mixed"):
        fit = smoke["fit"][precision]
        assert "error" not in fit and "timed_error" not in fit, fit
        assert fit["steps_per_s"] > 0 and fit["projected_60k_minutes"] > 0
        # the mean over the smoke's 8 validation tasks x 5 ways x 2 queries: a multiple of 1/80
        assert fit["val_acc"] * 80 == pytest.approx(round(fit["val_acc"] * 80), abs=1e-2)
        assert fit["sample_ms"] > 0
        check = fit["sync_check"]
        assert check["ok"], check
        assert check["logging_steps"] == [4, 9] and check["validated_at"] == [9]
        assert check["hook_calls"]["training_step"] == 12 and check["hook_calls"]["validation_step"] >= 1


@pytest.mark.slow
def test_smoke_compile_captures_one_graph_per_path_and_matches_eager(smoke):
    compiled = {c["path"]: c for c in smoke["compile"]["cases"] if c["mode"] == "aot_eager"}
    assert set(compiled) == {"reptile", "fomaml", "eval"}
    for case in compiled.values():
        assert "error" not in case, case
        assert case["graphs"] == 1 and case["max_abs_diff"] <= 1e-5 and case["ms_per_call"] > 0
    # the captured second-order step: off CUDA the same static-buffer step runs uncaptured, equal to a twin's
    [graphed] = [c for c in smoke["graph"]["cases"] if c["mode"] == "cuda_graph"]
    assert "error" not in graphed, graphed
    assert graphed["path"] == "maml2" and graphed["graphs"] == 0 and graphed["max_abs_diff"] == 0.0
    assert graphed["ms_per_call"] > 0


def test_the_parts_limits_fit_the_deadline():
    """Each part gets its whole limit even when every part before it used all of its own; and
    the call (the deadline, 60 s of margin in its timeout_s, a machine's start measured at 75 s on
    the H200) leaves a session's 15 device minutes room to start a second machine (4 minutes)."""
    assert sum(gpu_check.LIMITS.values()) <= gpu_check.DEADLINE
    assert gpu_check.DEADLINE + 60 + 75 <= 15 * 60 - 4 * 60  # 75 s: the first call held 481.8 s for a 408.4 s run
    assert sum(gpu_check.SMOKE_LIMITS.values()) <= gpu_check.SMOKE_DEADLINE
    args = gpu_check.parse_args([])
    runner = gpu_check.Runner(args, dict(os.environ))
    assert all(runner.budget(part) == limit for part, limit in gpu_check.LIMITS.items())


def test_a_failed_setup_is_that_parts_error_and_the_summary_is_still_printed(tmp_path, monkeypatch, capsys):
    """No jsonargparse and no wheels: the setup part says how to make them, the other parts
    still report, and the JSON line is printed."""
    monkeypatch.setattr(gpu_check, "WHEELS", tmp_path / "no-wheels")
    monkeypatch.setattr(gpu_check, "module_imports", lambda name, env: (False, f"ModuleNotFoundError: {name}"))
    gpu_check.main(["--cpu-smoke", "--skip", "rehearsal", "tests", "speed", "fit", "compile", "graph"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "gpu_wheels.sh" in summary["setup"]["error"]
    assert summary["device"]["torch"] == torch.__version__ and summary["fit"] == {"skipped": "--skip"}


def test_a_package_that_is_there_but_does_not_import_is_reported_as_not_importing(tmp_path):
    (tmp_path / "broken_pkg").mkdir()
    (tmp_path / "broken_pkg" / "__init__.py").write_text("raise ImportError('built for another torch')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    ok, detail = gpu_check.module_imports("broken_pkg", env)
    assert not ok and "built for another torch" in detail
    assert gpu_check.module_imports("json", env)[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer")
def test_without_cuda_it_stops_at_once_with_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.main([])
    captured = capsys.readouterr()
    assert stop.value.code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--cpu-smoke" in lines[0]


def test_a_part_past_its_limit_is_killed_and_reported(tmp_path):
    args = gpu_check.parse_args(["--cpu-smoke"])
    runner = gpu_check.Runner(args, dict(os.environ))
    begin = time.monotonic()
    code, _, seconds = runner.run([sys.executable, "-c", "import time; time.sleep(60)"], timeout=2)
    assert code is None and seconds < 30 and time.monotonic() - begin < 30
    code, output, _ = runner.run([sys.executable, "-c", "raise RuntimeError('broken part')"], timeout=60)
    assert code != 0 and gpu_check.last_error_line(output) == "RuntimeError: broken part"


def test_the_tests_part_collects_only_the_gpu_files_and_keeps_what_finished_when_cut_off():
    files = gpu_check.gpu_test_files()
    assert "tests/test_gpu.py" in files and "tests/test_data_path.py" in files and "tests/test_cli.py" not in files
    output = ("tests/test_gpu.py::test_a PASSED  [ 20%]\ntests/test_gpu.py::test_b[bf16] FAILED  [ 40%]\n"
              "tests/test_data_path.py::test_c SKIPPED (no CUDA)  [ 60%]\nsome other line PASSED\n")
    assert gpu_check.verbose_counts(output) == {"passed": 1, "failed": 1, "errors": 0, "skipped": 1,
                                                "failures": ["tests/test_gpu.py::test_b[bf16]"]}
