"""train.py end to end: results.json, exact resume, bad input, W&B offline."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import sine_config


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


def test_resume_equals_uninterrupted_run(run_cli, capsys):
    # 15 is mid-epoch (10 steps per epoch): the task stream must pick up at step 15.
    common = {"test_after_fit": "false", "trainer.logger.init_args.name": "resume"}
    run_cli("fit", *sine_config(**common, **{"trainer.max_steps": 30}))
    straight = _results(capsys)
    run_cli("fit", *sine_config(**common, **{"trainer.max_steps": 15}))
    half = _results(capsys)
    assert half["train/steps"] == 15
    run_cli("fit", *sine_config(**common, **{"trainer.max_steps": 30, "ckpt_path": half["last_checkpoint"]}))
    resumed = _results(capsys)
    assert resumed["train/steps"] == 30
    a, b = _params(straight["last_checkpoint"]), _params(resumed["last_checkpoint"])
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    # and the optimizer state went along
    opt_a = torch.load(straight["last_checkpoint"], weights_only=False)["optimizer_states"][0]["state"]
    opt_b = torch.load(resumed["last_checkpoint"], weights_only=False)["optimizer_states"][0]["state"]
    assert opt_a[0]["step"] == opt_b[0]["step"] == 30


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
    # wandb's writer is a separate process: on a loaded machine its last records can land
    # a moment after wandb.finish() returns, so wait for them (up to 30 s) before judging.
    deadline = time.monotonic() + 30
    while True:
        runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
        # The run file is a log of protobuf records, whose string fields are stored verbatim.
        records = runs[0].read_bytes() if len(runs) == 1 else b""
        if all(k in records for k in keys) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
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
