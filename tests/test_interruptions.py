"""Faults as a user meets them, through ``train.py``: a SIGTERM (what a cluster sends before its
SIGKILL) during a checkpoint write or a validation, a truncated ``last.ckpt`` given to
``--ckpt_path``, and two runs started at once in one ``default_root_dir``.

(The other fault cases: kill -9 and exact resume in tests/test_cli.py; divergence in
tests/test_divergence.py; checkpoints of another kind and a full disk in
tests/test_checkpoint_io.py; an interrupted Omniglot download in tests/test_data_images.py;
an indivisible DDP meta-batch, SLURM requeue and the shipped configs under DDP in
tests/test_distributed.py.)

A SIGTERM is sent at a chosen moment by :class:`SigtermAt`, a callback given to the run with
``--trainer.callbacks+=``: to its own process (in-process runs, the default tier) or, in a
``train.py`` subprocess, by this test process once the callback reports that the moment has
come (and holds it there until the signal is in). Two runs meet at the start of fit in
:class:`SineTogether`, a SineDataModule given with ``--data.class_path``.
"""
from __future__ import annotations

import builtins
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

import lit_meta.checkpoint as checkpoint_module
from lit_meta.data.sine import SineDataModule
from tests.conftest import REPO, sine_config, train_py_env
from tests.faults import WrappedFile

pytestmark = pytest.mark.usefixtures("one_thread")

# 20 steps in epochs of 10, validating every 5 steps on 20 tasks in 4 batches of 5 (so a
# SIGTERM can land between two validation batches); every validation writes best-N / last.ckpt.
RUN = {"trainer.max_steps": 20, "data.steps_per_epoch": 10, "trainer.val_check_interval": 5,
       "data.val_tasks": 20, "data.eval_batch_size": 5, "test_after_fit": "false"}


