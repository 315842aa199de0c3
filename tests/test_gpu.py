"""CUDA: the engine's meta-gradient on the GPU equals the CPU one, and mixed-precision
meta-steps there are finite. Marked ``gpu``: ``pytest -m gpu`` runs exactly these; without a
CUDA device tests/conftest.py skips them (CI has none)."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from lit_meta.algorithms import MAML
from lit_meta.data.sine import SineDataModule
from lit_meta.tasks import TaskBatch, task_spec
from tests.episodes import run

pytestmark = pytest.mark.gpu


def _meta_grad(model: MAML, batch: TaskBatch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    out = run(model, batch, 2, first_order=False, training=True)
    out["query_loss"].mean().backward()
    return {n: p.grad.detach().cpu() for n, p in model.net.named_parameters()}


def test_second_order_meta_gradient_on_cuda_equals_cpu():
    """conv4 + batch norm, 2 inner steps, float64 (no TF32): CPU and CUDA agree to 1e-8."""
    spec = task_spec("toy-images", "classification", [1, 16, 16], ways=3)
    torch.manual_seed(0)
    model = MAML(spec, backbone_kwargs={"filters": 8}, inner_lr=0.4, inner_steps=2).double()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat(4, 2)
    batch = TaskBatch(torch.randn(4, 6, 1, 16, 16, generator=g, dtype=torch.float64), y,
                      torch.randn(4, 6, 1, 16, 16, generator=g, dtype=torch.float64), y.clone())
    cpu = _meta_grad(model, batch)
    cuda = _meta_grad(model.cuda(), batch.to("cuda"))
    for name in cpu:
        torch.testing.assert_close(cuda[name], cpu[name], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_meta_steps_on_cuda_are_finite_and_move_the_weights(tmp_path, precision):
    dm = SineDataModule(meta_batch_size=8)
    model = MAML(task_spec=dm.task_spec, inner_lr=0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pl.Trainer(accelerator="cuda", devices=1, precision=precision, max_steps=5, limit_val_batches=0, logger=False,
               enable_checkpointing=False, enable_progress_bar=False, inference_mode=False,
               default_root_dir=tmp_path).fit(model, dm)
    after = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(after[n].detach().cpu(), before[n]) for n in before)
