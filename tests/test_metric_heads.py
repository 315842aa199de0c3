"""ProtoNet, R2-D2 and Meta-Baseline (lit_meta/algorithms/{protonet,r2d2,metabaseline}.py,
lit_meta/models/heads.py) against hand-built references in float64: logits, the solve, and
the meta-gradient through them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_meta.algorithms import MAML, R2D2, MetaBaseline, ProtoNet, Transfer
from lit_meta.episode import EpisodeContext, run_tasks
from lit_meta.models.heads import ridge_logits
from lit_meta.tasks import TaskBatch, task_spec

pytestmark = pytest.mark.usefixtures("one_thread")

WAYS = 4
IMAGES = task_spec("toy-images", "classification", [1, 8, 8], ways=WAYS)


def batch(tasks: int = 3, ways: int = 3, shots: int = 2, queries: int = 2, seed: int = 0) -> TaskBatch:
    """``ways``-way episodes (fewer classes than the model's WAYS: the others must drop out)."""
    g = torch.Generator().manual_seed(seed)
    sy = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    qy = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return TaskBatch(torch.randn(tasks, ways * shots, 1, 8, 8, generator=g, dtype=torch.float64), sy,
                     torch.randn(tasks, ways * queries, 1, 8, 8, generator=g, dtype=torch.float64), qy)


def model_of(cls, **kwargs):
    torch.manual_seed(0)
    return cls(task_spec=IMAGES, backbone_kwargs={"filters": 4}, meta_batch_size=3, **kwargs).double()


def by_hand(model, b: TaskBatch, score) -> torch.Tensor:
    """Mean query cross-entropy, task by task, with a plain loop: embed support + query together
    (the episode's BatchNorm), class means, ``score(query, support, labels)``."""
    losses = []
    for t in range(b.num_tasks):
        z = model.net(torch.cat([b.support_x[t], b.query_x[t]]))
        zs, zq = z[:b.support_x.shape[1]], z[b.support_x.shape[1]:]
        losses.append(F.cross_entropy(score(zq, zs, b.support_y[t]), b.query_y[t]))
    return torch.stack(losses).mean()


def meta_gradient(model, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))


def ours(model, b: TaskBatch) -> torch.Tensor:
    return run_tasks(model, b, model.context(True, b), 0, True)["query_loss"].mean()


def test_protonet_is_squared_euclidean_distance_to_class_means():
    model = model_of(ProtoNet)
    b = batch()

    def euclidean(zq, zs, ys):
        centres = torch.stack([zs[ys == k].mean(0) for k in range(3)])
        return -torch.cdist(zq, centres) ** 2

    expected, got = by_hand(model, b, euclidean), ours(model, b)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    for a, e in zip(meta_gradient(model, got), meta_gradient(model, by_hand(model, b, euclidean))):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-10)


def test_the_cosine_head_has_a_learned_temperature():
    model = model_of(ProtoNet, distance="cosine", scale=7.0)

    def cosine(zq, zs, ys):
        centres = torch.stack([zs[ys == k].mean(0) for k in range(3)])
        return model.log_scale.exp() * F.normalize(zq, dim=-1) @ F.normalize(centres, dim=-1).T

    b = batch()
    assert float(model.log_scale.exp()) == pytest.approx(7.0)
    torch.testing.assert_close(ours(model, b), by_hand(model, b, cosine), rtol=1e-10, atol=1e-10)
    loss = ours(model, b)
    assert torch.autograd.grad(loss, model.log_scale)[0].abs() > 0  # τ is meta-learned


def test_r2d2s_dual_solve_is_the_primal_ridge_regression():
    """Woodbury: Xᵀ(XXᵀ + λI)⁻¹Y = (XᵀX + λI)⁻¹XᵀY, on the √n-scaled embeddings with a bias
    column (bertinetto/r2d2's rr_woodbury vs rr_standard), then α(qW) + β."""
    g = torch.Generator().manual_seed(1)
    zs, zq = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    ys = torch.tensor([0, 0, 1, 1, 2, 2])
    x = torch.cat([zs, torch.ones(6, 1, dtype=torch.float64)], 1) / 6 ** 0.5
    y = F.one_hot(ys, 3).double() / 6 ** 0.5
    w = torch.linalg.solve(x.T @ x + 50.0 * torch.eye(6, dtype=torch.float64), x.T @ y)
    expected = 0.3 * (torch.cat([zq, torch.ones(4, 1, dtype=torch.float64)], 1) @ w) + 0.1
    got = ridge_logits(zs, ys, zq, 4, 50.0, 0.3, 0.1)
    torch.testing.assert_close(got[:, :3], expected, rtol=1e-10, atol=1e-12)
    assert (got[:, 3] < -1e30).all()  # a class the episode lacks drops out