# ---------------------------------------------------------------------------- the SIGTERM
class SigtermAt(pl.Callback):
    """A SIGTERM at one moment of fit: ``when`` is ``"write"`` (``last.ckpt`` of ``step`` is being
    written: its temporary file is open and partly written), ``"validation"`` (the first batch of
    ``step``'s validation is done, three to go) or ``"train"`` (training step ``step`` is done).

    With ``wait_dir`` the callback writes ``ready`` there and waits (at most 60 s) for the test
    to send the signal from outside and write ``sent``; without, it signals its own process.
    Either way it first writes ``seen.json`` to ``record_dir``: what was on disk at that moment."""

    def __init__(self, when: str, step: int, record_dir: str, wait_dir: str | None = None) -> None:
        self.when, self.step, self.record_dir, self.wait_dir = when, step, Path(record_dir), wait_dir
        self.fired = False
        self.trainer: pl.Trainer | None = None
        self._previous: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.trainer = trainer
        if self.when == "write" and stage == "fit":
            self._previous = checkpoint_module.__dict__.get("open")
            checkpoint_module.open = self._open  # the atomic writer's open (tests/faults.py does the same)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if checkpoint_module.__dict__.get("open") == self._open:
            if self._previous is None:
                del checkpoint_module.open
            else:
                checkpoint_module.open = self._previous

    def _open(self, path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = builtins.open(path, mode, *args, **kwargs)
        target = checkpoint_module.TEMPORARY.match(Path(path).name)
        if ("x" in mode and target and target["name"] == "last.ckpt" and not self.fired
                and self.trainer is not None and self.trainer.global_step == self.step):
            return _SignalsAfterFirstWrite(handle, self)
        return handle

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if (self.when == "validation" and trainer.state.fn == "fit" and trainer.global_step == self.step
                and batch_idx == 0 and not self.fired):
            self.fire()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.when == "train" and trainer.global_step == self.step and not self.fired:
            self.fire()

    def fire(self) -> None:
        self.fired = True
        assert self.trainer is not None
        folder = Path(self.trainer.checkpoint_callback.dirpath)
        last = folder / "last.ckpt"
        seen = {"last_step": torch.load(last, weights_only=False)["global_step"] if last.is_file() else None,
                "temporary": {p.name: p.stat().st_size for p in folder.glob(".last.ckpt.*.tmp")}}
        self.record_dir.mkdir(parents=True, exist_ok=True)
        (self.record_dir / "seen.json").write_text(json.dumps(seen))
        if self.wait_dir is None:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        ready, sent = Path(self.wait_dir) / "ready", Path(self.wait_dir) / "sent"
        ready.touch()
        deadline = time.monotonic() + 60
        while not sent.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("no SIGTERM came within 60 s")
            time.sleep(0.01)


class _SignalsAfterFirstWrite(WrappedFile):
    """The temporary file of a checkpoint write: after its first bytes, the SIGTERM."""

    def __init__(self, handle: Any, probe: SigtermAt) -> None:
        super().__init__(handle)
        self.probe = probe

    def write(self, data: Any) -> int:
        written = self.handle.write(data)
        if not self.probe.fired:
            self.handle.flush()  # those bytes in the file on disk, as a slow write would have them
            self.probe.fire()
        return written


def probe_flag(when: str, step: int, record_dir: Path, wait_dir: Path | None = None) -> str:
    init = {"when": when, "step": step, "record_dir": str(record_dir)}
    if wait_dir is not None:
        init["wait_dir"] = str(wait_dir)
    return "--trainer.callbacks+=" + json.dumps({"class_path": f"{__name__}.SigtermAt", "init_args": init})


# ---------------------------------------------------------------------------- runs and their comparison
def fit(root: Path, *extra: str, **overrides: Any) -> dict:
    """``train.py fit`` in-process (sine, RUN) under ``root``; its results.json."""
    from lit_meta.cli import main

    main(["fit", *sine_config(**{**RUN, **overrides, "trainer.default_root_dir": root}), *extra])
    return json.loads(next(root.rglob("results.json")).read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """The uninterrupted run, and the weights it started from."""
    from lit_meta.cli import MetaCLI

    root = tmp_path_factory.mktemp("straight")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        results = fit(root / "run")
        init = MetaCLI(args=sine_config(**RUN), run=False).model.state_dict()
    finally:
        os.chdir(cwd)
    return {**results, "init": {k: v.clone() for k, v in init.items()}}


def logged_rows(results: dict) -> list[dict]:
    """metrics.csv of a run, without the wall-clock column."""
    path = Path(results["last_checkpoint"]).parent.parent / "metrics.csv"
    return [{k: v for k, v in row.items() if v != "" and k != "train/wall_s"} for row in csv.DictReader(path.open())]


def assert_resumed_as_uninterrupted(straight: dict, resumed: dict, step: int, revalidated: bool = False) -> None:
    """The weights, optimizer state, learning rate and every value logged after ``step`` are
    those of the run that was never interrupted (and ``revalidated``: so is the validation of
    ``step`` itself, run again from its first batch)."""
    a = torch.load(straight["last_checkpoint"], weights_only=False)
    b = torch.load(resumed["last_checkpoint"], weights_only=False)
    assert a["global_step"] == b["global_step"] == 20
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, rtol=0, atol=1e-6)
    assert a["optimizer_states"][0]["param_groups"][0]["lr"] == b["optimizer_states"][0]["param_groups"][0]["lr"]
    for key, state in a["optimizer_states"][0]["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(b["optimizer_states"][0]["state"][key][name], value, rtol=0, atol=1e-6)
    rows_a, rows_b = logged_rows(straight), logged_rows(resumed)
    assert all(row in rows_a for row in rows_b), [row for row in rows_b if row not in rows_a]
    # Lightning logs step s's values at logger step s - 1
    after = [row for row in rows_a if int(row["step"]) >= step]
    assert after and all(row in rows_b for row in after), [row for row in after if row not in rows_b]
    train_b = [int(row["step"]) for row in rows_b if "train/mse" in row]
    assert train_b and train_b[0] >= step  # no training step before the checkpoint's was run again
    val_b = [int(row["step"]) for row in rows_b if "val/mse_after" in row]
    assert (val_b[0] == step - 1) == revalidated, val_b
    if revalidated:
        assert [row for row in rows_a if row["step"] == str(step - 1) and "val/tasks" in row] == \
               [row for row in rows_b if row["step"] == str(step - 1) and "val/tasks" in row]
    assert Path(straight["best_checkpoint"]).name == Path(resumed["best_checkpoint"]).name


def interruption_line(err: str) -> str:
    """The one ``error:`` line of a run stopped by SIGTERM (and no traceback)."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err[-3000:]
    return lines[0]


def checkpoint_in(line: str) -> Path:
    path = Path(line.split("--ckpt_path ", 1)[1].split(" ", 1)[0])
    checkpoint_module.check_checkpoint(path)  # whole: a complete zip archive
    return path


def assert_could_not_restart(straight: dict, checkpoint: Path, step: int) -> None:
    """The checkpoint carries ``step`` steps of training: a run restarted from step 0 (and seeded
    differently, as the resumed ones are) could not end with the uninterrupted weights."""
    state = torch.load(checkpoint, weights_only=False)
    assert state["global_step"] == step > 0
    assert any(not torch.equal(state["state_dict"][k], v) for k, v in straight["init"].items())


# ---------------------------------------------------------------------------- (1) SIGTERM
@pytest.mark.parametrize("when,step,expected", [
    # during the write of last.ckpt at the validation of step 15 (mid-epoch): that write
    # completes, fit stops after it, and that last.ckpt is the one to resume from
    ("write", 15, "interrupted by SIGTERM at step 15: resume with --ckpt_path {last}"),
    # between two batches of the validation at the end of epoch 1: last.ckpt written there, and
    # the resumed run validates step 10 again (all 20 tasks), then trains on
    ("validation", 10, "interrupted by SIGTERM at step 10, during validation: resume with --ckpt_path {last} "
                       "(it validates step 10 again)"),
], ids=["during-a-checkpoint-write", "during-validation"])
def test_sigterm_leaves_a_checkpoint_that_resumes_to_the_uninterrupted_run(
        straight, tmp_path, capsys, monkeypatch, when, step, expected):
    from lit_meta.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoint_module, "open", builtins.open, raising=False)  # undone whatever happens
    record = tmp_path / "record"
    with pytest.raises(SystemExit) as exc:
        main(["fit", *sine_config(**RUN, **{"trainer.default_root_dir": tmp_path / "run"}),
              probe_flag(when, step, record)])
    assert exc.value.code == 143  # 128 + SIGTERM, as a shell reports a process the signal ended
    folder = tmp_path / "run" / "logs" / "sine_maml" / "version_0" / "checkpoints"
    line = interruption_line(capsys.readouterr().err)
    assert line == "error: " + expected.format(last=folder / "last.ckpt")
    seen = json.loads((record / "seen.json").read_text())
    if when == "write":  # at the signal: the step-15 write under way, beside step 10's complete file
        assert seen["last_step"] == 10 and len(seen["temporary"]) == 1 and min(seen["temporary"].values()) > 0, seen
    assert not list(folder.glob(".*.tmp")) and not (folder.parent / "results.json").exists()
    last = checkpoint_in(line)
    assert_could_not_restart(straight, last, step)

    resumed = fit(tmp_path / "resumed", "--seed_everything", "1", "--ckpt_path", str(last))
    assert_resumed_as_uninterrupted(straight, resumed, step, revalidated=when == "validation")


@pytest.mark.slow  # more places a SIGTERM can land: each exact on resume (the default tier has two)
@pytest.mark.parametrize("when,step,overrides", [
    ("train", 7, {}),  # after a step without validation, mid-epoch: last.ckpt written there
    ("validation", 15, {}),  # mid-epoch validation
    ("write", 10, {}),  # last.ckpt of the validation at an epoch's end
    # after the last step of an epoch that does not validate (validation every 3 steps)
    ("train", 10, {"trainer.val_check_interval": 3}),
    ("validation", 16, {"trainer.val_check_interval": 3}),
    # epochs, not steps, bound the run
    ("train", 10, {"trainer.val_check_interval": 3, "trainer.max_steps": -1, "trainer.max_epochs": 2}),
], ids=["after-a-step", "mid-epoch-validation", "write-at-an-epoch-end", "epoch-end-without-validation",
        "validation-every-3-steps", "epoch-end-under-max-epochs"])
def test_sigterm_anywhere_resumes_to_the_uninterrupted_run(tmp_path, capsys, monkeypatch, when, step, overrides):
    from lit_meta.cli import MetaCLI, main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoint_module, "open", builtins.open, raising=False)
    straight = fit(tmp_path / "straight", **overrides)
    straight["init"] = MetaCLI(args=sine_config(**{**RUN, **overrides}), run=False).model.state_dict()
    with pytest.raises(SystemExit) as exc:
        main(["fit", *sine_config(**{**RUN, **overrides, "trainer.default_root_dir": tmp_path / "run"}),
              probe_flag(when, step, tmp_path / "record")])
    assert exc.value.code == 143
    last = checkpoint_in(interruption_line(capsys.readouterr().err))
    assert_could_not_restart(straight, last, step)
    resumed = fit(tmp_path / "resumed", "--seed_everything", "1", "--ckpt_path", str(last), **overrides)
    assert_resumed_as_uninterrupted(straight, resumed, step, revalidated=when == "validation")


@pytest.mark.slow  # a train.py process (~6 s of start-up here); the same moments in-process: above
@pytest.mark.parametrize("when,step", [("write", 15), ("validation", 10)])
def test_a_real_sigterm_to_train_py_exits_143_with_one_line_and_resumes_exactly(
        straight, tmp_path, capsys, monkeypatch, when, step):
    """``python train.py fit``, sent SIGTERM from outside (as by a cluster) while it writes
    last.ckpt, or between two validation batches: exit code 143, one ``error:`` line naming the
    checkpoint; that checkpoint is complete, and resuming from it ends as the uninterrupted run."""
    monkeypatch.chdir(tmp_path)
    wait = tmp_path / "wait"
    wait.mkdir()
    args = [*sine_config(**RUN, **{"trainer.default_root_dir": tmp_path / "run"}),
            probe_flag(when, step, tmp_path / "record", wait)]
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "fit", *args], cwd=tmp_path, env=train_py_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (wait / "ready").exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the moment never came within 240 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        (wait / "sent").touch()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143, err[-3000:]
    folder = tmp_path / "run" / "logs" / "sine_maml" / "version_0" / "checkpoints"
    line = interruption_line(err)
    assert f"interrupted by SIGTERM at step {step}" in line and f"--ckpt_path {folder / 'last.ckpt'}" in line, line
    seen = json.loads((tmp_path / "record" / "seen.json").read_text())
    if when == "write":
        assert seen["last_step"] == 10 and len(seen["temporary"]) == 1 and min(seen["temporary"].values()) > 0, seen
    assert not list(folder.glob(".*.tmp"))
    last = checkpoint_in(line)
    assert_could_not_restart(straight, last, step)
    resumed = fit(tmp_path / "resumed", "--seed_everything", "1", "--ckpt_path", str(last))
    assert_resumed_as_uninterrupted(straight, resumed, step, revalidated=when == "validation")


# ---------------------------------------------------------------------------- (2) a truncated last.ckpt
def snapshot(root: Path) -> dict[str, tuple[bytes, int] | None]:
    """Every path under ``root``: a file's bytes and modification time, a folder as None."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def test_a_truncated_last_ckpt_is_one_line_naming_the_newest_intact_checkpoint(straight, tmp_path, capsys,
                                                                               monkeypatch):
    """``fit --ckpt_path last.ckpt`` of a last.ckpt cut to half its bytes (an interrupted copy):
    exit code 2, one line naming the file, saying it is truncated, and naming the intact
    checkpoint beside it; nothing on disk is created, changed or removed."""
    from lit_meta.cli import main

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "root"
    shutil.copytree(Path(straight["last_checkpoint"]).parents[4], run)  # the whole run (copy2: times kept)
    folder = run / "logs" / "sine_maml" / "version_0" / "checkpoints"
    last, best = folder / "last.ckpt", folder / Path(straight["best_checkpoint"]).name
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    alone = tmp_path / "alone" / "last.ckpt"
    alone.parent.mkdir()
    shutil.copy2(last, alone)
    before = snapshot(tmp_path)

    for path, neighbour in ((last, best), (alone, None)):
        with pytest.raises(SystemExit) as exc:
            main(["fit", *sine_config(**RUN, **{"trainer.default_root_dir": run}), "--ckpt_path", str(path)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
        line = lines[0]
        assert line.startswith(f"error: checkpoint file is corrupt (truncated: {len(data) // 2} bytes"), line
        assert f": {path}" in line
        if neighbour is not None:
            assert f"; the newest intact checkpoint beside it: {neighbour} (set LIT_META_TRACEBACK" in line, line
        else:
            assert "intact checkpoint" not in line, line
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------- (3) two runs at once
def close_to(state: dict[str, torch.Tensor], init: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> bool:
    """``state`` trained from ``init``, not from ``other``: 10 Adam steps of 1e-3 move a weight by
    at most ~0.01, far less than two seeds' initial weights differ."""
    return all((state[k] - init[k]).abs().max() < (state[k] - other[k]).abs().max()
               for k in init if init[k].numel() > 1)


def test_two_runs_started_at_once_in_one_root_dir_get_their_own_version_folders(tmp_path, capsys, monkeypatch):
    """Two fits set up at the same moment in one default_root_dir (each about to start training,
    its version taken, before either has written anything; seeds 0 and 1): two version folders,
    each with its own last.ckpt, best checkpoint and results.json, trained from its own seed."""
    from lit_meta.cli import MetaCLI

    monkeypatch.chdir(tmp_path)
    short = {**RUN, "trainer.max_steps": 10, "trainer.default_root_dir": tmp_path / "root",
             "trainer.enable_model_summary": "false"}
    clis = [MetaCLI(args=sine_config(**short, seed_everything=seed), run=False) for seed in (0, 1)]
    inits = [{k: v.clone() for k, v in cli.model.state_dict().items()} for cli in clis]
    for cli in clis:  # what LightningCLI does first, in each process
        cli.before_fit()
    dirs = [Path(cli.trainer.logger.log_dir) for cli in clis]  # as Lightning resolves them at fit start
    runs = tmp_path / "root" / "logs" / "sine_maml"
    assert dirs == [runs / "version_0", runs / "version_1"] and all(d.is_dir() for d in dirs)
    results = []
    for cli in clis:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        cli.after_fit()
        results.append(json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("results: "))
                                  .read_text()))
    assert_two_separate_runs(results, dirs, inits)


def assert_two_separate_runs(results: list[dict], dirs: list[Path], inits: list[dict]) -> None:
    states = []
    for result, folder in zip(results, dirs):
        assert (folder / "results.json").is_file()
        assert Path(result["last_checkpoint"]) == folder / "checkpoints" / "last.ckpt"
        assert Path(result["best_checkpoint"]).parent == folder / "checkpoints"
        state = torch.load(result["last_checkpoint"], weights_only=False)
        assert state["global_step"] == 10
        states.append(state["state_dict"])
    for mine, (init, other) in zip(states, (inits, inits[::-1])):
        assert close_to(mine, init, other)  # each run's checkpoint is its own, not the other's


class SineTogether(SineDataModule):
    """Sine tasks, and a meeting point: ``prepare_data`` (the first hook of fit) reads the log
    version as Lightning would take it (the next free number), then waits until ``parties`` fits
    have come that far (files in ``meet``). Two runs "started at once", exactly: each has taken
    its version before the other has created any folder."""

    def __init__(self, meet: str = "", parties: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.meet, self.parties = Path(meet), parties

    def prepare_data(self) -> None:
        self.trainer.logger.version
        (self.meet / f"{os.getpid()}.here").touch()
        deadline = time.monotonic() + 120
        while len(list(self.meet.glob("*.here"))) < self.parties:
            if time.monotonic() > deadline:
                raise RuntimeError("the other run never came")
            time.sleep(0.01)


@pytest.mark.slow  # two train.py processes at once (~15 s here); the same race, set up in-process: above
def test_two_train_py_processes_started_at_once_in_one_root_dir_keep_their_checkpoints(tmp_path):
    """Two ``python train.py fit`` in one default_root_dir, seeds 0 and 1, meeting at the start of
    fit (each with the log version Lightning would give it, before either has created a folder):
    two version folders, each with its own checkpoints and results.json, trained from its own seed."""
    from lit_meta.cli import MetaCLI

    short = {**RUN, "trainer.max_steps": 10, "trainer.default_root_dir": tmp_path / "root"}
    meet = tmp_path / "meet"
    meet.mkdir()
    together = ["--data.class_path", f"{__name__}.SineTogether", "--data.init_args.meet", str(meet)]
    procs = [subprocess.Popen([sys.executable, str(REPO / "train.py"), "fit",
                               *sine_config(**short, seed_everything=seed), *together], cwd=tmp_path,
                              env=train_py_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (0, 1)]
    outs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    paths = [Path(out.strip().splitlines()[-1].removeprefix("results: ")) for out, _ in outs]
    runs = tmp_path / "root" / "logs" / "sine_maml"
    assert sorted(p.parent for p in paths) == [runs / "version_0", runs / "version_1"]
    dirs = [p.parent for p in paths]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        inits = [MetaCLI(args=sine_config(**short, seed_everything=seed), run=False).model.state_dict()
                 for seed in (0, 1)]
    finally:
        os.chdir(cwd)
    assert_two_separate_runs([json.loads(p.read_text()) for p in paths], dirs, inits)
