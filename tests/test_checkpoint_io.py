"""Checkpoint files through ``train.py``: the atomic writer is the Trainer's, whatever plugins
the user adds; a full disk or an unwritable folder is one line naming the path and the
previous checkpoint survives; the temporary file of a killed write is removed on the next
start; a checkpoint of another kind is one line saying what it holds and what was expected.

(The writer itself, failing mid-write or at the rename: tests/test_distributed.py,
``test_atomic_save_keeps_the_previous_checkpoint_when_a_write_dies``.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

import lit_meta.checkpoint as checkpoint_module
from lit_meta.algorithms import MAML, Reptile
from lit_meta.checkpoint import AtomicCheckpointIO, atomic_torch_save, remove_orphans
from lit_meta.cli import MetaCLI
from lit_meta.data import OmniglotDataModule
from lit_meta.data.sine import SineDataModule
from tests.conftest import REPO, sine_config
from tests.faults import fail_atomic_writes
from tests.image_data_fixtures import omniglot_arrays, write_omniglot_npz
from tests.test_adapt import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def cli_error(run_cli, capsys, *args) -> str:
    """Run train.py in-process expecting failure: exit code 2, no traceback, one ``error:`` line last."""
    with pytest.raises(SystemExit) as exc:
        run_cli(*args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and last.endswith("(set LIT_META_TRACEBACK=1 for the traceback)"), last
    return last


def results_of(capsys) -> dict:
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("results: "), last
    return json.loads(Path(last.removeprefix("results: ")).read_text())


# ---------------------------------------------------------------------------- the writer is the Trainer's
class OwnCheckpointIO(TorchCheckpointIO):
    """A user's own checkpoint writer."""