def test_r2d2s_meta_gradient_goes_through_the_solve():
    model = model_of(R2D2, scale=2.0, learn_lambda=True, lam=3.0)

    def ridge(zq, zs, ys):
        n = zs.shape[0]
        x = torch.cat([zs, torch.ones(n, 1, dtype=zs.dtype)], 1) / n ** 0.5
        y = F.one_hot(ys, 3).double() / n ** 0.5
        w = x.T @ torch.linalg.inv(x @ x.T + model.log_lam.exp() * torch.eye(n, dtype=zs.dtype)) @ y
        return model.adjust_scale * (torch.cat([zq, torch.ones(zq.shape[0], 1, dtype=zq.dtype)], 1) @ w) \
            + model.adjust_bias

    b = batch()
    got = ours(model, b)
    torch.testing.assert_close(got, by_hand(model, b, ridge), rtol=1e-10, atol=1e-10)
    grads = meta_gradient(model, got)
    for a, e in zip(grads, meta_gradient(model, by_hand(model, b, ridge))):
        torch.testing.assert_close(a, e, rtol=1e-7, atol=1e-10)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {"log_lam", "adjust_scale", "adjust_bias"} <= set(names)
    assert all(g.abs().sum() > 0 for n, g in zip(names, grads) if n in ("log_lam", "adjust_scale", "adjust_bias"))


@pytest.mark.parametrize("cls", [ProtoNet, R2D2, MetaBaseline])
def test_combinations_that_make_no_sense_are_one_line_errors(cls):
    with pytest.raises(ValueError, match="weights tasks by their inner updates.*use weighting: uniform"):
        cls(task_spec=IMAGES, weighting="gradient_agreement")
    with pytest.raises(ValueError, match="has no inner loop: inner_steps"):
        cls(task_spec=IMAGES, inner_steps=3)
    with pytest.raises(ValueError, match="inner_lr does not apply"):
        cls(task_spec=IMAGES).set_inner_lr(0.1)
    with pytest.raises(ValueError, match="classifies: its head is computed from the support set's classes"):
        cls(task_spec=task_spec("sine", "regression", [1], ways=1))


def test_metabaseline_starts_from_the_classifier_stages_encoder(tmp_path):
    """Stage 1 is the transfer baseline's classifier over the global classes; stage 2 takes its
    body (the heads left out) and scores with the cosine head."""
    import pytorch_lightning as pl

    spec = {**IMAGES, "train_classes": 12}
    classifier = Transfer(task_spec=spec, backbone_kwargs={"filters": 4})
    with torch.no_grad():
        for p in classifier.net.parameters():
            p.add_(0.5)  # unlike a fresh network
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(classifier)
    path = tmp_path / "classifier.ckpt"
    trainer.save_checkpoint(path)
    model = MetaBaseline(task_spec=IMAGES, backbone_kwargs={"filters": 4}, init_from=str(path))
    theirs = {k: v for k, v in classifier.net.state_dict().items() if not k.startswith("head.")}
    assert set(model.net.state_dict()) == set(theirs)
    assert all(torch.equal(model.net.state_dict()[k], v) for k, v in theirs.items())
    assert model.distance == "cosine" and model.log_scale.requires_grad
    with pytest.raises(ValueError, match="has no encoder weights"):
        MetaBaseline(task_spec=IMAGES, backbone_kwargs={"filters": 4, "blocks": 5}, init_from=str(path))
    maml = MAML(task_spec=IMAGES, backbone_kwargs={"filters": 4})
    trainer.strategy.connect(maml)
    trainer.save_checkpoint(tmp_path / "maml.ckpt")
    with pytest.raises(ValueError, match="shape"):
        MetaBaseline(task_spec=IMAGES, backbone_kwargs={"filters": 8}, init_from=str(tmp_path / "maml.ckpt"))


def test_adapt_computes_prototypes_without_a_gradient_step():
    """A new task through train.py adapt's path: the logits are the prototypes' on the support
    set given, for a support set with more classes than the model was trained with."""
    model = model_of(ProtoNet).eval()
    b = batch(tasks=1, ways=WAYS + 2)
    assert model.resize_head(WAYS + 2) == WAYS + 2  # no head to resize: no notice
    got = model.adapt_and_predict(b.support_x[0], b.support_y[0], b.query_x[0])
    z = model.net(torch.cat([b.support_x[0], b.query_x[0]]))
    zs, zq = z[:b.support_x.shape[1]], z[b.support_x.shape[1]:]
    centres = torch.stack([zs[b.support_y[0] == k].mean(0) for k in range(WAYS + 2)])
    torch.testing.assert_close(got, -torch.cdist(zq, centres) ** 2, rtol=1e-9, atol=1e-9)


def test_a_meta_step_on_60_way_episodes_evaluates_5_way():
    """The paper's protocol: more classes per training episode than per test one."""
    spec = task_spec("toy-images", "classification", [1, 8, 8], ways=6)
    model = ProtoNet(task_spec=spec, backbone_kwargs={"filters": 4}, meta_batch_size=2)
    train, test = batch(tasks=2, ways=6).to("cpu"), batch(tasks=2, ways=3)
    train = TaskBatch(train.support_x.float(), train.support_y, train.query_x.float(), train.query_y)
    before = [p.detach().clone() for p in model.parameters()]
    model.outer_update(train)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    test = TaskBatch(test.support_x.float(), test.support_y, test.query_x.float(), test.query_y)
    out = run_tasks(model, test, EpisodeContext(False), 0, True)
    assert out["query_acc"].shape == (2,) and torch.isfinite(out["final_query_loss"]).all()
