"""The shared meta-step: task weights against hand computations, and what lands in .grad."""
from __future__ import annotations

import pytest
import torch

from lit_meta.meta_step import MetaStep, gradient_agreement_weights, task_weights
from tests.test_inner import tiny_maml, toy_batch
from tests.episodes import run


def test_gradient_agreement_matches_hand_computation():
    g = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    # Gram rows: [1, 1, -1], [1, 2, -1], [-1, -1, 1]; row sums 1, 2, -1; Σ|G| = 10.
    w = gradient_agreement_weights(g)
    torch.testing.assert_close(w, torch.tensor([0.1, 0.2, -0.1]))
    # The task whose update opposes the others gets the lowest, negative, weight.
    assert w.argmin() == 2 and w[2] < 0


def test_gradient_agreement_of_agreeing_tasks_is_uniform():
    g = torch.tensor([[2.0, 1.0]] * 4)
    torch.testing.assert_close(gradient_agreement_weights(g), torch.full((4,), 0.25))


def test_uniform_weights_are_the_mean():
    torch.testing.assert_close(task_weights("uniform", None, 4), torch.full((4,), 0.25))


def test_unknown_weighting_is_rejected():
    with pytest.raises(ValueError, match="weighting must be one of"):
        MetaStep("agreement")


def _grads_after(model, step: MetaStep, out) -> dict[str, torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step(model, out["updates"], query_losses=out["query_loss"], optimizer=opt)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_uniform_meta_step_reproduces_plain_mean_gradient():
    model, batch = tiny_maml(inner_steps=1), toy_batch(tasks=4)
    out = run(model, batch, 1, first_order=False, training=True)
    ours = _grads_after(model, MetaStep("uniform"), out)
    out = run(model, batch, 1, first_order=False, training=True)
    ref = torch.autograd.grad(out["query_loss"].mean(), list(model.parameters()))
    for (name, g), r in zip(ours.items(), ref):
        torch.testing.assert_close(g, r)


def test_gradient_agreement_meta_step_weights_the_task_gradients():
    model, batch = tiny_maml(inner_steps=1), toy_batch(tasks=4)
    out = run(model, batch, 1, first_order=False, training=True)
    ours = _grads_after(model, MetaStep("gradient_agreement"), out)
    out = run(model, batch, 1, first_order=False, training=True)
    updates = torch.cat([u.reshape(4, -1) for u in out["updates"].values()], 1)
    gram = updates @ updates.T
    w = gram.sum(1) / gram.abs().sum()
    assert w.std() > 0  # the weights really differ from uniform here
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(4):
        for acc, g in zip(expected, torch.autograd.grad(out["query_loss"][i], list(model.parameters()), retain_graph=True)):
            acc += w[i] * g
    for (name, g), e in zip(ours.items(), expected):
        torch.testing.assert_close(g, e)


def _hand_gradient_agreement(net, batch, adapted_names, steps, lr, loss_fn, first_order):
    """The meta-gradient of Gradient Agreement written out per task: θ'_i by ``steps`` SGD steps
    on the support loss over ``adapted_names``; g_i = θ − θ'_i (the adapted coordinates);
    w_i = Σ_j g_i·g_j / Σ_k Σ_j |g_k·g_j|; ∇L_i the query loss's gradient at θ'_i (first order:
    with respect to θ'_i; else through the inner steps to θ). Returns ({name: Σ_i w_i ∇L_i}, w, the
    uniform mean of the ∇L_i)."""
    from torch.func import functional_call

    theta = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    updates, grads = [], []
    for i in range(batch.num_tasks):
        fast = dict(theta)
        for _ in range(steps):
            loss = loss_fn(functional_call(net, fast, (batch.support_x[i],)), batch.support_y[i])
            step = torch.autograd.grad(loss, [fast[n] for n in adapted_names], create_graph=not first_order)
            fast = {**fast, **{n: fast[n] - lr * g for n, g in zip(adapted_names, step)}}
            if first_order:
                fast = {n: p.detach().requires_grad_() for n, p in fast.items()}
        updates.append(torch.cat([(theta[n] - fast[n]).detach().flatten() for n in adapted_names]))
        query = loss_fn(functional_call(net, fast, (batch.query_x[i],)), batch.query_y[i])
        at = fast if first_order else theta
        grads.append(dict(zip(theta, torch.autograd.grad(query, [at[n] for n in theta]))))
    g = torch.stack(updates)
    dots = g @ g.T
    w = torch.stack([sum(dots[i, j] for j in range(len(g))) for i in range(len(g))]) / dots.abs().sum()
    weighted = {n: sum(w[i] * grads[i][n] for i in range(len(g))) for n in theta}
    uniform = {n: sum(grads[i][n] for i in range(len(g))) / len(g) for n in theta}
    return weighted, w, uniform


@pytest.mark.parametrize("algorithm", ["fomaml", "anil"])
def test_gradient_agreement_works_for_fomaml_and_anil(algorithm):
    """docs/algorithms.md: Gradient Agreement "works for ... FOMAML ... ANIL" with no
    algorithm-specific code. The meta-gradient ``outer_update`` writes is Σ_i w_i ∇L_i, each
    piece computed by hand from the tasks' own inner updates (FOMAML: every parameter, the
    query gradient at θ'_i; ANIL: the head's updates, second order through its steps)."""
    import torch.nn.functional as F

    from lit_meta.algorithms import ANIL, MAML
    from lit_meta.tasks import TaskBatch, task_spec

    torch.manual_seed(0)
    if algorithm == "fomaml":
        model = tiny_maml(inner_steps=2, first_order=True, lr=0.3)
        model.meta_step.weighting = "gradient_agreement"
        assert isinstance(model, MAML) and model.first_order
        batch, loss_fn, names = toy_batch(tasks=4), F.mse_loss, [n for n, _ in model.net.named_parameters()]
    else:
        images = task_spec("toy-images", "classification", [1, 12, 12], ways=3)
        model = ANIL(task_spec=images, backbone_kwargs={"filters": 4}, inner_lr=0.5, inner_steps=2,
                     weighting="gradient_agreement").double()
        g = torch.Generator().manual_seed(3)
        y = torch.arange(3).repeat_interleave(2).repeat(4, 1)
        batch = TaskBatch(torch.randn(4, 6, 1, 12, 12, generator=g, dtype=torch.float64), y,
                          torch.randn(4, 6, 1, 12, 12, generator=g, dtype=torch.float64), y.clone())
        loss_fn, names = F.cross_entropy, ["head.weight", "head.bias"]
    assert model.meta_step.weighting == "gradient_agreement" and model.adapt_names() == names
    expected, w, uniform = _hand_gradient_agreement(model.net, batch, names, 2, model.inner_lr, loss_fn,
                                                    first_order=algorithm == "fomaml")
    assert w.std() > 0.01  # the weights really differ from uniform
    model.standalone_optimizer = lambda: torch.optim.SGD(model.parameters(), lr=0.0)
    model.outer_update(batch)
    for name, p in model.net.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    assert any(not torch.allclose(expected[n], uniform[n], rtol=1e-3) for n in expected)


def test_task_gradient_contributions_are_weighted_sums_and_step_the_optimizer():
    model = tiny_maml()
    params = dict(model.named_parameters())
    contributions = {n: torch.randn(3, *p.shape, dtype=p.dtype) for n, p in params.items()}
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    w = MetaStep("gradient_agreement")(model, contributions, task_grads=contributions, optimizer=opt)
    flat = torch.cat([c.reshape(3, -1) for c in contributions.values()], 1)
    torch.testing.assert_close(w, gradient_agreement_weights(flat))
    for n, p in params.items():
        expected_grad = (w.view(3, *[1] * p.dim()) * contributions[n]).sum(0)
        torch.testing.assert_close(p.detach(), before[n] - 0.5 * expected_grad)


@pytest.mark.parametrize("progress_bar", [False, True], ids=["no_bar", "bar"])
def test_task_weight_statistics_are_logged_on_the_logging_steps_only(tmp_path, progress_bar):
    """``meta/weight_min``, ``_max``, ``_spread`` (and the skipped-step counters) are computed and
    logged by ``MetaStep`` on the steps Lightning writes (every ``log_every_n_steps``-th), not
    every step: with ``log_every_n_steps=2`` over 4 steps, the 2nd and 4th meta-steps alone (rows
    ``step`` 1 and 3 of metrics.csv), the progress bar on or off."""
    import csv

    import pytorch_lightning as pl

    from lit_meta.algorithms import MAML
    from lit_meta.data.sine import SineDataModule

    keys = {"meta/weight_min", "meta/weight_max", "meta/weight_spread", "meta/skipped_steps",
            "train/nonfinite_skipped"}
    dm = SineDataModule(meta_batch_size=4)
    model = MAML(task_spec=dm.task_spec, meta_batch_size=4, weighting="gradient_agreement")
    calls: list[int] = []
    log_dict = model.log_dict

    def recording(values, *args, **kwargs):
        if keys <= set(values):
            calls.append(model.trainer.global_step)
        return log_dict(values, *args, **kwargs)

    model.log_dict = recording
    trainer = pl.Trainer(max_steps=4, limit_val_batches=0, logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=2,
                         enable_checkpointing=False, enable_progress_bar=progress_bar, inference_mode=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert calls == [2, 4], calls  # global_step after the optimizer stepped: the 2nd and 4th meta-steps
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    logged = [r for r in rows if r.get("meta/weight_min")]
    assert [int(r["step"]) for r in logged] == [1, 3]
    for r in logged:
        assert all(r[k] != "" for k in keys)
        low, high, spread = (float(r[f"meta/weight_{k}"]) for k in ("min", "max", "spread"))
        assert low < high and spread == pytest.approx(high - low)
