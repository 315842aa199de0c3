"""ResNet-12 (lit_meta/models/resnet12.py): MetaOptNet's shape, and every algorithm's machinery on
it as on conv4 (per-step BatchNorm, task chunks, inner checkpointing: the same meta-gradient)."""
from __future__ import annotations

import pytest
import torch

from lit_meta.algorithms import MAML, MAMLpp
from lit_meta.models import ResNet12
from lit_meta.models.layers import PerStepBatchNorm
from lit_meta.tasks import TaskBatch, task_spec
from tests.episodes import run

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = task_spec("toy-images", "classification", [3, 16, 16], ways=3)
TINY = {"channels": [4, 6, 8, 8]}


def test_the_metaoptnet_variant_has_its_shape_and_size():
    net = ResNet12(3, 5, 84)
    assert [b.convs[0].out_channels for b in net.body] == [64, 160, 320, 640]
    assert net.feature_dim == 640 and ResNet12(3, 5, 84, head_pool="flatten").feature_dim == 640 * 5 * 5
    assert sum(p.numel() for p in net.parameters()) == 12_427_525  # MetaOptNet reports 12.4M
    assert all(isinstance(m, PerStepBatchNorm) for b in net.body for m in b.norms)


def batch(tasks: int = 4) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat(tasks, 2)
    return TaskBatch(torch.randn(tasks, 6, 3, 16, 16, generator=g, dtype=torch.float64), y,
                     torch.randn(tasks, 6, 3, 16, 16, generator=g, dtype=torch.float64), y.clone())


def meta_gradient(**options) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = MAML(task_spec=SPEC, backbone="resnet12", backbone_kwargs=TINY, inner_steps=2, inner_lr=0.3,
                 meta_batch_size=4, **options).double()
    model.outer_update(batch())  # through the meta-step: chunks accumulate into .grad
    return [p.grad.clone() for p in model.net.parameters()]


def test_task_chunks_and_inner_checkpointing_give_the_same_second_order_meta_gradient():
    whole = meta_gradient()
    for options in ({"task_chunk_size": 1}, {"inner_checkpointing": True}):
        for a, b in zip(meta_gradient(**options), whole):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_mamlpp_puts_its_per_step_batchnorm_in_every_block():
    model = MAMLpp(task_spec=SPEC, backbone="resnet12", backbone_kwargs=TINY, inner_steps=2)
    norms = model.per_step_norms()
    assert len(norms) == 4 * 4 and all(n.per_step_stats and n.per_step_weights for n in norms.values())
    out = run(model, TaskBatch(*(t.float() if t.is_floating_point() else t for t in batch(2).tensors().values())),
              2, first_order=False, training=True)
    assert torch.isfinite(out["query_loss"]).all()


def test_dropout_is_random_in_training_only_and_inner_checkpointing_refuses_it():
    net = ResNet12(3, 3, 16, channels=(4, 6, 8, 8), drop_rate=0.5)
    x = torch.randn(4, 3, 16, 16)
    assert not torch.equal(net(x), net(x))  # training: a new mask each forward
    net.eval()
    assert torch.equal(net(x), net(x))
    model = MAML(task_spec=SPEC, backbone="resnet12", backbone_kwargs={**TINY, "drop_rate": 0.1},
                 inner_checkpointing=True)
    with pytest.raises(ValueError, match="drop_rate > 0"):
        model.setup("fit")
