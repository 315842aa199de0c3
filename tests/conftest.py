"""Shared fixtures: tiny problems, and an in-process ``train.py`` runner writing to tmp_path."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"


def _imports(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - an optional package that is there but broken counts as absent
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped where there is no CUDA device, and tests marked
    ``learn2learn`` where that optional extra does not import, each with the reason."""
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="marked gpu: needs a CUDA device, and torch sees none")
    if any(item.get_closest_marker("learn2learn") for item in items) and not _imports("learn2learn"):
        skips["learn2learn"] = pytest.mark.skip(
            reason="marked learn2learn: needs the optional learn2learn 0.2.0; install it with "
                   "`bash benchmarks/install_learn2learn.sh`, then run `pytest -m learn2learn`")
    for item in items:
        for marker, skip in skips.items():
            if item.get_closest_marker(marker) is not None:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from seed 0 and the session's thread count, whatever ran before it
    (a fit's TorchThreads, a test's own set_num_threads): timing and float rounding of a test
    must not depend on the order the tests run in."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One torch thread: these tests run tiny tensors, where a second OpenMP thread only adds
    sync cost, and on a busy 2-core machine stalls on every op (see docs/RESULTS.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_cli(tmp_path, monkeypatch):
    """Run ``train.py`` in-process with the working directory at ``tmp_path``."""
    from lit_meta.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_SILENT", "true")

    def run(*args: str) -> None:
        main(list(args))

    return run


def train_py_env() -> dict[str, str]:
    """The environment for ``python train.py`` in a subprocess: this checkout first on the path,
    one thread, and no LIT_META_TRACEBACK (the one-line errors are what is tested)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    env.pop("LIT_META_TRACEBACK", None)
    return env


def train_py(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in a fresh process (DDP's launcher re-runs the command line for
    rank 1, so a multi-process run cannot be run in-process under pytest)."""
    return subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, args)], cwd=cwd, env=train_py_env(),
                          capture_output=True, text=True, timeout=timeout)


def sine_config(algorithm: str = "maml", **overrides) -> list[str]:
    """A few-second sine fit of ``configs/sine/<algorithm>.yaml``; overrides are ``key=value`` CLI flags."""
    args = [
        "--config", str(REPO / "configs" / "sine" / f"{algorithm}.yaml"),
        "--trainer.max_steps", "20",
        "--data.steps_per_epoch", "10",
        "--data.val_tasks", "20",
        "--data.test_tasks", "20",
        "--trainer.log_every_n_steps", "5",
    ]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    return args
