"""``train.py adapt`` for the methods of issue 24: a checkpoint adapts to a folder of PNG files.
ProtoNet and R2-D2 compute their head from the support folder (no gradient step), checked by
hand on the embeddings of the files; iMAML and BOIL take their own inner steps."""
from __future__ import annotations

import pytest
import torch

from lit_meta.adapt import adapt
from lit_meta.algorithms import BOIL, IMAML, R2D2, MetaBaseline, ProtoNet
from lit_meta.data.preprocessing import images_from_files
from lit_meta.episode import adapt_task
from lit_meta.models.heads import ridge_logits
from tests.test_adapt import SMALL, evaluation_task, make_omni, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    return make_omni(tmp_path_factory.mktemp("omniglot"))


def read(folder, spec):
    files = sorted(p for p in folder.rglob("*.png"))
    labels = torch.tensor([sorted({p.parent.name for p in files}).index(p.parent.name) for p in files])
    return images_from_files(files, spec).images, labels


@pytest.mark.parametrize("cls", [ProtoNet, MetaBaseline, R2D2])
def test_a_headless_method_computes_its_head_from_the_support_folder(omni, tmp_path, cls):
    torch.manual_seed(0)
    model = cls(task_spec=omni["dm"].task_spec, backbone_kwargs=SMALL).eval()
    ckpt = save_checkpoint(model, tmp_path / "m.ckpt")
    support, query = evaluation_task(omni, tmp_path, [0, 1, 2], shots=2)  # 3-way, model 5-way: no notice
    result = adapt(ckpt, support, query)
    assert not result.notices and result.outputs.shape[1] == 5
    sx, sy = read(support, model.task_spec)
    qx, _ = read(query, model.task_spec)
    with torch.no_grad():
        z = model.net(torch.cat([sx, qx]))
    zs, zq = z[:len(sx)], z[len(sx):]
    if cls is R2D2:
        expected = ridge_logits(zs, sy, zq, 5, model.log_lam.exp(), model.adjust_scale, model.adjust_bias)
    else:
        centres = torch.stack([zs[sy == k].mean(0) for k in range(3)])
        expected = -torch.cdist(zq, centres) ** 2 if cls is ProtoNet else \
            model.log_scale.exp() * torch.nn.functional.normalize(zq, dim=-1) @ \
            torch.nn.functional.normalize(centres, dim=-1).T
    torch.testing.assert_close(result.outputs[:, :3], expected[:, :3].detach(), rtol=1e-4, atol=1e-4)
    assert (result.outputs[:, 3:] < -1e30).all()  # classes the support folder lacks drop out
    assert result.accuracy is not None


@pytest.mark.parametrize("cls", [IMAML, BOIL])
def test_an_inner_loop_method_adapts_with_its_own_steps(omni, tmp_path, cls):
    torch.manual_seed(0)
    model = cls(task_spec=omni["dm"].task_spec, backbone_kwargs=SMALL, inner_lr=0.4, eval_inner_steps=3)
    ckpt = save_checkpoint(model, tmp_path / "m.ckpt")
    support, query = evaluation_task(omni, tmp_path, [0, 1, 2])
    adapted, unadapted = adapt(ckpt, support, query), adapt(ckpt, support, query, steps=0)
    assert ("first 3 rows" if cls is BOIL else "3-way head") in adapted.notices[0]
    assert not torch.allclose(adapted.outputs, unadapted.outputs, atol=1e-4)  # the steps did something
    loaded = type(model).load_from_checkpoint(ckpt).eval()
    loaded.resize_head(3)
    if cls is BOIL:  # the meta-learned head's rows, not a zero head that would give the body no gradient
        torch.testing.assert_close(loaded.net.head.weight, model.net.head.weight[:3])
    sx, sy = read(support, model.task_spec)
    qx, _ = read(query, model.task_spec)
    torch.testing.assert_close(adapted.outputs, loaded.adapt_and_predict(sx, sy, qx), rtol=1e-4, atol=1e-5)
    if cls is BOIL:  # the head is the meta-learned one after the steps: only the body adapted
        ctx = loaded.context(False)
        assert set(loaded.adapt_names()) == {n for n, _ in loaded.net.named_parameters() if not n.startswith("head.")}
        assert ctx.bn == "transductive"
        theta = {n: p.detach() for n, p in loaded.inner_params().items()}
        with torch.enable_grad():
            after = adapt_task(loaded, theta, sx, sy, loaded.eval_inner_steps, True, ctx).params
        assert all(torch.equal(after[n], theta[n]) for n in theta if n.startswith("head."))
        convolutions = [n for n in theta if theta[n].dim() == 4]  # every conv weight of the body moved
        assert convolutions and all(not torch.equal(after[n], theta[n]) for n in convolutions)


def test_boil_refuses_more_classes_than_its_fixed_head_has(omni):
    model = BOIL(task_spec=omni["dm"].task_spec, backbone_kwargs=SMALL)
    with pytest.raises(ValueError, match="a 7-way task needs a checkpoint trained with at least 7 classes, this one has 5"):
        model.resize_head(7)
