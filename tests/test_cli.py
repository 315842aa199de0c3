"""train.py end to end: results.json, exact resume, bad input, W&B offline."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from tests.conftest import sine_config
from tests.wandb_files import offline_records


def _results(capsys) -> dict:
    lines = [l for l in capsys.readouterr().out.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("results: "), lines[-3:]
    return json.loads(Path(lines[-1].removeprefix("results: ")).read_text())


def test_fit_writes_results_json_and_prints_its_path_last(run_cli, capsys):
    run_cli("fit", *sine_config())
    results = _results(capsys)
    assert results["algorithm"] == "maml" and results["dataset"] == "sine"
    metrics = results["metrics"]
    for key in ("test/mse_before", "test/mse_after", "test/tasks", "test/adapt_steps"):
        assert key in metrics
    assert metrics["test/tasks"] == 20 and metrics["test/adapt_steps"] == 10
    assert results["train/steps"] == 20 and results["train/seconds"] > 0
    assert Path(results["best_checkpoint"]).is_file() and Path(results["last_checkpoint"]).is_file()
    assert Path(results["last_checkpoint"]).name == "last.ckpt"


def _params(ckpt: str) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


class StopAt(pl.Callback):
    """Ends fit after meta-step ``step``, as a preempted job would (fit still writes last.ckpt)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def train_steps_logged(results: dict) -> list[int]:
    import csv

    rows = csv.DictReader((Path(results["last_checkpoint"]).parent.parent / "metrics.csv").open())
    # Reptile has no query pass: it logs the support loss
    return [int(r["step"]) for r in rows if r.get("train/mse") or r.get("train/support_mse")]


# Schedules that depend on the step or epoch: Reptile's meta step annealed linearly to 0 over
# max_steps; MAML++'s cosine meta rate, multi-step loss and first-order epochs (both end at step
# 20, after the resume at 15: 10 steps per epoch).
RESUMABLE = {
    "maml": {},
    "reptile": {},
    "mamlpp": {"model.init_args.msl_epochs": 2, "model.init_args.first_order_epochs": 2},
    "imaml": {"model.init_args.inner_steps": 3},  # implicit gradients written by the meta-step
    "boil": {},
}


@pytest.mark.parametrize("algorithm", list(RESUMABLE))
def test_resume_equals_uninterrupted_run(run_cli, capsys, monkeypatch, algorithm):
    """A run stopped at step 15 (mid-epoch) and resumed with --ckpt_path ends with the weights and
    optimizer state of one that ran straight through. The resumed leg is seeded differently
    (seed_everything 1, not 0): a restart from step 0 would start from other weights and fail,
    and its log must begin after step 15."""
    import lit_meta.cli as cli

    common = {"algorithm": algorithm, "test_after_fit": "false", "trainer.max_steps": 30,
              "trainer.logger.init_args.name": "resume", **RESUMABLE[algorithm]}
    run_cli("fit", *sine_config(**common))
    straight = _results(capsys)
    original = cli.MetaCLI.before_fit

    def preempted(self):
        self.trainer.callbacks.append(StopAt(15))
        original(self)

    monkeypatch.setattr(cli.MetaCLI, "before_fit", preempted)
    run_cli("fit", *sine_config(**common))
    half = _results(capsys)
    assert half["train/steps"] == 15
    monkeypatch.setattr(cli.MetaCLI, "before_fit", original)
    run_cli("fit", *sine_config(**common, seed_everything=1, ckpt_path=half["last_checkpoint"]))
    resumed = _results(capsys)
    assert resumed["train/steps"] == 30
    assert train_steps_logged(straight) == [4, 9, 14, 19, 24, 29]
    assert train_steps_logged(resumed) == [19, 24, 29]  # began at the restored step
    a, b = _params(straight["last_checkpoint"]), _params(resumed["last_checkpoint"])
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    # and the optimizer state and the learning-rate schedule went along
    state_a = torch.load(straight["last_checkpoint"], weights_only=False)
    state_b = torch.load(resumed["last_checkpoint"], weights_only=False)
    assert state_a["optimizer_states"][0]["param_groups"][0]["lr"] == state_b["optimizer_states"][0]["param_groups"][0]["lr"]
    opt_a, opt_b = state_a["optimizer_states"][0]["state"], state_b["optimizer_states"][0]["state"]
    for key in opt_a:
        for name, value in opt_a[key].items():
            torch.testing.assert_close(opt_b[key][name], value, rtol=0, atol=1e-6)


def test_config_key_typo_names_the_key(run_cli, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli("fit", *sine_config(**{"model.init_args.inner_lrr": 0.1}))
    assert exc.value.code != 0
    assert "inner_lrr" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("model.init_args.inner_steps", -1, "inner_steps"),
        ("model.init_args.weighting", "agreement", "weighting must be one of"),
        ("model.init_args.inner_lr", 0, "inner_lr"),
        ("data.init_args.shots", 0, "shots"),
    ],
)
def test_invalid_value_is_a_one_line_error_naming_the_option(run_cli, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exc:
        run_cli("fit", *sine_config(**{flag: value}))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not Path("logs").exists() or not list(Path("logs").rglob("*.ckpt"))


def test_missing_and_corrupt_checkpoint_name_the_file(run_cli, capsys, tmp_path):
    with pytest.raises(SystemExit):
        run_cli("fit", *sine_config(ckpt_path=tmp_path / "nope.ckpt"))
    assert "nope.ckpt" in capsys.readouterr().err.splitlines()[-1]
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit):
        run_cli("test", *sine_config(ckpt_path=bad))
    last = capsys.readouterr().err.splitlines()[-1]
    assert "bad.ckpt" in last and "corrupt" in last
    assert bad.read_bytes() == b"not a checkpoint at all"  # never touched


