"""Exact resume for the methods without an inner loop (ProtoNet, R2-D2, Meta-Baseline), which
classify and so cannot take the sine configs of tests/test_cli.py's resume test: a fit stopped
mid-epoch at step 6 and resumed from its checkpoint ends where a straight 12-step fit ends, weights
and Adam state alike, under a cosine schedule (the learning rate depends on the restored step)."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from lit_meta.algorithms import R2D2, MetaBaseline, ProtoNet
from tests.test_cli import StopAt
from tests.test_distributed import Blobs

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(root, cls, kwargs, seed: int, stop: int | None = None, ckpt: str | None = None):
    pl.seed_everything(seed, verbose=False)
    dm = Blobs(meta_batch_size=4, val_tasks=4, test_tasks=4, steps_per_epoch=5)
    model = cls(task_spec=dm.task_spec, meta_batch_size=4, meta_lr=0.01, lr_schedule="cosine", **kwargs)
    trainer = pl.Trainer(max_steps=12, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, inference_mode=False, default_root_dir=root,
                         limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                         callbacks=[StopAt(stop)] if stop else [])
    trainer.fit(model, dm, ckpt_path=ckpt)
    return trainer, model


@pytest.mark.parametrize("cls,kwargs", [(ProtoNet, {}), (R2D2, {"learn_lambda": True}), (MetaBaseline, {})],
                         ids=["protonet", "r2d2", "metabaseline"])
def test_a_headless_method_resumes_to_the_uninterrupted_run(tmp_path, cls, kwargs):
    _, straight = _fit(tmp_path / "straight", cls, kwargs, seed=0)
    stopped, _ = _fit(tmp_path / "half", cls, kwargs, seed=0, stop=6)
    assert stopped.global_step == 6
    ckpt = str(tmp_path / "half.ckpt")
    stopped.save_checkpoint(ckpt)
    # the resumed leg starts from other initial weights (seed 1): only the checkpoint can make it match
    inits = []
    for seed in (0, 1):
        pl.seed_everything(seed, verbose=False)
        inits.append(cls(task_spec=Blobs().task_spec, **kwargs).state_dict())
    assert any(not torch.equal(inits[0][n], inits[1][n]) for n in inits[0])
    resumed_trainer, resumed = _fit(tmp_path / "resumed", cls, kwargs, seed=1, ckpt=ckpt)
    assert resumed_trainer.global_step == 12
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    opt_a = straight.optimizers().optimizer.state_dict()
    opt_b = resumed.optimizers().optimizer.state_dict()
    assert opt_a["param_groups"][0]["lr"] == opt_b["param_groups"][0]["lr"]
    for key, state in opt_a["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(opt_b["state"][key][name], value, rtol=0, atol=1e-6)
    # and the run learned something between step 6 and 12 (the two halves are not both no-ops)
    half = torch.load(ckpt, weights_only=False)["state_dict"]
    assert any(not torch.allclose(half[n], v) for n, v in straight.state_dict().items())
