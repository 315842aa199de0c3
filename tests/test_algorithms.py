"""Each algorithm's rule against a hand computation, through the one engine and meta-step."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from lit_meta.algorithms import ANIL, BOIL, MAML, MAMLpp, MetaSGD, Reptile, Transfer
from lit_meta.algorithms.mamlpp import msl_importance
from lit_meta.meta_step import gradient_agreement_weights
from lit_meta.tasks import TaskBatch, task_spec
from tests.test_inner import toy_batch
from lit_meta.episode import EpisodeContext, run_tasks
from tests.episodes import adapt_one, predict, run

TOY = task_spec("toy", "regression", [2], ways=1)
IMAGES = task_spec("toy-images", "classification", [1, 12, 12], ways=3)


def image_batch(tasks: int = 2, shots: int = 2) -> TaskBatch:
    g = torch.Generator().manual_seed(3)
    y = torch.arange(3).repeat_interleave(shots).repeat(tasks, 1)
    return TaskBatch(torch.randn(tasks, 3 * shots, 1, 12, 12, generator=g), y,
                     torch.randn(tasks, 3 * shots, 1, 12, 12, generator=g), y.clone())


def small(cls, spec=TOY, **kw):
    kw.setdefault("backbone_kwargs", {"hidden": (4,)} if spec is TOY else {"filters": 4})
    return cls(task_spec=spec, **kw).double() if spec is TOY else cls(task_spec=spec, **kw)


def _sgd_adapt(net, params, x, y, lr, steps):
    for _ in range(steps):
        loss = F.mse_loss(functional_call(net, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()))
        params = {n: (p - lr * g).detach().requires_grad_() for (n, p), g in zip(params.items(), grads)}
    return params


@pytest.mark.parametrize("weighting", ["uniform", "gradient_agreement"])
def test_reptile_outer_update_equals_hand_computation(weighting):
    model = small(Reptile, inner_optimizer="sgd", inner_lr=0.1, inner_steps=3, meta_lr=0.5, weighting=weighting)
    batch = toy_batch(tasks=3)
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.net.named_parameters()}
    adapted = [_sgd_adapt(model.net, dict(theta), batch.support_x[i], batch.support_y[i], 0.1, 3) for i in range(3)]
    diffs = torch.stack([torch.cat([(a[n] - theta[n]).detach().flatten() for n in theta]) for a in adapted])
    # g_i = θ − θ'_i
    w = torch.full((3,), 1 / 3, dtype=torch.float64) if weighting == "uniform" else gradient_agreement_weights(-diffs)
    expected = torch.cat([p.detach().flatten() for p in theta.values()]) + 0.5 * (w[:, None] * diffs).sum(0)
    model.outer_update(batch)  # the meta-optimizer is SGD at meta_lr = ε = 0.5
    got = torch.cat([p.detach().flatten() for p in model.net.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_reptile_rejects_second_order():
    with pytest.raises(ValueError, match="first order by construction"):
        Reptile(task_spec=TOY, first_order=False)


def test_metasgd_learns_its_inner_rates_and_with_them_frozen_is_maml():
    batch = toy_batch(tasks=3)
    meta = small(MetaSGD, inner_lr=0.1, inner_steps=2)
    out = run(meta, batch, 2, first_order=False, training=True)
    optimizer = torch.optim.SGD(meta.parameters(), lr=0.1)
    before = {n: a.detach().clone() for n, a in meta.inner_lrs.items()}
    meta.meta_step(meta, out["updates"], query_losses=out["query_loss"], optimizer=optimizer)
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in meta.inner_lrs.values())
    assert any((meta.inner_lrs[n] - before[n]).abs().max() > 0 for n in before)

    frozen = small(MetaSGD, inner_lr=0.1, inner_steps=2, learn_inner_lr=False)
    maml = small(MAML, inner_lr=0.1, inner_steps=2)
    maml.net.load_state_dict(frozen.net.state_dict())
    a = run(frozen, batch, 2, first_order=False, training=True)["query_loss"].mean()
    b = run(maml, batch, 2, first_order=False, training=True)["query_loss"].mean()
    ga = torch.autograd.grad(a, list(frozen.net.parameters()))
    gb = torch.autograd.grad(b, list(maml.net.parameters()))
    torch.testing.assert_close(a, b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)
    assert all(not p.requires_grad for p in frozen.inner_lrs.values())


def test_anil_inner_loop_leaves_the_body_unchanged():
    model = small(ANIL, spec=IMAGES, inner_lr=0.5, inner_steps=3)
    out = run(model, image_batch(), 3, first_order=False, training=True)
    assert set(out["updates"]) == {"head.weight", "head.bias"}
    params = {n: p.detach() for n, p in model.net.named_parameters()}
    adapted = adapt_one(model, params, image_batch().support_x[0], image_batch().support_y[0], 3, True, True)
    for name, p in params.items():
        changed = not torch.equal(adapted.params[name], p)
        assert changed == name.startswith("head."), name
    # the body still learns in the outer loop (second order through the head's steps)
    grads = torch.autograd.grad(out["query_loss"].mean(), list(model.net.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)


def test_msl_importance_sums_to_one_and_anneals_to_the_final_step():
    first, mid, late = (torch.tensor(msl_importance(5, e, 10), dtype=torch.float32) for e in (0, 5, 10))
    for w in (first, mid, late):
        torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    torch.testing.assert_close(first, torch.full((5,), 0.2))
    assert mid[-1] > first[-1] and (mid[:-1] < first[:-1]).all()
    assert late[-1] == pytest.approx(1 - 4 * 0.03 / 5) and late[:-1].eq(late[0]).all()


def test_mamlpp_lslr_has_a_rate_per_layer_and_step():
    """LSLR: one rate per parameter tensor and inner step, each moved by one SGD meta-step by
    −meta_lr × ∂(meta-objective)/∂(rate), the derivative taken by central finite differences in
    float64 (the meta-objective: the tasks' mean multi-step query loss, second order)."""
    meta_lr, h = 0.5, 1e-6
    model = small(MAMLpp, inner_steps=4, inner_lr=0.1, bnwb=False, bnrs=False, meta_optimizer="sgd", meta_lr=meta_lr)
    batch = toy_batch(tasks=3)
    tensors = len(list(model.net.parameters()))
    assert sum(p.numel() for p in model.inner_lrs.values()) == 4 * tensors
    assert all(r.shape == (4,) and r.dtype == torch.float64 for r in model.inner_lrs.values())

    def objective() -> float:
        return run(model, batch, 4, first_order=False, training=True)["query_loss"].mean().item()

    expected = {}
    for key, rates in model.inner_lrs.items():
        start = rates.detach().clone()
        derivative = torch.empty_like(start)
        for k in range(4):
            with torch.no_grad():
                rates[k] = start[k] + h
            up = objective()
            with torch.no_grad():
                rates[k] = start[k] - h
            down = objective()
            with torch.no_grad():
                rates.copy_(start)
            derivative[k] = (up - down) / (2 * h)
        expected[key] = start - meta_lr * derivative
    model.outer_update(batch)  # the module's own meta-step: SGD at meta_lr
    for key, rates in model.inner_lrs.items():
        torch.testing.assert_close(rates.detach(), expected[key], rtol=0, atol=1e-8, msg=key)
    moved = torch.stack([expected[k] - 0.1 for k in model.inner_lrs])
    assert moved.abs().min() > 1e-5 and moved.std(1).min() > 1e-5  # every rate moved, each step its own way


def test_mamlpp_bnrs_keeps_one_set_of_statistics_per_step_and_bnwb_per_step_weights():
    """BNRS: after one training meta-batch, slot k of every layer's running mean and variance
    has taken one momentum step (0.1) from (0, 1) towards the tasks' mean of the support batch's
    statistics at inner step k (k = 0..3, the last the support forward after the third step, for
    the query's slot), computed here by hand: each task adapted by SGD at the (initial, equal)
    LSLR rates with the per-step BN weights outside the inner loop, each BN layer's input
    captured, its per-channel mean and *biased* variance (what ``PerStepBatchNorm``
    normalises with)."""
    model = small(MAMLpp, spec=IMAGES, inner_steps=3, bnwb=True, bnrs=True)
    norms = model.per_step_norms()
    assert len(norms) == 4
    norm = next(iter(norms.values()))
    assert norm.running_mean.shape == (4, 4) and norm.weight.shape == (4, 4) and norm.momentum == 0.1
    assert all(torch.equal(r, torch.full((3,), model.inner_lr)) for r in model.inner_lrs.values())
    batch = image_batch()

    inputs: dict[str, Tensor] = {}
    hooks = [m.register_forward_hook(lambda module, args, output, name=name: inputs.__setitem__(name, args[0].detach()))
             for name, m in norms.items()]
    stats = {name: [] for name in norms}  # per layer: [tasks][slot] (mean, biased var, unbiased var)
    try:
        for i in range(batch.num_tasks):
            sx, sy = batch.support_x[i], batch.support_y[i]
            params = {n: p.detach().clone() for n, p in model.net.named_parameters()}
            adapted = [n for n in params if not (n.startswith("body.") and params[n].dim() == 2)]  # not BNWB rows
            per_slot = {name: [] for name in norms}
            for k in range(4):
                live = {n: p.clone().requires_grad_(n in adapted) for n, p in params.items()}
                loss = F.cross_entropy(model.forward_fn(live, sx, k), sy)
                for name, x in inputs.items():
                    per_slot[name].append((x.mean((0, 2, 3)), x.var((0, 2, 3), correction=0),
                                           x.var((0, 2, 3), correction=1)))
                if k < 3:
                    grads = torch.autograd.grad(loss, [live[n] for n in adapted])
                    params.update({n: (params[n] - model.inner_lr * g).detach() for n, g in zip(adapted, grads)})
            for name in norms:
                stats[name].append(per_slot[name])
    finally:
        for hook in hooks:
            hook.remove()

    run(model, batch, 3, first_order=False, training=True)
    for name, layer in norms.items():
        for slot in range(4):
            mean, biased, unbiased = (torch.stack([task[slot][j] for task in stats[name]]).mean(0) for j in range(3))
            where = f"{name} slot {slot}"
            torch.testing.assert_close(layer.running_mean[slot], 0.1 * mean, rtol=1e-5, atol=1e-6, msg=where)
            torch.testing.assert_close(layer.running_var[slot], 0.9 + 0.1 * biased, rtol=1e-5, atol=1e-6, msg=where)
            assert not torch.allclose(layer.running_var[slot], 0.9 + 0.1 * unbiased, rtol=1e-5, atol=1e-6), where
    assert not torch.allclose(norm.running_var[0], norm.running_var[3])


def test_mamlpp_derivative_order_annealing_switches_from_first_to_second_order():
    model = small(MAMLpp, inner_steps=2, first_order_epochs=1, msl=False, lslr=False, bnwb=False, bnrs=False)
    maml = small(MAML, inner_steps=2, inner_lr=model.inner_lr)
    maml.net.load_state_dict(model.net.state_dict())
    batch = toy_batch()

    def grads(m, first_order, ctx):
        loss = run_tasks(m, batch, ctx, 2, first_order)["query_loss"].mean()
        return torch.autograd.grad(loss, list(m.net.parameters()))

    # the task stream's epoch, as the batch's origin gives it (a DataModule's step // steps_per_epoch)
    first_epoch, second_epoch = EpisodeContext(True, epoch=0), EpisodeContext(True, epoch=1)
    assert model.first_order_at(first_epoch) is True
    for a, b in zip(grads(model, model.first_order_at(first_epoch), first_epoch), grads(maml, True, first_epoch)):
        torch.testing.assert_close(a, b)
    assert model.first_order_at(second_epoch) is False
    for a, b in zip(grads(model, model.first_order_at(second_epoch), second_epoch), grads(maml, False, second_epoch)):
        torch.testing.assert_close(a, b)


def test_transfer_baseline_has_no_inner_loop_in_training():
    model = small(Transfer, inner_steps=5, meta_optimizer="sgd", meta_lr=0.1)
    batch = toy_batch()
    pooled_x = torch.cat([batch.support_x, batch.query_x], 1)
    pooled_y = torch.cat([batch.support_y, batch.query_y], 1)
    loss = F.mse_loss(model.net(pooled_x.reshape(-1, 2)), pooled_y.reshape(-1, 1))
    expected = [p - 0.1 * g for p, g in zip(model.net.parameters(), torch.autograd.grad(loss, list(model.net.parameters())))]
    model.outer_update(batch)
    for p, e in zip(model.net.parameters(), expected):
        torch.testing.assert_close(p.detach(), e.detach())


def test_transfer_rejects_gradient_agreement():
    with pytest.raises(ValueError, match="weighting: uniform"):
        Transfer(task_spec=TOY, weighting="gradient_agreement")


def test_non_transductive_evaluation_predicts_each_query_beside_the_support_set():
    model = small(MAML, spec=IMAGES, transductive=False)
    batch = image_batch(tasks=1)
    params = {n: p.detach() for n, p in model.net.named_parameters()}
    preds = predict(model, params, batch.support_x[0], batch.query_x[0], 0, training=False)
    for j in range(batch.query_x.shape[1]):
        alone = model.net(torch.cat([batch.support_x[0], batch.query_x[0, j : j + 1]]))[-1]
        torch.testing.assert_close(preds[j], alone, rtol=1e-4, atol=1e-5)
    transductive = model.net(batch.query_x[0])
    assert not torch.allclose(preds, transductive, atol=1e-3)


@pytest.mark.parametrize("weighting", ["uniform", "gradient_agreement"])
@pytest.mark.parametrize("cls,kw", [(MAML, {}), (MetaSGD, {}), (MAMLpp, {"bnrs": True, "bnwb": True, "adapt_bn": True})],
                         ids=["maml", "metasgd", "mamlpp"])
def test_task_chunks_give_the_whole_batch_meta_step(cls, kw, weighting):
    """Back-propagating 5 tasks in chunks of 2 writes the same second-order meta-gradient
    (and, for MAML++, the same running statistics) as one vmap over all 5, and the same step."""
    batch = image_batch(tasks=5)
    models = {}
    for chunk in (None, 2):
        torch.manual_seed(0)
        model = small(cls, spec=IMAGES, inner_steps=2, inner_lr=0.3, weighting=weighting, task_chunk_size=chunk,
                      **kw).double()
        model.standalone_optimizer = lambda m=model: torch.optim.SGD(m.parameters(), lr=0.1)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = model.outer_update(TaskBatch(*(t.double() if t.is_floating_point() else t for t in
                                             (batch.support_x, batch.support_y, batch.query_x, batch.query_y))))
        models[chunk] = (model, before, out)
    (whole, before, out), (chunked, _, out_c) = models[None], models[2]
    for name, p in whole.named_parameters():
        torch.testing.assert_close(dict(chunked.named_parameters())[name], p, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dict(chunked.named_parameters())[name].grad, p.grad, rtol=1e-10, atol=1e-12)
    # (a conv bias that feeds batch norm, and its learned rate, get exactly zero meta-gradient)
    assert sum(p.grad.abs().sum() > 0 for p in whole.parameters()) >= len(list(whole.parameters())) // 2
    assert any(not torch.equal(p, before[n]) for n, p in whole.named_parameters())
    torch.testing.assert_close(out_c["query_loss"], out["query_loss"].detach())
    for name, buffer in whole.named_buffers():
        torch.testing.assert_close(dict(chunked.named_buffers())[name], buffer)


def test_task_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="task_chunk_size must be >= 1"):
        small(MAML, task_chunk_size=0)


