"""lit_meta/internals.py: the one module that reads private attributes of Lightning, torch and
W&B. Each read is checked here against the installed versions, which must lie in the range the
module names (CHECKED); and no other lit_meta module touches such an attribute."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from packaging.version import Version

from lit_meta import internals
from lit_meta.algorithms import MAML
from lit_meta.data.sine import SineDataModule
from tests.conftest import REPO

PACKAGE = REPO / "lit_meta"


@pytest.mark.parametrize("package,module", [("torch", torch), ("pytorch_lightning", pl)])
def test_the_installed_versions_are_the_checked_ones(package, module):
    low, high = internals.CHECKED[package]
    version = Version(module.__version__.split("+")[0])
    assert Version(low) <= version and version.release[:len(Version(high).release)] <= Version(high).release, (
        f"{package} {module.__version__} is outside the range lit_meta/internals.py was checked on "
        f"({low}-{high}): re-check each function there and widen CHECKED")


def test_each_private_read_still_finds_what_it_reads(tmp_path):
    dm = SineDataModule(meta_batch_size=2, val_tasks=2, test_tasks=2)
    model = MAML(task_spec=dm.task_spec)
    assert internals.attached_trainer(model) is None
    trainer = pl.Trainer(max_steps=3, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                         log_every_n_steps=2, default_root_dir=tmp_path)
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, module, *args) -> None:
            seen.append((internals.attached_trainer(module) is trainer, internals.lightning_logs_this_step(trainer)))

    trainer.callbacks.append(Probe())
    trainer.fit(model, dm)
    # Lightning's own rule: (batches stepped + 1) % log_every_n_steps, i.e. the second step of three
    assert seen == [(True, False), (True, True), (True, False)]
    assert internals.trainer_inference_mode(trainer) is False
    assert internals.trainer_inference_mode(pl.Trainer(logger=False, inference_mode=True)) is True
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(torch.ones(()))  # the scale tensor is made lazily
    assert float(internals.grad_scaler_scale(scaler)) == 8.0
    assert [t.tolist() for t in internals.foreach_copy([torch.ones(2)])] == [[1.0, 1.0]]
    assert float(internals.foreach_max_abs([torch.tensor([1.0, -3.0])])[0]) == 3.0
    torch.compiler.reset()
    graphs = internals.compiled_graph_count()
    torch.compile(lambda x: x * 2, backend="eager")(torch.ones(2))
    assert internals.compiled_graph_count() == graphs + 1
    from pytorch_lightning.cli import LightningCLI

    assert hasattr(LightningCLI, "_parse_ckpt_path")  # what CheckpointHparamsHook replaces
    from pytorch_lightning.loggers import CSVLogger

    logger = CSVLogger(tmp_path / "logs")
    assert internals.logger_version_unset(logger)
    internals.set_logger_version(logger, 7)
    assert not internals.logger_version_unset(logger) and logger.version == 7
    assert logger.log_dir.endswith("version_7")


def test_the_loop_state_marks_find_the_keys_of_a_real_checkpoint(tmp_path):
    """SaveOnSigterm's two marks edit Lightning's fit-loop state in a checkpoint: the keys they
    change are in one this Lightning writes, with the counts they expect."""
    dm = SineDataModule(meta_batch_size=2, val_tasks=2, test_tasks=2, steps_per_epoch=2)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, inference_mode=False, default_root_dir=tmp_path)
    trainer.fit(MAML(task_spec=dm.task_spec), dm)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    checkpoint = torch.load(tmp_path / "c.ckpt", weights_only=False)
    loops = checkpoint["loops"]["fit_loop"]
    before = loops["epoch_loop.state_dict"]["_batches_that_stepped"]
    epochs = dict(loops["epoch_progress"]["current"])
    internals.mark_restart_on_train_batch_end(checkpoint)
    assert loops["epoch_loop.state_dict"]["_batches_that_stepped"] == before - 1
    assert loops["epoch_progress"]["current"]["completed"] == epochs["completed"] - 1
    val = loops["epoch_loop.val_loop.batch_progress"]["current"]
    assert {"started", "processed", "completed"} <= set(val)
    val.update(started=3, processed=3, completed=3)  # as inside a validation's third batch
    internals.mark_restart_mid_validation(checkpoint)
    assert (val["started"], val["processed"], val["completed"]) == (3, 2, 2)


def test_evaluation_under_inference_mode_is_a_one_line_error(tmp_path):
    """Evaluation adapts with gradients: a Trainer with inference_mode=True stops at fit start."""
    dm = SineDataModule(meta_batch_size=2, val_tasks=2, test_tasks=2)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, inference_mode=True, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="inference_mode=False"):
        trainer.fit(MAML(task_spec=dm.task_spec), dm)


def test_the_wandb_fallback_finds_the_loggers_attributes(tmp_path, monkeypatch):
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), offline=False)
    assert internals.wandb_is_offline(logger) is False
    internals.wandb_restart_offline(logger)
    assert internals.wandb_is_offline(logger) and logger._wandb_init["mode"] == "offline"


def lightning_private_names() -> set[str]:
    """The underscore attributes a LightningModule and a Trainer hold (``self._trainer``, ...)."""
    return {n for n in vars(pl.LightningModule()) | vars(pl.Trainer(logger=False))
            if n.startswith("_") and not n.startswith("__")}


def test_no_other_module_reads_a_private_attribute_of_lightning_torch_or_wandb():
    lightning = lightning_private_names() - {"_modules", "_parameters", "_buffers"}  # nn.Module's own
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "internals.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in (
                    "torch", "pytorch_lightning", "lightning_fabric", "wandb"):
                if any(part.startswith("_") for part in node.module.split(".")):
                    offences.append(f"{where} imports {node.module}")
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
                continue
            base = node.value
            root = base
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in ("torch", "pl", "wandb", "aten"):
                offences.append(f"{where} reads {ast.unparse(node)}")
            elif node.attr in lightning:
                offences.append(f"{where} reads {ast.unparse(node)} (a Lightning attribute)")
    assert not offences, offences
