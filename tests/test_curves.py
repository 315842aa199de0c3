"""Curves people can look at (issue 17 §4): the test adaptation curve and the evaluation
protocol in results.json, the plot script, progress lines in logs, the W&B plots, and the
every-algorithm Omniglot table script on the tests' miniature Omniglot."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import REPO, sine_config
from tests.image_data_fixtures import omniglot_arrays, write_omniglot_npz
from tests.wandb_files import offline_records

QUICK = str(REPO / "configs" / "omniglot" / "quick_5w1s.yaml")
SMALL = ["--model.init_args.meta_batch_size", "4", "--data.steps_per_epoch", "3", "--data.val_tasks", "4",
         "--data.test_tasks", "6", "--data.eval_batch_size", "3", "--trainer.log_every_n_steps", "1"]


def last_results(capsys) -> dict:
    out = capsys.readouterr().out
    return json.loads(Path(out.strip().splitlines()[-1].removeprefix("results: ")).read_text())


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory) -> Path:
    return write_omniglot_npz(tmp_path_factory.mktemp("curves") / "omniglot",
                              omniglot_arrays(background=60, evaluation=40, drawers=20))


def test_results_json_holds_the_test_curve_and_the_protocol(run_cli, capsys, omniglot_root):
    run_cli("fit", "--config", QUICK, "--data.root", str(omniglot_root), "--trainer.max_steps", "6", *SMALL)
    results = last_results(capsys)
    metrics = results["metrics"]
    curve = metrics["test/acc_by_step"]
    assert len(curve) == 3 + 1  # after 0, 1, 2 and 3 inner steps (the config tests with 3)
    assert curve[-1] == metrics["test/acc"]  # exactly: the same predictions, the same rounding
    assert curve[0] == metrics["test/acc_before"]
    assert len(metrics["test/loss_by_step"]) == 4 and metrics["test/loss_by_step"][-1] == metrics["test/loss"]
    assert results["protocol"] == {"bn": "transductive", "test/adapt_steps": 3, "test/inner_batch_size": None,
                                   "ways": 5, "shots": 1, "queries_per_class": 1, "test_tasks": 6, "val_tasks": 4,
                                   "seed": 0, "eval_rotations": True}
    validations = results["val_curve"]
    assert [v["step"] for v in validations] == [3, 6]
    assert all(0 < v["wall_s"] and 0 <= v["val/acc"] <= 1 for v in validations)
    assert validations[0]["wall_s"] < validations[1]["wall_s"] <= results["train/seconds"]


def test_results_json_mse_curve_ends_at_the_reported_mse(run_cli, capsys):
    run_cli("fit", *sine_config())
    metrics = last_results(capsys)["metrics"]
    assert len(metrics["test/mse_by_step"]) == 10 + 1
    assert metrics["test/mse_by_step"][-1] == metrics["test/mse_after"]
    assert metrics["test/mse_by_step"][0] == metrics["test/mse_before"]
    assert metrics["test/mse_by_step"][-1] < metrics["test/mse_by_step"][0]


def test_plot_script_draws_a_png_of_a_run(run_cli, capsys, tmp_path):
    run_cli("fit", *sine_config())
    results = last_results(capsys)
    spec = importlib.util.spec_from_file_location("plot_results", REPO / "scripts" / "plot_results.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    for source, x in ((Path(results["best_checkpoint"]).parent.parent, "step"), (tmp_path / "logs", "time")):
        out = tmp_path / f"curves-{x}.png"
        assert plot.main([str(source), "--output", str(out), "--x", x]) == 0
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert plot.main([str(tmp_path / "nowhere"), "--output", str(tmp_path / "x.png")]) == 2
    assert "no such run" in capsys.readouterr().err


def test_progress_lines_appear_when_the_output_is_not_a_terminal(run_cli, capsys):
    run_cli("fit", *sine_config(), "--test_after_fit", "false")
    lines = capsys.readouterr().out.splitlines()
    train = [line for line in lines if line.startswith("[train] step ")]
    val = [line for line in lines if line.startswith("[val] step ")]
    assert train and train[0].startswith("[train] step 5/20 | train/mse ")
    assert "steps/s" in train[0] and "ETA" in train[0] and "elapsed" in train[0]
    assert [line.split(" | ")[0] for line in val] == ["[val] step 10/20", "[val] step 20/20"]
    assert all("val/mse_after" in line for line in val)
    assert any(line.startswith("[done] step 20/20") for line in lines)


def test_wandb_gets_the_curves_as_plots(run_cli, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_cli("fit", *sine_config(config=REPO / "configs" / "logger" / "wandb.yaml",
                                **{"trainer.logger.init_args.save_dir": tmp_path / "wb"}))
    keys = (b"test/mse_by_step_plot", b"val/curve", b"val/mse_after_vs_time")
    runs, records = offline_records(tmp_path / "wb", keys)
    for key in keys:
        assert key in records, (key, list((tmp_path / "wb").rglob("*"))[:20])


@pytest.mark.slow  # benchmark tooling: two Omniglot runs in subprocesses (20 s)
def test_omniglot_table_script_trains_tests_and_writes_table_json_and_figure(omniglot_root, tmp_path):
    spec = importlib.util.spec_from_file_location("omniglot_table", REPO / "benchmarks" / "omniglot_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nbefore\n\n<!-- omniglot_table:begin -->\nold\n<!-- omniglot_table:end -->\n\nafter\n")
    code = table.main(["--data-root", str(omniglot_root), "--only", "maml,reptile+ga", "--budget-minutes", "0.04",
                       "--test-tasks", "4", "--val-tasks", "2", "--eval-batch-size", "2",
                       "--out-dir", str(tmp_path / "runs"), "--results-md", str(md), "--json", str(tmp_path / "t.json"),
                       "--figure", str(tmp_path / "t.png")])
    assert code == 0
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["maml", "reptile+ga"]
    assert all(r["steps"] >= 1 and 0 <= r["acc"] <= 1 and r["acc_by_step"][-1] == r["acc"] for r in rows)
    assert rows[1]["test_steps"] == 50 and rows[1]["bn"] == "non-transductive"  # Reptile's own test procedure
    text = md.read_text()
    assert text.startswith("# Results\n\nbefore\n") and text.endswith("<!-- omniglot_table:end -->\n\nafter\n")
    assert "old" not in text and "| maml | **" in text and "| reptile+ga | **" in text
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    # the same test tasks for both: the runs' test protocol is the table's
    results = [json.loads(Path(r["results_json"]).read_text())
               for r in json.loads((tmp_path / "t.json").read_text())["runs"]]
    assert all(r["protocol"]["queries_per_class"] == 1 and r["protocol"]["eval_rotations"] for r in results)
    assert table.main(["--data-root", str(omniglot_root), "--only", "nope"]) == 2
