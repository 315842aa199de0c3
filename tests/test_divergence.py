"""The divergence guard shared by every algorithm (``lit_meta.nonfinite`` through ``MetaStep``).

- A meta-step whose meta-loss (or written gradients) or new weights are not finite is undone
  exactly: weights and optimizer state are those before it; it is counted.
- A finite meta-step is the optimizer's own step, bit for bit.
- Neither reads a tensor on the host inside ``training_step`` (``lit_meta.sync_guard``). The
  guard's device counters are read after it, in ``on_train_batch_end``, on logging steps only
  (``NonFiniteGuard.check``), and at the end of training: a step that does not log reads
  nothing in any of its hooks (``SyncWindow``), skipped or not.
- Through ``train.py``: a learning rate that diverges on sine stops the run after
  ``max_nonfinite`` skipped steps in a row, with one line naming the step and the likely
  cause; ``results.json`` says so, and the counter is logged and checkpointed.
"""
from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lit_meta.algorithms import MAML, LearningToLearn, MetaSGD, Reptile
from lit_meta.data import OptimizeeDataModule, Quadratic
from lit_meta.data.sine import SineDataModule
from lit_meta.sync_guard import guard_training_steps
from tests.conftest import sine_config
from tests.episodes import run

pytestmark = pytest.mark.usefixtures("one_thread")


class PoisonedSine(SineDataModule):
    """Sine tasks whose ``field`` holds a NaN at the training steps in ``poisoned`` (all when None)."""

    def __init__(self, poisoned: list[int] | None = None, field: str = "query_y", **kwargs) -> None:
        super().__init__(**kwargs)
        self.poisoned, self.field = poisoned, field

    def train_batch(self, step: int):
        batch = super().train_batch(step)
        if self.poisoned is None or step in self.poisoned:
            getattr(batch, self.field)[0, 0, 0] = float("nan")
        return batch


def snapshot(model: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v.clone() for s in optimizer.state.values() for k, v in sorted(s.items()) if k != "step"]


ALGORITHMS = {
    # MAML's meta-loss; Reptile's written gradients (θ − θ'ᵢ, NaN from a NaN support point);
    # Meta-SGD's learned rates are meta-parameters too
    "maml": (MAML, {"inner_steps": 2}, "query_y"),
    "reptile": (Reptile, {"inner_steps": 2, "inner_optimizer": "sgd", "inner_lr": 0.02}, "support_x"),
    "metasgd": (MetaSGD, {}, "query_x"),
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_a_non_finite_step_is_undone_exactly_and_counted(name):
    cls, kwargs, field = ALGORITHMS[name]
    dm = PoisonedSine({2}, field, meta_batch_size=4)
    model = cls(task_spec=dm.task_spec, meta_batch_size=4, **kwargs)
    optimizer = model.standalone_optimizer()
    states = []
    for step in range(4):
        model.outer_update(dm.train_batch(step))
        states.append((snapshot(model), optimizer_state(optimizer)))
    (after_1, opt_1), (after_2, opt_2), (after_3, _) = states[1:]
    for key in after_1:
        assert torch.equal(after_2[key], after_1[key]), key  # step 2 changed nothing ...
    assert len(opt_1) == len(opt_2) and all(torch.equal(a, b) for a, b in zip(opt_1, opt_2))
    assert any(not torch.equal(after_3[k], after_2[k]) for k in after_2)  # ... and step 3 trains again
    assert all(torch.isfinite(v).all() for v in after_3.values())
    assert model.meta_step.guard.skipped == 1
    assert model.meta_step.guard.read()["in_row"] == 0 and model.meta_step.guard.read()["run_start"] == 2


def test_a_first_step_that_is_not_finite_leaves_fresh_optimizer_state():
    """Adam's moments are created by its first step: undone, they are zero, as a fresh Adam's
    (its step counter, a host-side count, advances: skipped steps count as steps)."""
    dm = PoisonedSine({0}, meta_batch_size=4)
    model = MAML(task_spec=dm.task_spec, meta_batch_size=4)
    initial = snapshot(model)
    model.outer_update(dm.train_batch(0))
    for key, value in initial.items():
        assert torch.equal(snapshot(model)[key], value), key
    optimizer = model.standalone_optimizer()
    moments = optimizer_state(optimizer)
    assert len(moments) == 2 * len(initial) and all(not m.any() for m in moments)
    assert all(int(s["step"]) == 1 for s in optimizer.state.values())  # the step still counts


def test_a_finite_step_is_the_optimizers_own_step_bit_for_bit():
    dm = SineDataModule(meta_batch_size=4)
    model = MAML(task_spec=dm.task_spec, meta_batch_size=4, inner_steps=2)
    reference = copy.deepcopy(model)
    batch = dm.train_batch(0)
    model.outer_update(batch)
    optimizer = torch.optim.Adam(reference.parameters(), lr=reference.meta_lr)
    out = run(reference, batch, 2, first_order=False, training=True)
    (out["query_loss"] / 4).sum().backward()  # the uniform weights 1/4
    optimizer.step()
    for key, value in snapshot(reference).items():
        assert torch.equal(snapshot(model)[key], value), key


# ---------------------------------------------------------------------------- no host sync
def _fit(model, dm, tmp_path, steps, **kwargs):
    trainer = pl.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=True, log_every_n_steps=1, inference_mode=False,
                         enable_model_summary=False, default_root_dir=tmp_path, **kwargs)
    trainer.fit(model, datamodule=dm)
    return trainer


