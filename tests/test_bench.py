"""The benchmark harness (lit_meta.bench) and the scripts over it (benchmarks/*.py).

No timing figures here: the tests check what the harness builds and that its memory
measurement tells a bigger case from a smaller one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lit_meta.bench.case import Case, build_data, build_ours
from lit_meta.bench.measure import build_sides, measure_case, peak_memory_mb
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")


def test_miniimagenet_case_has_its_shape_network_and_episode_sizes():
    case = Case(dataset="miniimagenet", queries=15, meta_batch_size=2)
    data = build_data(case)
    batch = data.datamodule.train_batch(0)
    assert batch.support_x.shape == (2, 5, 3, 84, 84) and batch.query_x.shape == (2, 75, 3, 84, 84)
    assert batch.query_y[0].tolist() == [c for c in range(5) for _ in range(15)]
    model, _ = build_ours(case, data)
    convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32] * 4 and all(c.stride == (1, 1) for c in convs)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.net.modules()) == 4
    assert case.inner_lr == 0.01 and Case(algorithm="reptile").meta_lr == 1.0


def test_a_case_rejects_an_unknown_dataset_in_one_line():
    with pytest.raises(ValueError, match="dataset must be one of .*'cifar'"):
        Case(dataset="cifar")


def test_ours_step_moves_the_weights_and_model_kwargs_reach_the_model():
    case = Case(random_images=True, meta_batch_size=2, model_kwargs={"eval_inner_steps": 7})
    built = build_sides(case, ["ours"])
    assert built.model.eval_inner_steps == 7
    before = [p.detach().clone() for p in built.model.parameters()]
    built.steps["ours"]()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, built.model.parameters()))


@pytest.mark.slow  # benchmark tooling: fresh subprocesses (13 s)
def test_cpu_peak_memory_grows_with_the_meta_batch():
    """Fresh subprocesses; second-order MAML keeps every task's graph, so 16 tasks need
    clearly more than 2 (measured: 39 vs 138 MB)."""
    small = peak_memory_mb(Case(random_images=True, meta_batch_size=2), steps=1, threads=1)
    large = peak_memory_mb(Case(random_images=True, meta_batch_size=16), steps=1, threads=1)
    assert 0 < small and large > 2 * small, (small, large)


def test_measure_case_gives_json_ready_figures_per_side():
    case = Case(random_images=True, meta_batch_size=2)
    result = measure_case(case, ["ours"], steps=2, warmup=0, memory=False)
    ours = result["ours"]
    assert len(ours["seconds"]) == 2 and ours["peak_mem_mb"] is None and "random images" in ours["data"]
    assert ours["tasks_per_s"] == pytest.approx(2 * 2 / sum(ours["seconds"]))
    json.dumps(result)


def test_every_benchmark_script_runs_as_a_file_with_only_lit_meta_importable(tmp_path):
    """As with lit_meta installed: the repository root is not on sys.path, so a script
    that imported a sibling or ``benchmarks.*`` (or needed a sys.path edit) fails here."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "lit_meta").symlink_to(REPO / "lit_meta")
    scripts = sorted(str(p) for p in (REPO / "benchmarks").glob("*.py") if p.name != "__init__.py")
    code = (
        "import runpy, sys\n"
        "failed = []\n"
        f"for script in {scripts!r}:\n"
        "    sys.argv = [script, '--help']\n"
        "    try:\n"
        "        runpy.run_path(script, run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        if e.code not in (0, None): failed.append((script, e.code))\n"
        "    except Exception as e:\n"
        "        failed.append((script, repr(e)))\n"
        "print('FAILED', failed)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "FAILED []", out.stdout[-2000:]
    assert len(scripts) >= 5


@pytest.mark.gpu
def test_cuda_peak_memory_grows_with_the_meta_batch():
    small = peak_memory_mb(Case(random_images=True, meta_batch_size=2, device="cuda"), steps=1)
    large = peak_memory_mb(Case(random_images=True, meta_batch_size=16, device="cuda"), steps=1)
    assert 0 < small and large > 2 * small, (small, large)
