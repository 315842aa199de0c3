"""benchmarks/speed.py (over lit_meta.bench) against learn2learn: the short CI mode runs both sides, and the two
sides compute the same meta-gradient (so the timing compares like with like).

Marked ``learn2learn``: skipped, with the reason, where it does not import
(``bash benchmarks/install_learn2learn.sh``, then ``pytest -m learn2learn``).
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from benchmarks import speed
from lit_meta.bench.case import Case, build_data, build_ours
from tests.episodes import run

pytestmark = [pytest.mark.learn2learn, pytest.mark.usefixtures("one_thread")]  # tests/conftest.py


@pytest.mark.parametrize("extra", [[], ["--algorithm", "fomaml", "--baseline-sampler", "taskdataset"]])
def test_short_mode_runs_both_sides(capsys, extra):
    speed.main(["--short", "--random-images", "--threads", "1", *extra])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("ours_tasks_per_s", "baseline_tasks_per_s", "ratio"):
        assert math.isfinite(row[key]) and row[key] > 0, (key, row)
    assert row["learn2learn"] == "0.2.0" and row["meta_batch_size"] == 4


# Second order through conv4's BatchNorm: the reason conv4 does not use nn.BatchNorm2d,
# whose vmap batching rule gets double backward wrong (pytorch/functorch#534).
@pytest.mark.parametrize("first_order", [False, True])
def test_both_sides_compute_the_same_meta_gradient(first_order):
    """Our vmapped run_tasks and learn2learn's clone/adapt loop agree to float32 round-off
    (rtol 1e-3, atol 1e-5) on one meta-batch, second and first order."""
    case = Case(random_images=True, meta_batch_size=4, inner_steps=2, inner_lr=0.1, first_order=first_order)
    data = build_data(case)
    model, _ = build_ours(case, data)
    batch = data.datamodule.train_batch(0)

    out = run(model, batch, case.inner_steps, first_order=first_order, training=True)
    out["query_loss"].mean().backward()
    ours = [p.grad.clone() for p in model.net.parameters()]

    import learn2learn as l2l

    maml = l2l.algorithms.MAML(copy.deepcopy(model.net), lr=case.inner_lr, first_order=first_order)
    maml.zero_grad()
    loss = torch.nn.CrossEntropyLoss()
    for t in range(batch.num_tasks):
        learner = maml.clone()
        for _ in range(case.inner_steps):
            learner.adapt(loss(learner(batch.support_x[t]), batch.support_y[t]))
        (loss(learner(batch.query_x[t]), batch.query_y[t]) / batch.num_tasks).backward()
    theirs = [p.grad for p in maml.parameters()]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
