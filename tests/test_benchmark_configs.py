"""The new benchmarks end to end: ``train.py fit --config configs/<dataset>/maml_5w1s.yaml`` on a
miniature of the original source writes results.json, ``train.py adapt`` works on the checkpoint,
the configs hold their published hyperparameters, and bad input is one ``error:`` line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lit_meta.cli import main
from lit_meta.data.imagenet_train import ImageNetTrain
from lit_meta.data.splits import read_class_list, read_ravi, read_tiered, split_files
from tests.config_files import composed
from tests.conftest import REPO
from tests.source_fixtures import cifar_image, cifar_names, write_all_sources, write_cub

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
DATASETS = ["cifar_fs", "fc100", "cub", "tieredimagenet", "miniimagenet"]
# a miniature has 2..4 images per class: one query each, two evaluation tasks, 16x16 images
SMALL = ["--trainer.max_steps", "5", "--data.init_args.queries", "1", "--data.init_args.eval_queries", "1",
         "--data.init_args.val_tasks", "2", "--data.init_args.test_tasks", "2", "--data.init_args.image_size", "16",
         "--data.init_args.steps_per_epoch", "5"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    return write_all_sources(tmp_path_factory.mktemp("sources"))


def data_args(dataset: str, sources: dict[str, Path], tmp_path: Path) -> list[str]:
    """The source of each benchmark, as a user gives it (caches under --data.root)."""
    return {
        "cifar_fs": ["--data.root", str(sources["cifar"])],
        "fc100": ["--data.root", str(sources["cifar_tgz"])],
        "cub": ["--data.root", str(sources["cub_tgz"])],
        "tieredimagenet": ["--data.root", str(tmp_path / "tiered"), "--data.imagenet_root",
                           str(sources["imagenet_tars"])],
        "miniimagenet": ["--data.root", str(tmp_path / "mini"), "--data.imagenet_root", str(sources["imagenet"]),
                         "--data.split_dir", str(sources["ravi"])],
    }[dataset]


def task_folders(dataset: str, sources: dict[str, Path], folder: Path) -> tuple[Path, Path]:
    """A 3-way task of test classes as image files (support: one per class; query: one per class)."""
    support, query = folder / "support", folder / "query"
    if dataset in ("cifar_fs", "fc100"):
        names, _, _ = cifar_names()
        classes = sorted(read_class_list(split_files("cifar_fs")["test"]))[:3] if dataset == "cifar_fs" else \
            ["beaver", "bee", "baby"]
        files = {c: [(cifar_image(names.index(c), i, 0).transpose(1, 2, 0), f"{i}.png") for i in range(2)]
                 for c in classes}
    else:
        if dataset == "cub":
            classes = read_class_list(split_files("cub")["test"])[:3]
            paths = {c: sorted((sources["cub"] / "CUB_200_2011" / "images" / c).glob("*.jpg")) for c in classes}
        else:
            wnids = sorted(read_ravi(sources["ravi"] / "test.csv")) if dataset == "miniimagenet" else \
                [w for w, _ in read_tiered(split_files("tieredimagenet")["test"])]
            classes = wnids[:3]
            paths = {c: [Path(n) for n in ImageNetTrain(sources["imagenet"]).files(c).names[:2]] for c in classes}
        files = {c: [(np.asarray(Image.open(p).convert("RGB")), p.name) for p in paths[c]] for c in classes}
    for c, images in files.items():
        for target, (image, name) in zip((support, query), images):
            (target / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(target / c / Path(name).with_suffix(".png"))
    return support, query


@pytest.mark.parametrize("dataset", DATASETS)
def test_maml_config_trains_on_the_miniature_and_its_checkpoint_adapts(dataset, sources, run_cli, capsys, tmp_path):
    run_cli("fit", "--config", str(REPO / "configs" / dataset / "maml_5w1s.yaml"),
            *data_args(dataset, sources, tmp_path), *SMALL)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("results: ")
    results = json.loads(Path(last.removeprefix("results: ")).read_text())
    assert results["dataset"] == dataset and results["algorithm"] == "maml" and results["train/steps"] == 5
    # the mean over exactly 2 test tasks x 5 ways x 1 query: a multiple of 1/10
    acc = results["metrics"]["test/acc"]
    assert results["metrics"]["test/tasks"] == 2 and acc * 10 == pytest.approx(round(acc * 10), abs=1e-5)
    support, query = task_folders(dataset, sources, tmp_path / "task")
    main(["adapt", "--ckpt_path", results["best_checkpoint"], "--support", str(support), "--query", str(query)])
    out = capsys.readouterr()
    accuracy = [line for line in out.out.splitlines() if line.startswith("accuracy: ")]
    # the printed accuracy is that of the printed predictions (file, prediction, label)
    rows = [line.split() for line in out.out.splitlines()[1:] if len(line.split()) == 3]
    assert len(rows) == 3 and len(accuracy) == 1
    assert float(accuracy[0].split()[1]) == pytest.approx(sum(r[1] == r[2] for r in rows) / 3, abs=1e-4)
    assert "head" in out.err  # the 5-way checkpoint adapts a new 3-way head, and says so


@pytest.mark.parametrize("dataset", ["cifar_fs", "fc100", "tieredimagenet"])
def test_configs_reuse_the_miniimagenet_setting_and_say_so(dataset):
    for shots, meta_batch in ((1, 4), (5, 2)):
        text = (REPO / "configs" / dataset / f"maml_5w{shots}s.yaml").read_text()
        mini = composed(REPO / "configs" / "miniimagenet" / f"maml_5w{shots}s.yaml")
        config = composed(REPO / "configs" / dataset / f"maml_5w{shots}s.yaml")
        header = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
        assert "the miniImageNet setting of Finn et al. 2017 (appendix A.1) is reused" in header
        assert config["model"] == mini["model"] and config["model"]["init_args"]["meta_batch_size"] == meta_batch
        assert config["trainer"]["max_steps"] == 60000 and config["data"]["init_args"]["shots"] == shots
        assert config["data"]["init_args"]["test_tasks"] == 600


def test_cub_configs_hold_closerlooks_maml_hyperparameters():
    for shots, steps in ((1, 60000), (5, 40000)):
        text = (REPO / "configs" / "cub" / f"maml_5w{shots}s.yaml").read_text()
        config = composed(REPO / "configs" / "cub" / f"maml_5w{shots}s.yaml")
        model, data = config["model"]["init_args"], config["data"]["init_args"]
        assert "CloserLookFewShot" in text
        assert model["backbone_kwargs"] == {"filters": 64, "max_pool": True}
        assert (model["inner_lr"], model["inner_steps"], model["eval_inner_steps"], model["meta_batch_size"],
                model["meta_lr"], model["first_order"]) == (0.01, 5, 5, 4, 0.001, False)
        assert (data["queries"], data["eval_queries"], data["test_tasks"], data["image_size"]) == (16, 15, 600, 84)
        assert config["trainer"]["max_steps"] == steps


def test_bad_source_is_one_error_line_from_train_py(run_cli, capsys, tmp_path):
    root = write_cub(tmp_path / "cub", skip=("002.Laysan_Albatross", "006.Least_Auklet"))
    with pytest.raises(SystemExit) as exc:
        run_cli("fit", "--config", str(REPO / "configs" / "cub" / "maml_5w1s.yaml"), "--data.root", str(root), *SMALL)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: CUB source ") and "lacks 2 of the 200 classes" in err[-1]
    assert "first '002.Laysan_Albatross'" in err[-1]
    with pytest.raises(SystemExit):
        run_cli("fit", "--config", str(REPO / "configs" / "tieredimagenet" / "maml_5w1s.yaml"),
                "--data.root", str(tmp_path / "nothing"), *SMALL)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no tieredImageNet cache") and "--data.imagenet_root" in err[-1]