@pytest.mark.parametrize("transductive,expected_bn", [(False, "per-step running statistics"),
                                                      ("support", "support statistics"),
                                                      (True, "transductive")])
def test_mamlpp_bnrs_evaluation_normalises_as_its_mode_says_and_results_json_records_it(transductive, expected_bn):
    """With BNRS, ``transductive: false`` normalises every forward of an evaluation episode with
    the per-step running statistics (the inner loop's too); ``support`` normalises the query with
    the support set's statistics (it used the running statistics while results.json said
    "support statistics": the bug); ``true`` with the query batch's own. (How each Norm
    normalises is checked by hand in tests/test_layers.py and test_fidelity.py.)"""
    from lit_meta.models.layers import Norm

    torch.manual_seed(0)
    model = small(MAMLpp, spec=IMAGES, inner_steps=1, transductive=transductive, bnwb=False)
    for norm in model.per_step_norms().values():
        with torch.no_grad():  # running statistics unlike any batch's
            norm.running_mean.fill_(0.3)
            norm.running_var.fill_(2.0)
    batch = image_batch(tasks=1)
    sx, qx = batch.support_x[0], batch.query_x[0]
    params = {n: p.detach() for n, p in model.net.named_parameters()}
    step = model.query_step(1)
    got = predict(model, params, sx, qx, 1, training=False)
    by_mode = {"running": model.forward_fn(params, qx, step, Norm(running=True)),
               "support": model.forward_fn(params, torch.cat([sx, qx]), step, Norm(support_rows=sx.shape[0]))[
                   sx.shape[0]:],
               "transductive": model.forward_fn(params, qx, step)}
    mode = {False: "running", "support": "support", True: "transductive"}[transductive]
    torch.testing.assert_close(got, by_mode[mode])
    assert all(not torch.allclose(got, other, atol=1e-4) for m, other in by_mode.items() if m != mode)
    ctx = model.context(False)
    assert ctx.bn == mode and model.inner_norm(ctx) == (Norm(running=True) if mode == "running" else Norm())
    assert model.results_extra()["bn"] == expected_bn


