"""Mixed precision: every algorithm takes finite meta-steps under bf16-mixed (and
16-mixed, whose inner loop runs in fp32) on CPU."""
from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision

from lit_meta.algorithms import ANIL, MAML, MAMLpp, MetaSGD, Reptile, Transfer
from lit_meta.algorithms.episodic import inner_precision
from lit_meta.data.sine import SineDataModule

ALGORITHMS = {
    "maml": (MAML, {}), "fomaml": (MAML, {"first_order": True}), "reptile": (Reptile, {"inner_optimizer": "sgd"}),
    "metasgd": (MetaSGD, {}), "mamlpp": (MAMLpp, {"inner_steps": 2, "bnwb": False, "bnrs": False}),
    "anil": (ANIL, {}), "transfer": (Transfer, {"inner_steps": 0}),
    "mamlpp_checkpointed": (MAMLpp, {"inner_steps": 2, "bnwb": False, "bnrs": False, "inner_checkpointing": True}),
}


class GradientWatch(pl.Callback):
    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        self.norms.append(torch.stack([g.float().norm() for g in grads]).norm().item())


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_meta_steps_are_finite_under_mixed_precision(tmp_path, name, precision):
    cls, kwargs = ALGORITHMS[name]
    dm = SineDataModule(meta_batch_size=8)
    model = cls(task_spec=dm.task_spec, **{"inner_lr": 0.01, **kwargs})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    watch = GradientWatch()
    # Lightning turns a plain precision="16-mixed" into bf16 on CPU; the plugin forces fp16 + GradScaler.
    plugins = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))] if precision == "16-mixed" else []
    trainer = pl.Trainer(accelerator="cpu", plugins=plugins, max_steps=3, logger=False,
                         precision=None if plugins else precision,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         inference_mode=False, limit_val_batches=0, callbacks=[watch], default_root_dir=tmp_path)
    trainer.fit(model, dm)
    # fp16 may overflow: GradScaler then skips the step, and the meta-step counts it
    finite = [n for n in watch.norms if math.isfinite(n)]
    assert len(watch.norms) == 3 and all(n > 0 for n in finite)
    assert len(finite) + model.meta_step.skipped_steps == 3 and finite
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_16_mixed_runs_the_inner_loop_in_fp32():
    seen: list[torch.dtype] = []
    dm = SineDataModule(meta_batch_size=2)
    model = MAML(task_spec=dm.task_spec)

    class Probe:
        precision = "16-mixed"

    model._trainer = Probe()
    with torch.autocast("cpu", dtype=torch.float16):
        with inner_precision(model):
            seen.append(torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype)
        seen.append(torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype)
    model._trainer = None
    assert seen == [torch.float32, torch.float16]
