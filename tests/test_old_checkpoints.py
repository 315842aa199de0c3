"""Checkpoints written before the issue-12 restructuring load with the current code and give
the numbers the old code gave with them.

The files, the script that wrote them and the commit it ran at are in
``tests/fixtures/old_checkpoints`` (README.md there); ``expected.json`` holds what the old
code computed: ``train.py test`` metrics, ``lit_meta.adapt`` outputs, the learned
optimizer's loss curves and a model it trained.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from lit_meta.adapt import adapt
from lit_meta.algorithms import LearningToLearn, MAMLpp, MetaSGD
from lit_meta.checkpoint import load_checkpoint
from lit_meta.data import OptimizeeDataModule, Quadratic
from tests.conftest import REPO
from tests.image_data_fixtures import omniglot_arrays, write_omniglot_npz

FIXTURES = REPO / "tests" / "fixtures" / "old_checkpoints"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
# The data options the fixtures were tested with (model options come from the checkpoint).
SINE = ["--data.steps_per_epoch", "3", "--data.val_tasks", "4", "--data.test_tasks", "8", "--data.eval_batch_size", "4"]
QUADRATIC = ["--data.init_args.val_tasks", "8", "--data.init_args.test_tasks", "16",
             "--data.init_args.eval_batch_size", "8", "--data.init_args.steps_per_epoch", "5"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _make_fixtures():
    """The script that wrote the fixtures: its data helpers (image tasks, option lists)."""
    spec = importlib.util.spec_from_file_location("make_old_checkpoints", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKE = _make_fixtures()


def assert_same(got, expected) -> None:
    """Equal up to float rounding that differs between CPUs (the numbers came from an Intel Xeon)."""
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-4, atol=1e-5)


def assert_same_metrics(got: dict[str, float], expected: dict[str, float]) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        assert_same(got[key], expected[key])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_load_checkpoint_restores_the_stored_tensors(name):
    model = load_checkpoint(FIXTURES / name)
    stored = torch.load(FIXTURES / name, map_location="cpu", weights_only=True)["state_dict"]
    state = model.state_dict()
    assert state.keys() == stored.keys()
    for key, value in stored.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    if name == "l2l_quadratic.ckpt":  # saved as lit_meta.algorithms.l2l_lstm.LearningToLearn
        assert type(model) is LearningToLearn and type(model).__module__ == "lit_meta.algorithms.learning_to_learn"


@pytest.mark.parametrize("algo", ["maml", "metasgd"])
def test_sine_checkpoints_adapt_and_test_as_before(algo, run_cli, tmp_path):
    ckpt, expected = FIXTURES / f"sine_{algo}.ckpt", EXPECTED[f"sine_{algo}.ckpt"]
    support, query = FIXTURES / "sine_support.csv", FIXTURES / "sine_query.csv"
    assert_same(adapt(ckpt, support, query).outputs, expected["adapt"])
    result = adapt(ckpt, support, query, steps=3, inner_lr=0.005)
    assert_same(result.outputs, expected["adapt_steps3_lr0.005"])
    assert (algo == "metasgd") == any("replaces the learned inner rates" in n for n in result.notices)
    run_cli("test", "--config", str(REPO / "configs" / "sine" / f"{algo}.yaml"), "--ckpt_path", str(ckpt), *SINE)
    assert_same_metrics(MAKE.test_metrics(tmp_path), expected["test"])


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory) -> dict[str, Path]:
    """The miniature Omniglot the image fixtures were trained on, and two tasks of its evaluation characters."""
    root = tmp_path_factory.mktemp("old-omniglot")
    data = write_omniglot_npz(root / "omniglot", omniglot_arrays(**MAKE.OMNIGLOT))
    return {"root": data, "five": MAKE.image_task(root / "five", [0, 1, 2, 3, 4]),
            "three": MAKE.image_task(root / "three", [5, 6, 7])}


@pytest.mark.parametrize("algo,cls", [("mamlpp", MAMLpp), ("metasgd", MetaSGD)])
def test_image_checkpoints_adapt_and_test_as_before(algo, cls, omniglot, run_cli, tmp_path):
    ckpt, expected = FIXTURES / f"omniglot_{algo}.ckpt", EXPECTED[f"omniglot_{algo}.ckpt"]
    assert type(load_checkpoint(ckpt)) is cls
    assert_same(adapt(ckpt, *omniglot["five"]).outputs, expected["adapt_5way"])
    # 3-way support into the 5-way head: resized (Meta-SGD: its head rates too)
    three = adapt(ckpt, *omniglot["three"])
    assert "adapting a new zero-initialised 3-way head" in three.notices[0]
    assert_same(three.outputs, expected["adapt_3way"])
    config = str(REPO / "configs" / "omniglot" / f"{algo}_5w1s.yaml")
    # the test tasks of then: the Meta-SGD config now rotates the test classes (cbfinn/maml's protocol)
    run_cli("test", "--config", config, "--data.root", str(omniglot["root"]), *MAKE.IMAGE, *MAKE.SMALL,
            "--data.eval_rotations", "false", "--ckpt_path", str(ckpt))
    assert_same_metrics(MAKE.test_metrics(tmp_path), expected["test"])


def test_learned_optimizer_checkpoint_under_its_old_class_path(run_cli, tmp_path):
    ckpt, expected = FIXTURES / "l2l_quadratic.ckpt", EXPECTED["l2l_quadratic.ckpt"]
    model = load_checkpoint(ckpt)
    batch = OptimizeeDataModule(Quadratic()).eval_batch("test", 0).slice(0, 4)
    assert_same(model.loss_curves(batch, model.learned_rule(), steps=20), expected["loss_curves"])

    for got, values in zip(MAKE.train_linear(ckpt), expected["learned_optimizer_linear"], strict=True):
        assert_same(got, values)  # LearnedOptimizer(checkpoint=ckpt) training a linear model

    run_cli("test", "--config", str(REPO / "configs" / "learning_to_learn" / "quadratic.yaml"),
            "--ckpt_path", str(ckpt), *QUADRATIC)
    assert_same_metrics(MAKE.test_metrics(tmp_path), expected["test"])
    with pytest.raises(ValueError, match="learned optimizer .* no task to adapt"):
        adapt(ckpt, FIXTURES / "sine_support.csv", FIXTURES / "sine_query.csv")


def test_checkpoint_of_a_class_that_no_longer_exists_is_a_one_line_error(run_cli, capsys, tmp_path):
    checkpoint = torch.load(FIXTURES / "sine_maml.ckpt", map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = "lit_meta.algorithms.gone.MAML"
    path = tmp_path / "gone.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"cannot load a lit_meta model from checkpoint .*gone\.ckpt: .*gone"):
        load_checkpoint(path)
    with pytest.raises(SystemExit) as exc:
        run_cli("test", "--config", str(REPO / "configs" / "sine" / "maml.yaml"), "--ckpt_path", str(path), *SINE)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot load a lit_meta model from checkpoint") and str(path) in err[-1]
    shutil.rmtree(tmp_path / "logs", ignore_errors=True)