def test_boil_adapts_the_body_and_leaves_the_head_as_meta_learned():
    """BOIL (the mirror of ANIL): after the inner loop the head is θ's and the body moved; BOIL
    is MAML with adapt: body, the same meta-gradient."""
    from lit_meta.algorithms import ANIL, BOIL

    torch.manual_seed(0)
    boil = small(BOIL, spec=IMAGES, inner_steps=2, inner_lr=0.3)
    maml = small(MAML, spec=IMAGES, inner_steps=2, inner_lr=0.3, adapt="body")
    maml.load_state_dict(boil.state_dict())
    assert set(boil.adapt_names()) == {n for n, _ in boil.net.named_parameters() if not n.startswith("head.")}
    anil = small(ANIL, spec=IMAGES)
    assert set(anil.adapt_names()) == {"head.weight", "head.bias"}
    out = run(boil, image_batch(), 2, first_order=False, training=True)
    assert set(out["updates"]) == set(boil.adapt_names())
    assert all(out["updates"][n].abs().sum() > 0 for n in boil.adapt_names())
    a = torch.autograd.grad(out["query_loss"].mean(), list(boil.net.parameters()))
    b = torch.autograd.grad(run(maml, image_batch(), 2, first_order=False, training=True)["query_loss"].mean(),
                            list(maml.net.parameters()))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="BOIL adapts the body only"):
        small(BOIL, spec=IMAGES, adapt="head")
    with pytest.raises(ValueError, match=r"ANIL adapts the head only \(adapt: head\), got adapt: all; MAML with adapt: all"):
        small(ANIL, spec=IMAGES, adapt="all")
    with pytest.raises(ValueError, match="adapt: body needs a backbone with a `head`"):
        small(MAML, spec=IMAGES, adapt="body", backbone_kwargs={"filters": 4, "with_head": False})


