"""Every config in configs/ parses and takes two training steps on generated data."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.image_data_fixtures import mini_arrays, omniglot_arrays, write_mini_pickles, write_omniglot_npz

def _param(config: str):
    # The default run covers every sine / learning_to_learn config and every algorithm's 5-way 1-shot
    # image config; the other shot and way counts differ only in numbers (`pytest -m slow`).
    image = config.split("/")[0] in ("omniglot", "miniimagenet")
    return pytest.param(config, marks=pytest.mark.slow) if image and "_5w1s" not in config else config


CONFIGS = [
    _param(p.relative_to(REPO / "configs").as_posix())
    for p in sorted((REPO / "configs").rglob("*.yaml"))
    if p.parent.name not in ("logger", "trainer")
]


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("config-data")
    # 330 characters: enough for 20-way episodes in every split of the Finn proportions.
    omniglot = write_omniglot_npz(base / "omniglot", omniglot_arrays(background=200, evaluation=130, drawers=20))
    mini = write_mini_pickles(base / "mini", mini_arrays(classes={"train": 6, "val": 5, "test": 5},
                                                         per_class=20, size=84))
    return {"omniglot": omniglot, "miniimagenet": mini, "cache": base / "cache"}


@pytest.mark.parametrize("config", CONFIGS)
def test_config_takes_two_training_steps(config, roots, tmp_path, monkeypatch):
    from lit_meta.cli import MetaCLI

    monkeypatch.chdir(tmp_path)
    args = ["--config", str(REPO / "configs" / config)]
    dataset = config.split("/")[0]
    if dataset in ("omniglot", "miniimagenet"):
        args += ["--data.root", str(roots[dataset]), "--data.cache_dir", str(roots["cache"])]
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
