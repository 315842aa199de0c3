"""The Omniglot and miniImageNet configs: paper hyperparameters, and end to end on miniatures."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.config_files import composed
from tests.conftest import REPO
from tests.image_data_fixtures import mini_arrays, omniglot_arrays, write_mini_pickles, write_omniglot_npz
from tests.episodes import run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# Finn et al. 2017, appendix A.1: (inner_lr, inner_steps, eval_inner_steps, meta_batch_size)
PAPER = {
    "omniglot/{}_5w1s": (0.4, 1, 3, 32), "omniglot/{}_5w5s": (0.4, 1, 3, 32),
    "omniglot/{}_20w1s": (0.1, 5, 5, 16), "omniglot/{}_20w5s": (0.1, 5, 5, 16),
    "miniimagenet/{}_5w1s": (0.01, 5, 10, 4), "miniimagenet/{}_5w5s": (0.01, 5, 10, 2),
}
CONFIGS = [(pattern.format(algo), values) for pattern, values in PAPER.items() for algo in ("maml", "fomaml")]


@pytest.mark.parametrize("name,values", CONFIGS, ids=[c for c, _ in CONFIGS])
def test_paper_config_hyperparameters(name, values):
    config = composed(REPO / "configs" / f"{name}.yaml")
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert (model["inner_lr"], model["inner_steps"], model["eval_inner_steps"], model["meta_batch_size"]) == values
    assert model["first_order"] == name.split("/")[1].startswith("fomaml")
    assert model["meta_lr"] == 0.001 and config["trainer"]["max_steps"] == 60000
    ways, shots = name.split("_")[-1].split("w")
    assert data["ways"] == int(ways) and data["shots"] == int(shots.rstrip("s"))
    assert data["test_tasks"] == 600
    # cbfinn/maml's network and losses (the config headers say why each differs from lit_meta's defaults)
    finn = {"bn_scale": False, "bn_eps": 0.001, "init": "maml"}
    assert (model["adapt_bn"], model["inner_loss_reduction"], model["meta_loss_reduction"]) == (
        False, "sum_over_shots", "sum_over_shots")
    assert data["eval_queries"] == int(shots.rstrip("s"))  # its test: K queries per class
    if name.startswith("miniimagenet"):
        assert model["backbone_kwargs"] == {"filters": 32, "max_pool": True, **finn}
        assert data["queries"] == 15 and model["grad_clip_value"] == 10 and data["mean"] == [0, 0, 0]
    else:
        assert model["backbone_kwargs"] == {"filters": 64, "max_pool": False, "head_pool": "mean", **finn}
        assert data["split"] == "finn" and data["image_size"] == 28 and data["eval_rotations"] is True


QUICK = str(REPO / "configs" / "omniglot" / "quick_5w1s.yaml")


def test_quick_config_runs_end_to_end(run_cli, capsys, tmp_path):
    root = write_omniglot_npz(tmp_path / "omniglot", omniglot_arrays(background=60, evaluation=40, drawers=20))
    args = ["--config", QUICK, "--data.root", str(root), "--trainer.max_steps", "3",
            "--model.init_args.meta_batch_size", "4", "--data.steps_per_epoch", "3", "--data.val_tasks", "2",
            "--data.test_tasks", "4", "--data.eval_batch_size", "2", "--data.eval_queries", "2"]
    run_cli("fit", *args)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("results: ")
    results = json.loads(Path(last.removeprefix("results: ")).read_text())
    assert results["dataset"] == "omniglot" and results["train/steps"] == 3
    assert (root / "omniglot_28px.pt").is_file()  # the cache, under the root
    # results.json's metrics are the meta-test of best_checkpoint on the 4 test tasks: testing
    # that file again gives them
    from lit_meta.cli import MetaCLI

    cli = MetaCLI(args=args + ["--trainer.logger", "false"], run=False)
    again = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=results["best_checkpoint"],
                             verbose=False)[0]
    assert results["metrics"]["test/tasks"] == again["test/tasks"] == 4
    for key, value in again.items():
        assert results["metrics"][key] == pytest.approx(value, abs=1e-6), key


def test_quick_config_accepts_the_lake_split(tmp_path, monkeypatch):
    from lit_meta.cli import MetaCLI

    root = write_omniglot_npz(tmp_path / "omniglot", omniglot_arrays(background=60, evaluation=40, drawers=20))
    monkeypatch.chdir(tmp_path)
    cli = MetaCLI(args=["--config", QUICK, "--data.root", str(root), "--data.split", "lake"], run=False)
    cli.datamodule.setup("fit")
    test_names = set(cli.datamodule.pools["test"].names)
    assert test_names == {f"images_evaluation/{c}" for c in range(40)}
    assert cli.model.task_spec["split"] == "lake"


def test_bad_data_root_is_a_one_line_cli_error(run_cli, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        run_cli("fit", "--config", str(REPO / "configs" / "omniglot" / "quick_5w1s.yaml"),
                "--data.root", str(tmp_path / "missing"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and str(tmp_path / "missing") in err[-1]


def test_torch_threads_callback_sets_the_count_for_the_fit_and_restores_it(tmp_path):
    """In a fit the step runs at the callback's count; after it (and after a second fit in the
    same process) the process is back at its own count."""
    import pytorch_lightning as pl

    from lit_meta.algorithms import MAML
    from lit_meta.callbacks import TorchThreads
    from lit_meta.data.sine import SineDataModule

    seen = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, *args) -> None:
            seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads = TorchThreads(1)
        dm = SineDataModule(meta_batch_size=2, val_tasks=2, test_tasks=2)
        for _ in range(2):
            pl.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                       callbacks=[threads, Probe()], default_root_dir=tmp_path).fit(MAML(task_spec=dm.task_spec), dm)
            assert torch.get_num_threads() == 2
        assert seen == [1, 1]
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="num_threads"):
        TorchThreads(0)


def test_checkpoint_meta_tests_on_another_datamodule(run_cli, capsys, tmp_path):
    """``test --ckpt_path`` of a Finn-split model on the Lake split: the metrics are the
    checkpoint's accuracy on the Lake test tasks (evaluation characters), recomputed here."""
    from lit_meta.checkpoint import load_checkpoint
    from lit_meta.data import OmniglotDataModule

    root = write_omniglot_npz(tmp_path / "omniglot", omniglot_arrays(background=60, evaluation=40, drawers=20))
    small = ["--model.init_args.meta_batch_size", "4", "--data.steps_per_epoch", "3", "--data.val_tasks", "2",
             "--data.test_tasks", "6", "--data.eval_batch_size", "3", "--data.eval_queries", "2"]
    run_cli("fit", "--config", QUICK, "--data.root", str(root), "--trainer.max_steps", "3",
            "--test_after_fit", "false", *small)
    results = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("results: ")).read_text())
    ckpt = results["last_checkpoint"]
    assert load_checkpoint(ckpt).task_spec["split"] == "finn"

    run_cli("test", "--config", QUICK, "--data.root", str(root), "--data.split", "lake", "--ckpt_path", ckpt, *small)
    metrics_csv = sorted((tmp_path / "logs").rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)[-1]
    logged = {k: float(v) for k, v in zip(*[line.split(",") for line in metrics_csv.read_text().splitlines()[:2]]) if v}

    model = load_checkpoint(ckpt)
    dm = OmniglotDataModule(str(root), split="lake", meta_batch_size=4, val_tasks=2, test_tasks=6, eval_batch_size=3,
                            eval_queries=2, eval_rotations=True)  # the quick config's test protocol
    dm.setup("test")
    assert set(dm.pools["test"].names) == {f"images_evaluation/{c}" for c in range(40)}
    accs = torch.cat([run(model, dm.eval_batch("test", i), model.eval_inner_steps, first_order=True,
                                      training=False)["query_acc"] for i in range(2)])
    assert logged["test/tasks"] == 6
    assert logged["test/acc"] == pytest.approx(accs.double().mean().item(), abs=1e-6)