@pytest.mark.parametrize("make,message", [
    (lambda: small(ANIL, spec=IMAGES, backbone_kwargs={"filters": 4, "with_head": False}),
     "adapt: head needs a backbone with a `head` module; Conv4 has none"),
    (lambda: small(BOIL, spec=IMAGES, backbone_kwargs={"filters": 4, "with_head": False}),
     "adapt: body needs a backbone with a `head` module; Conv4 has none"),
    (lambda: small(MAMLpp, bnwb=True, bnrs=False),  # TOY: the MLP, which has no BatchNorm
     "bnwb/bnrs need a backbone with BatchNorm (conv4); set them false for this data"),
    (lambda: small(MAMLpp, bnwb=False, bnrs=True),
     "bnwb/bnrs need a backbone with BatchNorm (conv4); set them false for this data"),
], ids=["anil-headless-conv4", "boil-headless-conv4", "mamlpp-bnwb-mlp", "mamlpp-bnrs-mlp"])
def test_invalid_combinations_fail_with_one_line_naming_the_fix(make, message):
    """docs/algorithms.md: "ANIL or BOIL on a backbone without a `head`, MAML++'s `bnwb` on an
    MLP" fail at config time with one line."""
    with pytest.raises(ValueError) as caught:
        make()
    assert str(caught.value) == message
    assert len(str(caught.value).splitlines()) == 1
