"""Inner checkpointing (``inner_checkpointing: true``): the recomputed second-order meta-gradient
equals the stored-graph one in float64, for every gradient-based algorithm, under vmap,
task chunks, Gradient Agreement and autocast; the graph it keeps does not grow with the
inner steps beyond the parameter trajectory; a rule that cannot be recomputed is refused."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor
from torch.func import vmap

from lit_meta.algorithms import ANIL, MAML, MAMLpp, MetaLSTM, MetaSGD, Reptile
from lit_meta.inner import SGD, Adam, adapt
from lit_meta.tasks import TaskBatch
from tests.conftest import sine_config
from tests.test_algorithms import IMAGES, TOY, image_batch, small
from tests.test_inner import toy_batch
from tests.episodes import run

CASES = {
    "maml_1_step": (MAML, TOY, {"inner_steps": 1}),
    "maml_5_steps": (MAML, TOY, {"inner_steps": 5}),
    "maml_conv4_3_steps": (MAML, IMAGES, {"inner_steps": 3}),
    "metasgd": (MetaSGD, TOY, {"inner_steps": 3}),
    "mamlpp_msl_bnwb_bnrs": (MAMLpp, IMAGES, {"inner_steps": 3, "msl": True, "lslr": True, "bnwb": True,
                                              "bnrs": True}),
    "anil": (ANIL, TOY, {"inner_steps": 3}),
    "anil_conv4": (ANIL, IMAGES, {"inner_steps": 2}),
    "maml_chunks": (MAML, IMAGES, {"inner_steps": 3, "task_chunk_size": 2}),
    "maml_gradient_agreement": (MAML, IMAGES, {"inner_steps": 3, "weighting": "gradient_agreement"}),
    "mamlpp_chunks_gradient_agreement": (MAMLpp, IMAGES, {"inner_steps": 2, "task_chunk_size": 2,
                                                          "weighting": "gradient_agreement"}),
    "meta_lstm_second_order": (MetaLSTM, TOY, {"inner_steps": 3, "first_order": False}),
}


def double(batch: TaskBatch) -> TaskBatch:
    return TaskBatch(*(t.double() if t.is_floating_point() else t
                       for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)))


def outer_step(cls, spec, kw, checkpoint: bool):
    """One ``outer_update`` (the shared meta-step, chunks and weights as configured)."""
    torch.manual_seed(0)
    kw = {"inner_lr": 0.3, **kw}
    if cls is MetaLSTM:
        model = MetaLSTM(task_spec=spec, backbone_kwargs={"hidden": (4,)}, hidden_size=3, init_lr=0.3,
                         inner_checkpointing=checkpoint, **{k: v for k, v in kw.items() if k != "inner_lr"}).double()
    else:
        model = small(cls, spec=spec, inner_checkpointing=checkpoint, **kw).double()
    model.standalone_optimizer = lambda m=model: torch.optim.SGD(m.parameters(), lr=0.1)
    batch = double(toy_batch(tasks=5) if spec is TOY else image_batch(tasks=5))
    out = model.outer_update(batch)
    return model, out


@pytest.mark.parametrize("name", list(CASES))
def test_checkpointed_meta_gradient_equals_the_stored_graph_one(name):
    cls, spec, kw = CASES[name]
    stored, out = outer_step(cls, spec, kw, checkpoint=False)
    ckpt, out_c = outer_step(cls, spec, kw, checkpoint=True)
    grads = {n: p.grad for n, p in stored.named_parameters() if p.grad is not None}
    assert len(grads) >= 2 and sum(g.abs().sum() > 0 for g in grads.values()) >= 2
    for n, p in ckpt.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-10, atol=1e-12, msg=f"{name}: {n}")
        else:
            assert p.grad is None, n
    torch.testing.assert_close(out_c["query_loss"].detach(), out["query_loss"].detach(), rtol=1e-12, atol=0)
    for n, b in stored.named_buffers():  # MAML++'s per-step running statistics
        torch.testing.assert_close(dict(ckpt.named_buffers())[n], b, rtol=1e-12, atol=0)


def test_the_gradients_that_only_checkpointing_must_get_right_are_not_zero():
    """The cases above would pass vacuously if these were zero: learned rates, ANIL's body
    (which the head's inner steps depend on), MAML++'s per-step BN weights."""
    metasgd, _ = outer_step(MetaSGD, TOY, {"inner_steps": 3}, checkpoint=True)
    assert all(r.grad.abs().sum() > 0 for r in metasgd.inner_lrs.values())
    anil, _ = outer_step(ANIL, TOY, {"inner_steps": 3}, checkpoint=True)
    assert anil.net.body[0].weight.grad.abs().sum() > 0
    mamlpp, _ = outer_step(MAMLpp, IMAGES, CASES["mamlpp_msl_bnwb_bnrs"][2], checkpoint=True)
    norm = next(iter(mamlpp.per_step_norms().values()))
    assert (norm.weight.grad[:3].abs().sum(1) > 0).all()  # the slots of steps 0..2 (step 3 is the query's)


@dataclass
class Sq:
    """A support loss with its data as arguments: mean (tanh(x·w) − y)² per task."""

    def __call__(self, p: dict[str, Tensor], step: int, x: Tensor, y: Tensor) -> Tensor:
        return ((torch.tanh(x @ p["w"] + p["b"]) - y) ** 2).mean() + 0.1 * (p["w"] ** 2).sum()


def engine_grads(rule, steps: int, first_order, checkpoint: bool, adapt_names=None):
    """vmap(adapt) over 3 tasks; objective = query loss + the support losses (as the L2L
    optimizer uses them); gradients to the initial parameters."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    y = torch.randn(3, 6, 2, generator=g, dtype=torch.float64)

    def task(w, b, x, y):
        out = adapt(Sq(), {"w": w, "b": b}, steps, rule, first_order, adapt_names, trace=True,
                    checkpoint=checkpoint, data=(x, y))
        query = Sq()(out.params, steps, x.flip(0), y)
        return query + torch.stack(out.support_losses).sum() + sum(p["w"].sum() for p in out.trajectory)

    total = vmap(task, in_dims=(None, None, 0, 0))(w, b, x, y).sum()
    leaves = [w, b] + [t for t in rule.tensors().values() if t.requires_grad]
    return torch.autograd.grad(total, leaves)


@pytest.mark.parametrize("rule_name", ["sgd", "adam", "per_step_rates"])
@pytest.mark.parametrize("first_order", [False, "annealed"], ids=["second_order", "first_order_at_step_0"])
def test_engine_checkpointing_carries_rule_state_support_losses_and_trajectory(rule_name, first_order):
    """Rule state (Adam's moments) threads through the recomputed steps; the support losses
    and the trajectory keep their gradient; a first-order step mixes with recomputed ones."""
    rates = {"w": torch.tensor([0.2, 0.1, 0.3], dtype=torch.float64, requires_grad=True),
             "b": torch.tensor([0.1, 0.2, 0.2], dtype=torch.float64, requires_grad=True)}
    rule = {"sgd": SGD(0.2), "adam": Adam(0.05, betas=(0.9, 0.99)), "per_step_rates": SGD(rates, per_step=True)}[rule_name]
    order = (lambda step: step == 0) if first_order == "annealed" else False
    stored = engine_grads(rule, 4, order, checkpoint=False)
    ckpt = engine_grads(rule, 4, order, checkpoint=True)
    for s, c in zip(stored, ckpt):
        torch.testing.assert_close(c, s, rtol=1e-10, atol=1e-12)
    assert all(s.abs().sum() > 0 for s in stored)


def test_engine_checkpointing_differentiates_parameters_that_do_not_adapt():
    stored = engine_grads(SGD(0.3), 3, False, checkpoint=False, adapt_names=["b"])
    ckpt = engine_grads(SGD(0.3), 3, False, checkpoint=True, adapt_names=["b"])
    for s, c in zip(stored, ckpt):
        torch.testing.assert_close(c, s, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backward_in_autocast", [True, False], ids=["backward_in_autocast", "backward_after"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_recomputation_runs_under_the_forward_s_precision(precision, backward_in_autocast):
    """The recomputed step must be the forward's step. Under 16-mixed the inner loop runs in
    fp32 while Lightning's backward runs inside the step's fp16 autocast; under bf16-mixed
    the inner loop is bf16, and a backward after the autocast block would recompute in fp32.
    Measured on this machine (float32 model, error relative to the largest gradient): the
    restored precision gives 1.2e-4 under 16-mixed (the stored graph's own double backward
    runs its convolutions under the backward's fp16 autocast) and 0 otherwise; recomputing
    in the backward's precision gives 2.8e-2 (16-mixed) and 0.13 (bf16)."""
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16

    class Probe:
        pass

    Probe.precision = precision
    grads = {}
    for checkpoint in (False, True):
        torch.manual_seed(0)
        model = small(MAML, spec=IMAGES, inner_steps=3, inner_lr=0.3, inner_checkpointing=checkpoint)
        model._trainer = Probe()  # what MetaLearner.inner_precision reads
        params = list(model.net.parameters())
        with torch.autocast("cpu", dtype=dtype):
            loss = run(model, image_batch(tasks=3), 3, first_order=False, training=True)["query_loss"].float().mean()
            if backward_in_autocast:
                grads[checkpoint] = torch.autograd.grad(loss, params)
        if not backward_in_autocast:
            grads[checkpoint] = torch.autograd.grad(loss, params)
        model._trainer = None
    scale = max(g.abs().max() for g in grads[False])
    error = max((c - s).abs().max() for s, c in zip(grads[False], grads[True])) / scale
    assert error < (2e-3 if precision == "16-mixed" else 1e-2)


def graph_bytes(loss: Tensor) -> int:
    """Bytes of the distinct storages the autograd graph behind ``loss`` holds (every node's
    saved tensors, a custom Function's included)."""
    seen, stack, storages = set(), [loss.grad_fn], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        saved = list(getattr(node, "saved_tensors", ()) or ())
        for attr in dir(node):
            if attr.startswith("_saved_"):
                value = getattr(node, attr)
                saved += value if isinstance(value, (tuple, list)) else [value]
        for t in saved:
            if isinstance(t, Tensor):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack += [f for f, _ in node.next_functions]
    return sum(storages.values())


def test_checkpointed_graph_grows_by_the_parameter_trajectory_only():
    """The graph kept between forward and backward: with checkpointing, each extra inner step
    adds one copy of the per-task parameters (θ_k, saved by the recomputed step); storing
    the graph adds each step's activations for the second differentiation. A fallback to the
    stored graph fails the first assertion."""
    batch = image_batch(tasks=4)

    def held(steps: int, checkpoint: bool) -> int:
        torch.manual_seed(0)
        model = small(MAML, spec=IMAGES, inner_steps=steps, inner_checkpointing=checkpoint)
        out = run(model, batch, steps, first_order=False, training=True)
        return graph_bytes(out["query_loss"].sum())

    trajectory_step = batch.num_tasks * sum(p.numel() * p.element_size() for p in small(MAML, spec=IMAGES).parameters())
    growth = held(9, True) - held(1, True)
    assert growth <= 8 * trajectory_step * 1.05
    assert held(9, False) - held(1, False) > 4 * growth  # the case tells the two apart


@dataclass
class Langevin(SGD):
    """SGD plus Gaussian noise (stochastic gradient Langevin dynamics): random, so a
    recomputation would differentiate a different step."""

    not_recomputable: str = "it draws random noise (Langevin dynamics)"

    def __call__(self, step, params, grads, loss, state):
        new, state = super().__call__(step, params, grads, loss, state)
        return {n: p + 1e-3 * torch.randn_like(p) for n, p in new.items()}, state


class LangevinMAML(MAML):
    def update_rule(self, training: bool):
        return Langevin(self.inner_lr)


def test_a_rule_that_cannot_be_recomputed_fails_before_training_with_one_line(run_cli, capsys, tmp_path):
    with pytest.raises(SystemExit):
        run_cli("fit", *sine_config(**{"model.class_path": "tests.test_inner_checkpointing.LangevinMAML",
                                       "model.init_args.inner_checkpointing": "true"}))
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: inner_checkpointing: Langevin cannot be recomputed exactly: "
                              "it draws random noise (Langevin dynamics)")
    assert not list(tmp_path.rglob("*.ckpt"))  # stopped before the first step


def test_a_callable_rate_and_a_rule_without_its_tensors_are_refused():
    class Opaque:
        def init_state(self, params):
            return None

        def __call__(self, step, params, grads, loss, state):
            return params, state

    for rule, says in ((SGD(lambda step, name: 0.1), "Python callable"), (Opaque(), "tensors()")):
        with pytest.raises(ValueError, match=says):
            adapt(Sq(), {"w": torch.ones(4, 2), "b": torch.ones(2)}, 1, rule, checkpoint=True,
                  data=(torch.ones(3, 4), torch.ones(3, 2)))


def test_first_order_and_no_backward_algorithms_accept_the_option_and_are_unchanged():
    """FOMAML detaches its inner gradients and Reptile does no backward through its inner
    loop: nothing second order to recompute, the same step bit for bit."""
    for cls, kw in ((MAML, {"inner_steps": 3, "first_order": True}),
                    (Reptile, {"inner_steps": 3, "inner_optimizer": "adam", "inner_lr": 0.05})):
        stored, _ = outer_step(cls, TOY, kw, checkpoint=False)
        ckpt, _ = outer_step(cls, TOY, kw, checkpoint=True)
        for (n, p), q in zip(stored.named_parameters(), ckpt.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=f"{cls.__name__}: {n}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_checkpointed_meta_gradient_on_cuda_equals_the_stored_graph_one():
    """float64 (no TF32) conv4 MAML++ with per-step BN on the GPU: recomputation there
    (cuDNN kernels) matches the stored graph as on the CPU."""
    grads = {}
    for checkpoint in (False, True):
        torch.manual_seed(0)
        model = small(MAMLpp, spec=IMAGES, inner_steps=3, inner_lr=0.3, inner_checkpointing=checkpoint).double().cuda()
        batch = double(image_batch(tasks=4)).to("cuda")
        out = run(model, batch, 3, first_order=False, training=True)
        grads[checkpoint] = torch.autograd.grad(out["query_loss"].mean(), list(model.parameters()), allow_unused=True)
    for s, c in zip(grads[False], grads[True]):
        if s is not None:
            torch.testing.assert_close(c, s, rtol=1e-9, atol=1e-11)