@pytest.mark.parametrize("plugins,expected", [
    (None, AtomicCheckpointIO),
    # plugins of the user's own: the list replaces the defaults, the atomic writer stays
    ('[{"class_path": "pytorch_lightning.plugins.precision.DoublePrecision"}]', AtomicCheckpointIO),
    # a checkpoint writer of the user's own is used as given (README "Clusters")
    ('[{"class_path": "tests.test_checkpoint_io.OwnCheckpointIO"}]', OwnCheckpointIO),
])
def test_the_trainer_built_by_train_py_writes_checkpoints_atomically(tmp_path, monkeypatch, plugins, expected):
    monkeypatch.chdir(tmp_path)
    args = sine_config() + (["--trainer.plugins", plugins] if plugins else [])
    cli = MetaCLI(args=args, run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is expected
    if plugins and "DoublePrecision" in plugins:
        assert type(cli.trainer.precision_plugin).__name__ == "DoublePrecision"


def test_every_checkpoint_of_a_fit_goes_through_the_atomic_writer(run_cli, capsys, monkeypatch):
    written = []
    save = checkpoint_module.atomic_torch_save

    def spy(obj, path):
        written.append(Path(path).name)
        save(obj, path)

    monkeypatch.setattr(checkpoint_module, "atomic_torch_save", spy)
    run_cli("fit", *sine_config(), "--trainer.plugins",
            '[{"class_path": "pytorch_lightning.plugins.environments.LightningEnvironment"}]')
    results = results_of(capsys)
    on_disk = sorted(p.name for p in Path(results["last_checkpoint"]).parent.glob("*.ckpt"))
    assert set(on_disk) <= set(written) and "last.ckpt" in written and len(on_disk) >= 2, (on_disk, written)


# ---------------------------------------------------------------------------- a full disk, an unwritable folder
def test_a_full_disk_while_checkpointing_is_one_line_and_the_previous_checkpoint_survives(
        run_cli, capsys, monkeypatch, tmp_path):
    names = fail_atomic_writes(monkeypatch, good_writes=2)  # validation at step 10: best-10.ckpt, last.ckpt
    last = cli_error(run_cli, capsys, "fit", *sine_config(**{"trainer.logger.init_args.version": "run"}))
    folder = tmp_path / "logs" / "sine_maml" / "run" / "checkpoints"
    assert len(names) == 3 and f"cannot write {folder / names[2]}: No space left on device" in last, last
    assert "the previous file there is unchanged" in last or names[2] != "last.ckpt"
    monkeypatch.undo()
    survivor = torch.load(folder / "last.ckpt", weights_only=False)  # loadable: the one of step 10
    assert survivor["global_step"] == 10
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_while_writing_results_json_is_one_line(run_cli, capsys, monkeypatch, tmp_path):
    fail_atomic_writes(monkeypatch, only="results.json", room=100)
    last = cli_error(run_cli, capsys, "fit", *sine_config(**{"trainer.logger.init_args.version": "run"}))
    run = tmp_path / "logs" / "sine_maml" / "run"
    assert f"cannot write {run / 'results.json'}: No space left on device" in last, last
    assert (run / "checkpoints" / "last.ckpt").is_file() and not list(run.glob(".*.tmp"))


def test_a_log_folder_that_cannot_be_created_is_one_line_naming_it(run_cli, capsys, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    last = cli_error(run_cli, capsys, "fit",
                     *sine_config(**{"trainer.logger.init_args.save_dir": tmp_path / "a_file" / "logs"}))
    assert str(tmp_path / "a_file") in last and "Not a directory" in last, last


# ---------------------------------------------------------------------------- orphans of a kill -9
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_orphans_of_a_killed_write_are_removed_by_the_next_write(tmp_path):
    orphan = tmp_path / f".last.ckpt.{dead_pid()}.0123abcd.tmp"
    alive = tmp_path / f".last.ckpt.{os.getpid()}.89abcdef.tmp"  # a write in progress: left alone
    other = tmp_path / ".notes.tmp"  # not ours
    for path in (orphan, alive, other):
        path.write_bytes(b"half a checkpoint")
    with pytest.warns(UserWarning, match=f"removed 1 unfinished temporary file.*{orphan.name}"):
        atomic_torch_save({"step": 1}, tmp_path / "best-1.ckpt")
    assert not orphan.exists() and alive.exists() and other.exists()
    assert remove_orphans(tmp_path) == []  # nothing left to remove


class OrphanProbe(pl.Callback):
    """Notes, when training starts (before any checkpoint is written), which files exist."""

    watched: list[Path] = []
    seen: list[bool] = []

    def on_train_start(self, trainer, module) -> None:
        OrphanProbe.seen = [p.exists() for p in OrphanProbe.watched]


def test_the_next_fit_removes_the_orphans_of_a_killed_one_at_its_start(run_cli, capsys, tmp_path):
    common = {"trainer.logger.init_args.version": "run", "test_after_fit": "false"}
    run_cli("fit", *sine_config(**common, **{"trainer.max_steps": 10}))
    first = results_of(capsys)
    folder = Path(first["last_checkpoint"]).parent
    orphan = folder / f".last.ckpt.{dead_pid()}.0123abcd.tmp"
    orphan.write_bytes(b"PK\x03\x04 what a kill -9 mid-save leaves")
    OrphanProbe.watched = [orphan]
    with pytest.warns(UserWarning, match=f"removed 1 unfinished temporary file.*{orphan.name}"):
        run_cli("fit", *sine_config(**common, **{"trainer.max_steps": 11, "ckpt_path": first["last_checkpoint"]}),
                "--trainer.callbacks+=tests.test_checkpoint_io.OrphanProbe")
    assert OrphanProbe.seen == [False]  # gone before the first step


# ---------------------------------------------------------------------------- checkpoints of another kind
@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_a_checkpoint_of_another_algorithm_is_one_line(run_cli, capsys, tmp_path, subcommand):
    ckpt = save_checkpoint(Reptile(task_spec=SineDataModule().task_spec), tmp_path / "reptile.ckpt")
    last = cli_error(run_cli, capsys, subcommand, *sine_config(ckpt_path=ckpt))
    assert f"checkpoint {ckpt} holds a Reptile model (lit_meta.algorithms.Reptile)" in last
    assert "the config names lit_meta.algorithms.MAML" in last


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_a_plain_state_dict_is_one_line(run_cli, capsys, tmp_path, subcommand):
    path = tmp_path / "weights.pt"
    torch.save(MAML(task_spec=SineDataModule().task_spec).state_dict(), path)
    last = cli_error(run_cli, capsys, subcommand, *sine_config(ckpt_path=path))
    assert f"checkpoint {path} holds a plain state_dict (6 tensors: 'net.body.0.weight', ...)" in last
    assert "not a checkpoint written by train.py fit" in last


def test_a_checkpoint_of_another_task_shape_is_one_line(run_cli, capsys, tmp_path):
    root = write_omniglot_npz(tmp_path / "omniglot", omniglot_arrays())
    five_way = OmniglotDataModule(root=str(root), ways=5, image_size=28).task_spec
    ckpt = save_checkpoint(MAML(task_spec=five_way, backbone_kwargs={"filters": 4}), tmp_path / "5way.ckpt")
    last = cli_error(run_cli, capsys, "test", "--config", str(REPO / "configs" / "omniglot" / "maml_5w1s.yaml"),
                     "--data.root", str(root), "--data.ways", "3", "--ckpt_path", str(ckpt))
    assert f"checkpoint {ckpt} was trained with ways=5 but the data gives 3: set data.ways to match" in last


def _train_py_with_a_plain_state_dict(tmp_path, traceback: bool) -> tuple[subprocess.CompletedProcess, object]:
    path = tmp_path / "weights.pt"
    torch.save(MAML(task_spec=SineDataModule().task_spec).state_dict(), path)
    command = [sys.executable, str(REPO / "train.py"), "test", "--config", str(REPO / "configs" / "sine" / "maml.yaml"),
               "--ckpt_path", str(path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LIT_META_TRACEBACK", None)
    if traceback:
        env["LIT_META_TRACEBACK"] = "1"
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300), path


def test_train_py_itself_prints_one_line(tmp_path):
    """The real command line, as a user runs it: exit code 2 and one ``error:`` line."""
    done, path = _train_py_with_a_plain_state_dict(tmp_path, traceback=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: checkpoint {path} holds a plain state_dict")


@pytest.mark.slow  # a second train.py process (5 s); main()'s LIT_META_TRACEBACK branch is one line
def test_train_py_itself_prints_the_traceback_only_when_asked(tmp_path):
    done, path = _train_py_with_a_plain_state_dict(tmp_path, traceback=True)
    assert done.returncode != 0 and "Traceback" in done.stderr and "holds a plain state_dict" in done.stderr