def test_checkpoint_for_another_image_size_is_a_one_line_error(run_cli, capsys, tmp_path):
    root = write_omniglot_npz(tmp_path / "omniglot", omniglot_arrays(background=60, evaluation=40, drawers=20))
    small = ["--model.init_args.meta_batch_size", "4", "--data.steps_per_epoch", "3", "--data.val_tasks", "2",
             "--data.test_tasks", "4", "--data.eval_batch_size", "2", "--data.eval_queries", "2"]
    run_cli("fit", "--config", QUICK, "--data.root", str(root), "--trainer.max_steps", "2",
            "--test_after_fit", "false", *small)
    ckpt = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("results: ")).read_text())[
        "last_checkpoint"]
    with pytest.raises(SystemExit) as exc:
        run_cli("test", "--config", QUICK, "--data.root", str(root), "--data.image_size", "14", "--ckpt_path", ckpt,
                *small)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and ckpt in err[-1] and "image_size" in err[-1]


def test_checkpoint_with_other_layer_shapes_names_the_parameter():
    from lit_meta.algorithms import MAML
    from lit_meta.tasks import task_spec

    spec = task_spec("omniglot", "classification", [1, 28, 28], 5)
    saved = MAML(task_spec=spec, backbone_kwargs={"filters": 8}).state_dict()
    with pytest.raises(ValueError, match=r"checkpoint net\.body\.0\.weight has shape \[8, 1, 3, 3\] .* \[16, 1, 3, 3\]"):
        MAML(task_spec=spec, backbone_kwargs={"filters": 16}).on_load_checkpoint({"state_dict": saved})
