"""Every config in configs/ parses and takes two training steps on generated data."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.image_data_fixtures import mini_arrays, omniglot_arrays, write_mini_pickles, write_omniglot_npz
from tests.source_fixtures import write_all_sources

IMAGE_DATASETS = ("omniglot", "miniimagenet", "cifar_fs", "fc100", "cub", "tieredimagenet")


def _param(config: str):
    # The default run covers every sine / learning_to_learn config and every algorithm's 5-way 1-shot
    # image config; the other shot and way counts differ only in numbers (`pytest -m slow`).
    image = config.split("/")[0] in IMAGE_DATASETS
    return pytest.param(config, marks=pytest.mark.slow) if image and "_5w1s" not in config else config


CONFIGS = [
    _param(p.relative_to(REPO / "configs").as_posix())
    for p in sorted((REPO / "configs").rglob("*.yaml"))
    if p.parent.name not in ("logger", "trainer") and p.name != "data.yaml"  # data.yaml: a part, composed below
]
DATA_PARTS = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").glob("*/data.yaml"))


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("config-data")
    # 330 characters: enough for 20-way episodes in every split of the Finn proportions.
    omniglot = write_omniglot_npz(base / "omniglot", omniglot_arrays(background=200, evaluation=130, drawers=20))
    mini = write_mini_pickles(base / "mini", mini_arrays(classes={"train": 6, "val": 5, "test": 5},
                                                         per_class=20, size=84))
    sources = write_all_sources(base / "sources")
    return {"omniglot": omniglot, "miniimagenet": mini, "cache": base / "cache", "cifar_fs": sources["cifar"],
            "fc100": sources["cifar"], "cub": sources["cub"], "tieredimagenet": base / "tiered",
            "imagenet": sources["imagenet"]}


def data_args(dataset: str, roots: dict[str, Path]) -> list[str]:
    if dataset not in IMAGE_DATASETS:
        return []
    args = ["--data.root", str(roots[dataset]), "--data.cache_dir", str(roots["cache"])]
    if dataset in ("omniglot", "miniimagenet"):
        return args
    # the original-source miniatures hold 2-4 images per class: one query per class
    args += ["--data.queries", "1", "--data.eval_queries", "1"]
    return args + (["--data.imagenet_root", str(roots["imagenet"])] if dataset == "tieredimagenet" else [])


@pytest.mark.parametrize("config", CONFIGS)
def test_config_takes_two_training_steps(config, roots, tmp_path, monkeypatch):
    from lit_meta.cli import MetaCLI

    monkeypatch.chdir(tmp_path)
    args = ["--config", str(REPO / "configs" / config), *data_args(config.split("/")[0], roots)]
    cli = MetaCLI(args=args, run=False)
    model, dm = cli.model, cli.datamodule
    if hasattr(model, "meta_batch_size") and hasattr(dm, "meta_batch_size"):
        # keep the test fast: two tasks per step, whatever the paper's meta-batch
        model.meta_batch_size = dm.meta_batch_size = 2
    dm.setup("fit")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(2):
        model.outer_update(dm.train_batch(step))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, f"{config}: no parameter moved"
    assert all(math.isfinite(p.detach().abs().sum().item()) for p in model.parameters())


@pytest.mark.parametrize("part", DATA_PARTS)
def test_data_part_composes_with_an_algorithm_config(part, roots, tmp_path, monkeypatch):
    """``--config <algorithm config> --config configs/<dataset>/data.yaml``: the dataset's class and
    source, the algorithm config's model and episode sizes (LightningCLI carries over the options the
    new data class shares)."""
    from lit_meta.cli import MetaCLI

    monkeypatch.chdir(tmp_path)
    dataset = part.split("/")[0]
    # reptile_5w1s.yaml trains on 15 shots per class (the Reptile paper's); the miniatures have 2-4 images a class
    cli = MetaCLI(args=["--config", str(REPO / "configs" / "miniimagenet" / "reptile_5w1s.yaml"),
                        "--config", str(REPO / "configs" / part), *data_args(dataset, roots), "--data.shots", "1"],
                  run=False)
    model, dm = cli.model, cli.datamodule
    assert dm.name == dataset and model.task_spec["dataset"] == dataset and model.algorithm == "reptile"
    assert (dm.ways, dm.eval_shots, dm.eval_batch_size, dm.val_tasks) == (5, 1, 10, 100)  # from reptile_5w1s.yaml
    model.meta_batch_size = dm.meta_batch_size = 2
    dm.setup("fit")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.outer_update(dm.train_batch(0))
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
