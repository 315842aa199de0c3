"""The CPU rehearsal of the GPU path (lit_meta/rehearsal.py): every algorithm's meta-steps and an
evaluation batch with the model and the data on the ``meta`` device cross to the host only by
non-blocking copies and never read a device value. Meta tensors cost nothing to compute: each
case takes well under a second, nearly all of it the guard's per-op Python.

Seen failing with the fixes of issue 21 reverted: the uniform task weights made on the host
(``task_weights(..., device=None)``, then ``.to``) fail every algorithm at
``lit_meta/meta_step.py: in weights``; MAML++'s multi-step-loss weights as a CPU tensor fail
at ``mamlpp.py: in query_objective``; ``torch.tensor(n, device=...)`` in ``metrics.moments``
fails every evaluation.
"""
from __future__ import annotations

import sys

import pytest
import torch

from lit_meta.algorithms import MAML
from lit_meta.data.sine import SineDataModule
from lit_meta.rehearsal import CASES, DEVICE, device_boundary, rehearse_case
from lit_meta.sync_guard import HostSyncError


@pytest.mark.parametrize("name", CASES)
def test_every_algorithm_steps_and_evaluates_on_a_device_without_crossing_to_the_host(name):
    report = rehearse_case(name)
    assert report.ok, report.error
    assert report.parts == ["training step 0", "training step 1", "evaluation"]


def test_each_kind_of_crossing_is_an_error_naming_the_line():
    x = torch.ones(3, device=DEVICE)
    crossings = {
        "blocking copy of a host tensor [3] to meta": lambda: torch.ones(3).to(DEVICE),
        "bool() of a tensor": lambda: bool(x.sum() > 0),
        # a read inside torch's own code reaches only the dispatcher
        "host read of a meta tensor's value (_local_scalar_dense": lambda: torch.ops.aten._local_scalar_dense(x[0]),
        "host sync in a guarded region: .tolist()": lambda: x.tolist(),
        "host tensor [3] mixed into meta computation": lambda: x + torch.ones(3),
        "blocking copy of a host tensor [3] into a meta tensor": lambda: x.copy_(torch.ones(3)),
    }
    for what, crossing in crossings.items():
        with pytest.raises(HostSyncError, match="test_rehearsal.py:") as caught, device_boundary():
            crossing()
        assert what in str(caught.value), (what, str(caught.value))
    with device_boundary():  # what a GPU step may do: a non-blocking copy, a 0-dim host scalar, device fills
        y = torch.ones(3).to(DEVICE, non_blocking=True) * torch.tensor(2.0) + torch.full((), 1.0, device=DEVICE)
    assert y.device == DEVICE


# ---------------------------------------------------------------------------- a real fit's window
def fit_with_window(model, dm, tmp_path, steps: int = 8):
    import pytorch_lightning as pl

    from lit_meta.sync_guard import SyncWindow

    window = SyncWindow(steps)
    trainer = pl.Trainer(max_steps=steps, logger=pl.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
                         enable_progress_bar=False, inference_mode=False, log_every_n_steps=3,
                         enable_model_summary=False, callbacks=[window], num_sanity_val_steps=0,
                         default_root_dir=tmp_path)
    trainer.fit(model, dm)
    return window.summary()


def test_a_fit_reads_values_only_on_logging_steps_and_at_a_validation_end(tmp_path):
    """Sampling, training_step, on_train_batch_end and validation_step of 8 steps with a
    validation after step 5 (an epoch end): the only reads are the divergence counters on
    the logging steps and the metrics at the validation's end, each named by its line."""
    dm = SineDataModule(meta_batch_size=4, val_tasks=4, eval_batch_size=4, steps_per_epoch=5)
    model = MAML(task_spec=dm.task_spec, meta_batch_size=4, grad_clip=1.0)
    summary = fit_with_window(model, dm, tmp_path)
    assert summary["ok"] and not summary["syncs_not_allowed"], summary
    assert summary["logging_steps"] == [2, 5] and summary["validated_at"] == [4]
    assert {"train_batch", "training_step", "on_train_batch_end", "validation_step",
            "on_validation_epoch_end"} <= set(summary["hook_calls"])
    places = {(s["hook"], s["where"].split(":")[0]): s["steps"] for s in summary["syncs_on_logging_steps_or_validation_ends"]}
    assert places == {("on_train_batch_end", "lit_meta/nonfinite.py"): [2, 5],
                      ("on_validation_epoch_end", "lit_meta/metrics.py"): [4]}


def test_a_read_on_a_step_that_logs_nothing_is_reported_with_its_line(tmp_path):
    dm = SineDataModule(meta_batch_size=4, val_tasks=4, eval_batch_size=4, steps_per_epoch=5)
    model = MAML(task_spec=dm.task_spec, meta_batch_size=4)
    update = model.outer_update
    model.outer_update = lambda batch, ctx=None: {**(out := update(batch, ctx)), "loss": out["query_loss"].mean().item()}
    summary = fit_with_window(model, dm, tmp_path)
    assert not summary["ok"]
    [bad] = summary["syncs_not_allowed"]
    assert bad["hook"] == "training_step" and bad["what"] == ".item() of a tensor"
    # the innermost lit_meta line that led to it (the test's own lambda is outside lit_meta)
    assert bad["where"].startswith("lit_meta/") and bad["steps"] == [0, 1, 3, 4, 6, 7]


def test_a_sync_reported_as_a_warning_is_placed_at_the_line_that_made_it_not_in_warnings():
    """On CUDA torch reports a sync as a warning, so the recorded stack ends in the warnings
    module; outside lit_meta (Lightning's loop) the place is the innermost line that warned."""
    import traceback
    import warnings

    from lit_meta.sync_guard import innermost_frame

    stacks = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        previous = warnings.showwarning
        warnings.showwarning = lambda *a, **k: stacks.append(traceback.extract_stack()[:-1])  # less this frame
        try:
            warnings.warn("called a synchronizing CUDA operation")
            line = sys._getframe().f_lineno - 1
        finally:
            warnings.showwarning = previous
    assert innermost_frame(stacks[0]).startswith(f"tests/test_rehearsal.py:{line} in "), innermost_frame(stacks[0])