def test_skipping_reads_nothing_on_the_host_inside_a_training_step(tmp_path):
    """Every step logs (``log_every_n_steps=1``); steps 1 and 2 are skipped: still no host read
    inside ``training_step`` (the counters are read after it, in ``on_train_batch_end``: see
    the next test)."""
    dm = PoisonedSine({1, 2}, meta_batch_size=4)
    model = MAML(task_spec=dm.task_spec, meta_batch_size=4)
    guard_training_steps(model)
    with pytest.warns(UserWarning, match="skipped"):
        trainer = _fit(model, dm, tmp_path, 4)
    assert trainer.global_step == 4 and model.meta_step.guard.skipped == 2
    assert trainer.logged_metrics["train/nonfinite_skipped"] == 2


def test_a_step_that_does_not_log_reads_nothing_in_any_hook_skipped_or_not(tmp_path):
    """Six steps, every third a logging step (2 and 5); steps 1, 3 and 5 are not finite. Every
    hook of a step (sampling, ``training_step`` with the meta-optimizer's step inside it,
    ``on_train_batch_end``) runs under ``SyncWindow``'s strict guard: a step that does not log makes 0 host reads; a
    logging step reads only the divergence counters (``NonFiniteGuard.check`` in
    ``on_train_batch_end``)."""
    from collections import Counter

    from lit_meta.sync_guard import SyncWindow

    dm = PoisonedSine({1, 3, 5}, meta_batch_size=4)
    model = MAML(task_spec=dm.task_spec, meta_batch_size=4)
    window = SyncWindow(6)
    trainer = pl.Trainer(max_steps=6, limit_val_batches=0, logger=pl.loggers.CSVLogger(tmp_path),
                         log_every_n_steps=3, enable_checkpointing=False, enable_progress_bar=False,
                         inference_mode=False, enable_model_summary=False, callbacks=[window],
                         default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="skipped"):
        trainer.fit(model, datamodule=dm)
    summary = window.summary()
    assert trainer.global_step == 6 and model.meta_step.guard.skipped == 3
    assert summary["logging_steps"] == [2, 5]
    assert {"train_batch", "training_step", "on_train_batch_end"} <= set(summary["hook_calls"])
    reads = Counter(r.step for r in window.records)
    assert {step: reads[step] for step in range(6) if step not in (2, 5)} == {0: 0, 1: 0, 3: 0, 4: 0}, \
        summary["syncs_not_allowed"]
    assert summary["ok"] and reads[2] >= 1 and reads[5] >= 1
    assert {(r.hook, r.where.split(":")[0]) for r in window.records} == {("on_train_batch_end", "lit_meta/nonfinite.py")}