def test_wandb_offline_run_holds_logged_metrics(run_cli, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_MODE", raising=False)
    repo = Path(__file__).resolve().parent.parent
    run_cli("fit", *sine_config(config=repo / "configs" / "logger" / "wandb.yaml",
                                **{"trainer.logger.init_args.save_dir": tmp_path / "wb"}))
    assert "logging to W&B offline" in capsys.readouterr().err
    keys = (b"train/mse", b"val/mse_after", b"test/mse_after", b"meta/weight_spread")
    runs, records = offline_records(tmp_path / "wb", keys)
    assert len(runs) == 1, runs
    for key in keys:
        assert key in records, key


def test_training_values_reach_the_log_every_n_steps(run_cli, capsys, tmp_path):
    """Training values are computed for the logger only on the steps it writes (self.log is
    costly), and every written step has the loss and the task-weight statistics."""
    import csv

    run_cli("fit", *sine_config(), "--test_after_fit", "false")
    rows = list(csv.DictReader(next((tmp_path / "logs").rglob("metrics.csv")).open()))
    train = [r for r in rows if r.get("train/mse")]
    assert [int(r["step"]) for r in train] == [4, 9, 14, 19]
    assert all(r["meta/weight_spread"] != "" for r in train)


def test_kill_9_of_a_real_run_resumes_to_the_uninterrupted_result(run_cli, capsys, tmp_path):
    """``python train.py fit`` on sine, validating (and so writing last.ckpt) every 5 steps, is
    killed with SIGKILL as soon as its first last.ckpt exists; ``--ckpt_path last.ckpt`` (seeded
    differently, so a restart from step 0 could not pass) ends with the weights of a run that was
    never interrupted."""
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO, train_py_env

    common = {"test_after_fit": "false", "trainer.max_steps": 100, "data.steps_per_epoch": 5, "data.val_tasks": 5}
    killed_dir = tmp_path / "killed"
    args = sine_config(**common, **{"trainer.default_root_dir": killed_dir})
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "fit", *args], cwd=tmp_path, env=train_py_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while not list(killed_dir.rglob("last.ckpt")):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "no last.ckpt within 240 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    last = next(killed_dir.rglob("last.ckpt"))
    step = torch.load(last, weights_only=False)["global_step"]
    assert 5 <= step < 100, step

    run_cli("fit", *sine_config(**common, **{"trainer.default_root_dir": tmp_path / "straight"}))
    straight = _results(capsys)
    run_cli("fit", *sine_config(**common, seed_everything=1, ckpt_path=last,
                                **{"trainer.default_root_dir": tmp_path / "resumed"}))
    resumed = _results(capsys)
    assert straight["train/steps"] == resumed["train/steps"] == 100
    logged = train_steps_logged(resumed)
    assert logged and logged[0] > step  # began at the killed run's step (and still logs training values)
    a, b = _params(straight["last_checkpoint"]), _params(resumed["last_checkpoint"])
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_default_root_dir_holds_the_whole_run(run_cli, capsys, tmp_path):
    """Two jobs started from one working directory with their own --trainer.default_root_dir:
    each one's logs, checkpoints, config and results.json are under its own folder, and nothing
    is written to the working directory. A save_dir given explicitly still wins."""
    short = {"trainer.max_steps": 5, "data.steps_per_epoch": 5, "data.val_tasks": 5, "data.test_tasks": 5}
    for job in ("a", "b"):
        run_cli("fit", *sine_config(**short, **{"trainer.default_root_dir": tmp_path / "jobs" / job}))
        results = _results(capsys)
        run = tmp_path / "jobs" / job / "logs" / "sine_maml" / "version_0"
        assert Path(results["last_checkpoint"]) == run / "checkpoints" / "last.ckpt"
        assert Path(results["best_checkpoint"]).parent == run / "checkpoints"
        assert {"metrics.csv", "config.yaml", "hparams.yaml", "results.json"} <= {p.name for p in run.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["jobs"]  # tmp_path is the working directory
    run_cli("fit", *sine_config(**short, **{"trainer.default_root_dir": tmp_path / "jobs" / "c",
                                            "trainer.logger.init_args.save_dir": tmp_path / "elsewhere"}))
    assert Path(_results(capsys)["last_checkpoint"]).is_relative_to(tmp_path / "elsewhere" / "sine_maml")


def test_wandb_part_logs_under_the_root_dir(tmp_path, monkeypatch):
    from lit_meta.cli import MetaCLI
    from tests.conftest import REPO

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli = MetaCLI(args=sine_config(config=REPO / "configs" / "logger" / "wandb.yaml",
                                   **{"trainer.default_root_dir": tmp_path / "root"}), run=False)
    assert type(cli.trainer.logger).__name__ == "WandbLogger"
    assert Path(cli.trainer.logger.save_dir) == tmp_path / "root" / "logs"
