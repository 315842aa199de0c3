"""The learn2learn adapter: its episodes are exactly learn2learn's own, and our Trainer trains on them.

learn2learn is an optional extra: the tests that use it are marked ``learn2learn`` and skip,
with the reason, where it does not import (``bash benchmarks/install_learn2learn.sh``, then
``pytest -m learn2learn``); without it only the missing-install message is tested.
"""
from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch
from tests.episodes import run

CLASSES, PER_CLASS, WAYS, SHOTS, QUERIES = 12, 6, 3, 2, 1


def tagged_images() -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLASSES * PER_CLASS, 1, 8, 8]`` noise images whose pixel (0, 0) holds the class
    id and pixel (0, 1) the sample's index within its class, so every image says who it is."""
    x = torch.rand(CLASSES * PER_CLASS, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    x[:, 0, 0, 0] = y.float()
    x[:, 0, 0, 1] = torch.arange(PER_CLASS).repeat(CLASSES).float()
    return x, y


def taskset(l2l, x: torch.Tensor, y: torch.Tensor):
    dataset = l2l.data.MetaDataset(torch.utils.data.TensorDataset(x, y))
    return l2l.data.TaskDataset(dataset, task_transforms=[
        l2l.data.transforms.NWays(dataset, WAYS),
        l2l.data.transforms.KShots(dataset, SHOTS + QUERIES),
        l2l.data.transforms.LoadData(dataset),
        l2l.data.transforms.RemapLabels(dataset),
    ], num_tasks=-1)


def ids(images: torch.Tensor) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in images[:, 0, 0, :2].tolist()]


@pytest.fixture
def l2l():
    import learn2learn

    return learn2learn


@pytest.fixture
def dm(l2l):
    from lit_meta.data.learn2learn import Learn2LearnDataModule

    x, y = tagged_images()
    return Learn2LearnDataModule(train=taskset(l2l, x, y), validation=taskset(l2l, x, y), test=taskset(l2l, x, y),
                                 ways=WAYS, shots=SHOTS, queries=QUERIES, meta_batch_size=4, val_tasks=4,
                                 test_tasks=8, eval_batch_size=4, steps_per_epoch=5)


def test_missing_learn2learn_says_how_to_install(monkeypatch):
    from lit_meta.data.learn2learn import Learn2LearnDataModule

    monkeypatch.setitem(sys.modules, "learn2learn", None)  # makes `import learn2learn` fail
    with pytest.raises(ImportError, match=r"bash benchmarks/install_learn2learn.sh"):
        Learn2LearnDataModule(train=object())


@pytest.mark.learn2learn
def test_episodes_are_learn2learns_own_draws(l2l, dm):
    """Our batch holds exactly the tasks learn2learn samples when seeded as the adapter documents."""
    batch = dm.sample_tasks("train", torch.Generator().manual_seed(7), 4)
    assert batch.support_x.shape == (4, WAYS * SHOTS, 1, 8, 8)
    assert batch.query_x.shape == (4, WAYS * QUERIES, 1, 8, 8)
    assert torch.equal(batch.support_y, torch.arange(WAYS).repeat_interleave(SHOTS).expand(4, -1))
    assert torch.equal(batch.query_y, torch.arange(WAYS).repeat_interleave(QUERIES).expand(4, -1))

    # learn2learn's own sampling, from the seed the adapter derives from the step's generator.
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=torch.Generator().manual_seed(7)))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    theirs = [dm.tasksets["train"].sample() for _ in range(4)]

    for t, (data, labels) in enumerate(theirs):
        sampled = ids(data)
        assert {c for c, _ in sampled} == {c for c, _ in ids(batch.support_x[t])} == {c for c, _ in ids(batch.query_x[t])}
        for label in range(WAYS):
            # learn2learn's samples of the class it labelled `label`, in its order:
            # the first SHOTS are our support of class `label`, the rest our query.
            mine = [s for s, l in zip(sampled, labels.tolist()) if l == label]
            assert ids(batch.support_x[t][batch.support_y[t] == label]) == mine[:SHOTS]
            assert ids(batch.query_x[t][batch.query_y[t] == label]) == mine[SHOTS:]


@pytest.mark.learn2learn
def test_sampling_is_seeded_by_step_and_leaves_global_rngs_alone(dm):
    py, npy, th = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    a, b, c = dm.train_batch(0), dm.train_batch(0), dm.train_batch(1)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert not torch.equal(a.support_x, c.support_x)
    assert random.getstate() == py
    assert np.array_equal(np.random.get_state()[1], npy)
    assert torch.equal(torch.get_rng_state(), th)


@pytest.mark.learn2learn
def test_bad_task_shapes_are_one_line_errors(l2l, dm):
    with pytest.raises(ValueError, match="expects ways=4"):
        dm.ways = 4
        dm.sample_tasks("train", torch.Generator().manual_seed(0), 1)
    dm.ways, dm.shots = WAYS, 1
    with pytest.raises(ValueError, match=r"expects shots \+ queries = 1 \+ 1"):
        dm.sample_tasks("train", torch.Generator().manual_seed(0), 1)


@pytest.mark.learn2learn
@pytest.mark.filterwarnings("ignore:.*could not find the monitored key")
def test_maml_trains_and_tests_on_learn2learn_tasks(dm, tmp_path):
    import pytorch_lightning as pl

    from lit_meta.algorithms import MAML

    assert dm.task_spec["input_shape"] == [1, 8, 8] and dm.task_spec["ways"] == WAYS
    model = MAML(dm.task_spec, backbone="conv4", backbone_kwargs={"filters": 8}, inner_lr=0.1, inner_steps=1,
                 meta_batch_size=4)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(max_steps=3, inference_mode=False, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    metrics = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert metrics["test/tasks"] == 8
    # the reported accuracy and loss are the means over the 8 fixed test tasks
    with torch.enable_grad():
        outs = [run(model, dm.eval_batch("test", c), model.eval_inner_steps, first_order=True, training=False)
                for c in range(len(dm.eval_chunks("test")))]
    assert metrics["test/acc"] == pytest.approx(torch.cat([o["query_acc"] for o in outs]).mean().item(), abs=1e-6)
    assert metrics["test/loss"] == pytest.approx(torch.cat([o["final_query_loss"] for o in outs]).mean().item(),
                                                 rel=1e-5)