def test_learned_optimizer_steps_read_nothing_on_the_host(tmp_path):
    dm = OptimizeeDataModule(Quadratic(), meta_batch_size=8, steps_per_epoch=20)
    model = LearningToLearn(dm.task_spec, meta_batch_size=8, unroll=20, truncation=10)
    guard_training_steps(model)
    assert _fit(model, dm, tmp_path, 3).global_step == 3


# ---------------------------------------------------------------------------- stop, through train.py
def _stderr_last_line(capsys) -> tuple[str, str]:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.out, captured.err.strip().splitlines()[-1]


@pytest.mark.parametrize("flags,step,cause", [
    # one inner step at α = 1e6 overflows from the first task on: the inner rate
    ({"model.init_args.inner_lr": 1e6}, 0, "inner learning rate (inner_lr=1000000.0)"),
    # SGD at 1e25 sends the weights to ~1e25 after step 0, whose loss is finite: the meta rate
    ({"model.init_args.meta_optimizer": "sgd", "model.init_args.meta_lr": 1e25}, 1, "meta learning rate (meta_lr=1e+25)"),
])
def test_a_diverging_learning_rate_on_sine_stops_with_one_line_and_results_json_says_so(
        run_cli, capsys, tmp_path, flags, step, cause):
    with pytest.raises(SystemExit) as exc:
        run_cli("fit", *sine_config(**{"model.init_args.max_nonfinite": 4, "trainer.log_every_n_steps": 2,
                                       "trainer.max_steps": 100, **flags}))
    assert exc.value.code == 2
    out, last = _stderr_last_line(capsys)
    assert last.startswith("error: training diverged"), last
    assert f"non-finite in 4 meta-steps in a row from step {step} (max_nonfinite=4)" in last and cause in last
    # results.json was written first, and says what happened
    results = json.loads(Path(out.strip().splitlines()[-1].removeprefix("results: ")).read_text())
    assert results["diverged"] is True and results["diverged_at_step"] == step
    assert results["train/nonfinite_skipped"] >= 4 and results["train/steps"] < 100
    assert cause in results["cause"] and "best_checkpoint" in results["diverged_note"]
    best = torch.load(results["best_checkpoint"], weights_only=False)
    assert all(torch.isfinite(v).all() for v in best["state_dict"].values())
    assert best["nonfinite_guard"]["total"] >= 1  # the count goes into checkpoints (a resume keeps counting)
    rows = list(csv.DictReader(next((tmp_path / "logs").rglob("metrics.csv")).open()))
    logged = [float(r["train/nonfinite_skipped"]) for r in rows if r.get("train/nonfinite_skipped")]
    assert logged and logged == sorted(logged) and logged[-1] >= 4


def test_a_run_that_recovers_is_not_reported_as_diverged(run_cli, capsys):
    """Two poisoned steps (fewer than max_nonfinite): counted, training goes on to the end."""
    run_cli("fit", *sine_config(**{"data.class_path": "tests.test_divergence.PoisonedSine",
                                   "data.init_args.poisoned": "[3, 4]"}))
    out = capsys.readouterr().out
    results = json.loads(Path(out.strip().splitlines()[-1].removeprefix("results: ")).read_text())
    assert results["diverged"] is False and results["train/nonfinite_skipped"] == 2
    assert results["train/steps"] == 20 and "diverged_at_step" not in results


def test_the_count_goes_into_checkpoints_and_a_resumed_run_goes_on_counting(tmp_path):
    dm = PoisonedSine([1, 2], meta_batch_size=4)
    model = MAML(task_spec=dm.task_spec, meta_batch_size=4)
    trainer = pl.Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, inference_mode=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="skipped"):
        trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "four.ckpt")
    resumed = MAML.load_from_checkpoint(tmp_path / "four.ckpt")
    assert resumed.meta_step.guard.skipped == 2
    resumed.outer_update(PoisonedSine([0], meta_batch_size=4).train_batch(0))
    assert resumed.meta_step.guard.read()["total"] == 3 and resumed.meta_step.guard.read()["in_row"] == 1


def test_max_nonfinite_is_checked():
    with pytest.raises(ValueError, match="max_nonfinite must be >= 1, got 0"):
        MAML(task_spec=SineDataModule().task_spec, max_nonfinite=0)
