"""The reference-code options of issue 17: each does what the authors' code does, checked by
outcome (a hand computation, an invariance, or the quantity the reference computes)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from lit_meta.algorithms import MAML, MAMLpp, MetaLSTM, MetaSGD, Reptile, Transfer
from lit_meta.checkpoint import signature_defaults
from lit_meta.models import Conv4
from lit_meta.models.layers import PerStepBatchNorm
from lit_meta.tasks import LabelledTaskBatch, TaskBatch, task_spec
from lit_meta.update_rules import SGD, Adam, CarryForward
from tests.image_data_fixtures import omniglot_arrays, write_omniglot_npz
from lit_meta.episode import EpisodeContext, inner_schedule
from tests.episodes import adapt_one, predict, run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

IMAGES = task_spec("toy-images", "classification", [1, 12, 12], ways=3)


def image_batch(tasks: int = 2, shots: int = 2, queries: int = 2, seed: int = 3) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat_interleave(shots).repeat(tasks, 1)
    q = torch.arange(3).repeat_interleave(queries).repeat(tasks, 1)
    return TaskBatch(torch.randn(tasks, 3 * shots, 1, 12, 12, generator=g), y,
                     torch.randn(tasks, 3 * queries, 1, 12, 12, generator=g), q)


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.net.named_parameters()}


# ---------------------------------------------------------------------------- MAML++ per-step BN weights
def test_mamlpp_inner_updates_of_per_step_bn_weights_reach_the_later_steps():
    """The bug: step k's update changed row k of a per-step BN weight while every later
    forward (the next step, the query) read another row, so the update and its learned rate
    did nothing. Fixed, adapting the BN weights changes the adapted model's query outputs and
    their learned rates get a meta-gradient."""
    torch.manual_seed(0)
    batch = image_batch(tasks=2)
    outs = {}
    for adapt_bn in (True, False):
        torch.manual_seed(0)
        model = MAMLpp(task_spec=IMAGES, backbone_kwargs={"filters": 4}, inner_steps=3, inner_lr=0.5, bnwb=True,
                       bnrs=False, msl=False, adapt_bn=adapt_bn).double()
        x = batch.support_x[0].double()
        params = {n: p for n, p in model.net.named_parameters()}
        adapted = adapt_one(model, params, x, batch.support_y[0], 3, first_order=False, training=True)
        outs[adapt_bn] = predict(model, adapted.params, x, batch.query_x[0].double(), 3, training=True)
        if adapt_bn:
            loss = F.cross_entropy(outs[adapt_bn], batch.query_y[0])
            rates = [model.inner_lrs.of(n) for n in model.norm_parameter_names() if n.endswith("weight")]
            grads = torch.autograd.grad(loss, rates)
            assert all(g[:3].abs().sum() > 0 for g in grads), "a BN weight's per-step rates get no meta-gradient"
    assert not torch.allclose(outs[True], outs[False], atol=1e-6), "adapting the per-step BN weights changed nothing"


def test_carry_forward_applies_step_k_update_to_row_k_and_later_rows():
    rows = torch.zeros(4, 2)
    grad = torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [0.0, 0.0]])  # step 1 reads row 1
    new, _ = CarryForward(SGD(0.5), frozenset({"w"}))(1, {"w": rows, "b": torch.ones(2)},
                                                     {"w": grad, "b": torch.ones(2)}, torch.zeros(()), None)
    torch.testing.assert_close(new["w"], torch.tensor([[0.0, 0.0], [-0.5, -1.0], [-0.5, -1.0], [-0.5, -1.0]]))
    torch.testing.assert_close(new["b"], torch.full((2,), 0.5))


def test_mamlpp_reference_layout_predicts_the_query_with_the_last_steps_slot():
    """query_slot false (HowToTrainYourMAMLPytorch): ``steps`` slots, and the query after k
    steps is the network at step k - 1 (the slot its support forward used)."""
    model = MAMLpp(task_spec=IMAGES, backbone_kwargs={"filters": 4}, inner_steps=3, bnwb=True, bnrs=True,
                   query_slot=False)
    norm = next(iter(model.per_step_norms().values()))
    assert norm.weight.shape[0] == 3 and norm.running_mean.shape[0] == 3
    with torch.no_grad():
        for m in model.per_step_norms().values():
            m.weight.copy_(torch.arange(1.0, 4.0)[:, None].expand_as(m.weight))
    params = dict(model.net.named_parameters())
    x, q = image_batch().support_x[0], image_batch().query_x[0]
    for steps, slot in ((3, 2), (2, 1), (1, 0), (0, 0)):
        torch.testing.assert_close(predict(model, params, x, q, steps, training=True), model.forward_fn(params, q, slot))
    legacy = MAMLpp(task_spec=IMAGES, backbone_kwargs={"filters": 4}, inner_steps=3)
    assert next(iter(legacy.per_step_norms().values())).weight.shape[0] == 4  # the query's own slot


# ---------------------------------------------------------------------------- MAML's loss scale
@pytest.mark.parametrize("shots", [1, 3])
def test_sum_over_shots_inner_loss_is_ways_times_the_mean(shots):
    """cbfinn/maml's xent: Σ CE / K over the N·K support examples = N × the mean, so a step at α
    equals a step at N·α on the mean loss."""
    batch = image_batch(tasks=1, shots=shots)
    adapted = {}
    for reduction, lr in (("sum_over_shots", 0.1), ("mean", 0.3)):
        torch.manual_seed(0)
        model = MAML(task_spec=IMAGES, backbone_kwargs={"filters": 4}, inner_lr=lr, inner_loss_reduction=reduction)
        adapted[reduction] = adapt_one(model, params_of(model), batch.support_x[0], batch.support_y[0], 1,
                                              first_order=True, training=False).params
    for name, p in adapted["mean"].items():
        torch.testing.assert_close(adapted["sum_over_shots"][name], p, rtol=1e-5, atol=1e-6)


def test_sum_over_shots_meta_loss_is_n_query_over_k_times_the_mean():
    batch = image_batch(tasks=2, shots=2, queries=5)
    out = {}
    for reduction in ("mean", "sum_over_shots"):
        torch.manual_seed(0)
        model = MAML(task_spec=IMAGES, backbone_kwargs={"filters": 4}, meta_loss_reduction=reduction)
        out[reduction] = run(model, batch, 1, first_order=False, training=True)["query_loss"].detach()
    torch.testing.assert_close(out["sum_over_shots"], out["mean"] * 15 / 2)


def test_adapt_bn_false_keeps_batch_norm_out_of_the_inner_loop():
    model = MAML(task_spec=IMAGES, backbone_kwargs={"filters": 4, "bn_scale": False}, adapt_bn=False)
    assert model.norm_parameter_names() == {f"body.{i}.bias" for i in (1, 4, 7, 10)}  # no weights: no gamma
    assert not set(model.adapt_names()) & model.norm_parameter_names()
    batch = image_batch(tasks=1)
    before = params_of(model)
    after = adapt_one(model, before, batch.support_x[0], batch.support_y[0], 2, first_order=True, training=False).params
    for name in model.norm_parameter_names():
        assert torch.equal(after[name], before[name])
    assert not torch.equal(after["head.weight"], before["head.weight"])


def test_conv4_reference_options():
    net = Conv4(1, 5, 28, filters=8, head_pool="mean", bn_scale=False, bn_eps=1e-3, init="maml")
    assert net.feature_dim == 8 and net.head.in_features == 8  # the 2x2 map averaged, not flattened
    norms = [m for m in net.body if isinstance(m, PerStepBatchNorm)]
    assert len(norms) == 4 and all(m.weight is None and m.eps == 1e-3 for m in norms)  # no gamma, TF's epsilon
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in net.body if isinstance(m, torch.nn.Conv2d))
    big = Conv4(1, 2000, 28, filters=8, head_pool="mean", init="maml")
    assert 0.9 < big.head.weight.std().item() < 1.1  # N(0, 1) head weights, as cbfinn/maml's w5 on Omniglot
    with pytest.raises(ValueError, match="head_pool must be one of"):
        Conv4(1, 5, 28, head_pool="max")


# ---------------------------------------------------------------------------- test-time BN with the support's statistics
def test_support_statistics_bn_predicts_each_query_example_independently_of_the_others():
    model = MAML(task_spec=IMAGES, backbone_kwargs={"filters": 4}, transductive="support")
    batch = image_batch(tasks=1, queries=3)
    params = params_of(model)
    sx, qx = batch.support_x[0], batch.query_x[0]
    all_at_once = predict(model, params, sx, qx, 0, training=False)
    for j in range(qx.shape[0]):
        torch.testing.assert_close(all_at_once[j], predict(model, params, sx, qx[j:j + 1], 0, training=False)[0])
    # and the statistics are the support set's: its own outputs are the transductive ones of the support batch
    torch.testing.assert_close(predict(model, params, sx, sx, 0, training=False), model.forward_fn(params, sx, 0))
    assert not torch.allclose(all_at_once, model.forward_fn(params, qx, 0), atol=1e-4)
    assert model.results_extra()["bn"] == "support statistics"


# ---------------------------------------------------------------------------- Reptile
def test_inner_mini_batches_train_each_step_on_its_scheduled_rows():
    """Step k's update is SGD on the loss of support rows schedule[k] (hand computation), and
    the rows are a stream of permutations: no example repeats within a pass."""
    model = Reptile(task_spec=IMAGES, backbone_kwargs={"filters": 4}, inner_optimizer="sgd", inner_lr=0.1,
                    inner_steps=3, inner_batch_size=4)
    batch = image_batch(tasks=2, shots=4)  # 12 support examples: 3 steps of 4 = one pass
    schedule = inner_schedule(batch.support_x, 3, model.inner_batch_size, EpisodeContext(True, step=0))
    assert schedule.shape == (2, 3, 4)
    for task in range(2):
        assert sorted(schedule[task].reshape(-1).tolist()) == list(range(12))
    params = params_of(model)
    expected = {n: p.clone().requires_grad_() for n, p in params.items()}
    x, y = batch.support_x[1], batch.support_y[1]
    for k in range(3):
        rows = schedule[1, k]
        loss = F.cross_entropy(functional_call(model.net, expected, (x[rows],)), y[rows])
        grads = torch.autograd.grad(loss, list(expected.values()))
        expected = {n: p - 0.1 * g for (n, p), g in zip(expected.items(), grads)}
    out = run(model, batch, 3, first_order=True, training=True, differentiable=False, query=False)
    for name, p in params.items():
        torch.testing.assert_close(p - out["updates"][name][1], expected[name].detach(), rtol=1e-5, atol=1e-6)
    # another training step: other rows
    assert not torch.equal(inner_schedule(batch.support_x, 3, model.inner_batch_size, EpisodeContext(True, step=1)),
                           schedule)


def test_persistent_inner_adam_continues_one_optimizer_across_tasks():
    """supervised-reptile's inner optimizer keeps its state across tasks: with one task per
    meta-step, two meta-steps' inner loops are torch.optim.Adam(β1 = 0) run on, its state
    never reset, the model's weights reset to θ before each task."""
    torch.manual_seed(0)
    model = Reptile(task_spec=IMAGES, backbone_kwargs={"filters": 4}, inner_lr=0.01, inner_steps=3,
                    meta_batch_size=1, meta_lr=1e-9, persistent_inner_state=True).double()
    reference = {n: p.detach().clone().requires_grad_() for n, p in model.net.named_parameters()}
    optimizer = torch.optim.Adam(list(reference.values()), lr=0.01, betas=(0.0, 0.999))
    start = {n: p.detach().clone() for n, p in reference.items()}
    for seed in (1, 2):
        batch = image_batch(tasks=1, seed=seed)
        x, y = batch.support_x[0].double(), batch.support_y[0]
        with torch.no_grad():
            for n, p in reference.items():
                p.copy_(start[n])
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(functional_call(model.net, reference, (x,)), y).backward()
            optimizer.step()
        out = run(model, TaskBatch(x[None], y[None], x[None], y[None]), 3, first_order=True, training=True,
                              differentiable=False, query=False)
        for n, p in reference.items():
            torch.testing.assert_close(start[n] - out["updates"][n][0], p.detach(), rtol=1e-7, atol=1e-9)
    m, v, t = model.inner_state.get()
    assert t.item() == 6
    state = optimizer.state[reference["head.weight"]]
    torch.testing.assert_close(v["head.weight"], state["exp_avg_sq"])
    # evaluation starts from the carried state and leaves it alone
    before = v["head.weight"].clone()
    evaluation = image_batch(tasks=2)
    run(model, TaskBatch(evaluation.support_x.double(), evaluation.support_y, evaluation.query_x.double(),
                              evaluation.query_y), 5, first_order=True, training=False)
    assert torch.equal(model.inner_state.get()[1]["head.weight"], before)
    assert "inner_state.t" in model.state_dict()  # in checkpoints: a resume continues it


def test_reptile_resume_with_mini_batches_and_carried_state_equals_an_uninterrupted_run(run_cli, capsys):
    from tests.conftest import REPO, sine_config

    def results() -> dict:
        import json
        from pathlib import Path

        return json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("results: ")).read_text())

    # a constant meta step: the paper's linear annealing would differ between a 7- and a 14-step run
    common = {"config": REPO / "configs" / "sine" / "reptile.yaml", "test_after_fit": "false",
              "model.init_args.lr_schedule": "constant",
              "model.init_args.inner_optimizer": "adam", "model.init_args.inner_lr": 0.01,
              "model.init_args.inner_batch_size": 4, "model.init_args.persistent_inner_state": "true",
              "trainer.logger.init_args.name": "resume"}
    run_cli("fit", *_without_default_config(sine_config(**common, **{"trainer.max_steps": 14})))
    straight = results()
    run_cli("fit", *_without_default_config(sine_config(**common, **{"trainer.max_steps": 7})))
    half = results()
    run_cli("fit", *_without_default_config(sine_config(**common, **{"trainer.max_steps": 14,
                                                                      "ckpt_path": half["last_checkpoint"]})))
    resumed = results()
    a = torch.load(straight["last_checkpoint"], weights_only=False)["state_dict"]
    b = torch.load(resumed["last_checkpoint"], weights_only=False)["state_dict"]
    assert any(k.startswith("inner_state.") for k in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    assert a["inner_state.t"].item() > 0


def _without_default_config(args: list[str]) -> list[str]:
    """sine_config() starts with configs/sine/maml.yaml; keep only the later --config."""
    configs = [i for i, a in enumerate(args) if a == "--config"]
    if len(configs) > 1:
        del args[configs[0]:configs[0] + 2]
    return args


# ---------------------------------------------------------------------------- Meta-SGD, Meta-LSTM
def test_metasgd_rates_start_uniform_in_the_papers_range():
    model = MetaSGD(task_spec=IMAGES, backbone_kwargs={"filters": 4}, inner_lr_range=(0.005, 0.1))
    rates = torch.cat([p.reshape(-1) for p in model.inner_lrs.values()])
    assert 0.005 <= rates.min() and rates.max() <= 0.1 and rates.std() > 0.02
    with pytest.raises(ValueError, match="inner_lr_range"):
        MetaSGD(task_spec=IMAGES, inner_lr_range=(0.1, 0.01))


def test_meta_lstm_previous_gates_enter_before_the_sigmoid():
    from lit_meta.models.lstm_optimizers import MetaLSTMCell

    cell = MetaLSTMCell(hidden_size=3, gate_preactivation=True)
    theta, grad = torch.randn(5), torch.randn(5)
    state = cell.init_state(theta)
    f1, i1, state = cell(grad, torch.tensor(0.5), theta, state)
    torch.testing.assert_close(torch.sigmoid(state[2]), f1)  # the state holds the pre-activation
    torch.testing.assert_close(torch.sigmoid(state[3]), i1)
    f2, _, _ = cell(grad, torch.tensor(0.5), theta, state)
    # the second step's forget gate from the cell's own pieces, with the previous pre-activations
    from lit_meta.models.lstm_optimizers import preprocess

    h2, _ = cell.lstm(torch.cat([preprocess(grad), preprocess(torch.tensor(0.5)).expand(5, 2)], -1), state[0],
                      state[1])
    z = cell.from_h(h2) + theta[:, None] * cell.from_theta + torch.stack([state[2], state[3]], -1) * cell.from_prev
    torch.testing.assert_close(f2, torch.sigmoid(z[:, 0]))


def test_meta_lstm_gradient_divided_by_the_batch_size_again_but_not_its_loss():
    model = MetaLSTM(task_spec=IMAGES, backbone_kwargs={"filters": 4}, grad_divide_by_batch=True)
    batch = image_batch(tasks=1)
    params = {n: p.detach().requires_grad_() for n, p in model.net.named_parameters()}
    prediction = model.forward_fn(params, batch.support_x[0])
    loss = model.support_loss_fn(prediction, batch.support_y[0])
    plain = F.cross_entropy(prediction, batch.support_y[0])
    torch.testing.assert_close(loss, plain)
    g, g_plain = (torch.autograd.grad(v, params["head.bias"], retain_graph=True)[0] for v in (loss, plain))
    torch.testing.assert_close(g, g_plain / 6)


# ---------------------------------------------------------------------------- the meta-step and schedules
def test_grad_clip_value_clamps_each_meta_gradient_entry():
    torch.manual_seed(0)
    model = MAML(task_spec=IMAGES, backbone_kwargs={"filters": 4}, meta_optimizer="sgd", meta_lr=1.0,
                 grad_clip_value=1e-4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.outer_update(image_batch())
    moves = torch.cat([(before[n] - p.detach()).abs().reshape(-1) for n, p in model.named_parameters()])
    assert moves.max() <= 1e-4 + 1e-7 and (moves > 0.99e-4).any()  # (+ float32 rounding of θ - 1e-4)


def test_cosine_epochs_schedule_steps_per_epoch_down_to_min_lr():
    model = MAML(task_spec=IMAGES, meta_lr=1e-3, lr_schedule="cosine_epochs", min_lr=1e-5)

    class Trainer:
        max_steps, max_epochs = 40, None

        class datamodule:  # noqa: N801 - a stand-in
            steps_per_epoch = 10

    model._trainer = Trainer()
    try:
        scheduler = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    finally:
        model._trainer = None
    lrs = []
    for _ in range(40):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.step()
    lrs.append(scheduler.get_last_lr()[0])
    assert len(set(lrs[:10])) == 1 and len(set(lrs[10:20])) == 1  # constant within an epoch
    expected = [1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(5)]
    assert lrs[::10] == pytest.approx(expected)


# ---------------------------------------------------------------------------- data: rotations and global labels
@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity-omniglot")
    return write_omniglot_npz(root / "omniglot", omniglot_arrays(background=60, evaluation=40, drawers=20))


def test_eval_rotations_turn_each_test_class_by_one_random_quarter(omniglot_root):
    from lit_meta.data import OmniglotDataModule

    plain = OmniglotDataModule(str(omniglot_root), image_size=14, eval_queries=3, eval_batch_size=4, test_tasks=4)
    turned = OmniglotDataModule(str(omniglot_root), image_size=14, eval_queries=3, eval_batch_size=4, test_tasks=4,
                                eval_rotations=True)
    a, b = plain.eval_batch("test", 0), turned.eval_batch("test", 0)
    x, y = a.support_x.reshape(4, 5, 1, 14, 14), b.support_x.reshape(4, 5, 1, 14, 14)
    qx, qy = a.query_x.reshape(4, 5, 3, 14, 14), b.query_x.reshape(4, 5, 3, 14, 14)
    seen = set()
    for t in range(4):
        for w in range(5):
            k = next(k for k in range(4) if torch.equal(torch.rot90(x[t, w], k, (-2, -1)), y[t, w]))
            assert torch.equal(torch.rot90(qx[t, w], k, (-2, -1)), qy[t, w])  # the same turn for the whole class
            seen.add(k)
    assert len(seen) > 1
    assert torch.equal(a.support_y, b.support_y)


def test_global_labels_name_each_examples_class_in_the_training_split(omniglot_root):
    from lit_meta.data import OmniglotDataModule

    dm = OmniglotDataModule(str(omniglot_root), image_size=14, meta_batch_size=3, global_labels=True)
    spec = dm.task_spec
    assert spec["train_classes"] == dm.pools["train"].num_classes == 4 * len(dm.pools["train"].counts)
    batch = dm.train_batch(0)
    assert isinstance(batch, LabelledTaskBatch)
    pool = dm.pools["train"]
    base = len(pool.counts)
    for t in range(3):
        for j in range(batch.support_x.shape[1]):
            c = int(batch.support_classes[t, j])
            images = pool.images[int(pool.offsets[c % base]):int(pool.offsets[c % base] + pool.counts[c % base])]
            turned = torch.rot90(images.float() / 255, c // base, (-2, -1))
            assert any(torch.equal(im, batch.support_x[t, j]) for im in turned)
    # the same tasks as without labels
    plain = OmniglotDataModule(str(omniglot_root), image_size=14, meta_batch_size=3).train_batch(0)
    assert torch.equal(plain.support_x, batch.support_x) and torch.equal(plain.query_y, batch.query_y)


def test_transfer_pretrains_one_classifier_over_the_training_classes(omniglot_root):
    from lit_meta.data import OmniglotDataModule

    dm = OmniglotDataModule(str(omniglot_root), image_size=14, meta_batch_size=8, global_labels=True, queries=3)
    torch.manual_seed(0)
    model = Transfer(task_spec=dm.task_spec, backbone_kwargs={"filters": 8}, meta_lr=0.01, episode_head="zero")
    assert model.classifier.out_features == dm.task_spec["train_classes"]
    assert torch.equal(model.net.head.weight, torch.zeros_like(model.net.head.weight))
    head = model.net.head.weight.clone()
    first = model.outer_update(dm.train_batch(0))["final_query_loss"].mean()
    for step in range(1, 30):
        model.outer_update(dm.train_batch(step % 3))
    last = model.outer_update(dm.train_batch(0))["final_query_loss"].mean()
    assert last < first - 1.0  # it learns the training classes (nats of cross-entropy over them)
    assert torch.equal(model.net.head.weight, head)  # the episode head is not trained
    with pytest.raises(ValueError, match="global class labels"):
        model.outer_update(OmniglotDataModule(str(omniglot_root), image_size=14, meta_batch_size=2).train_batch(0))


# ---------------------------------------------------------------------------- checkpoints from before an option
def test_options_newer_than_a_checkpoint_take_their_defaults():
    from lit_meta.algorithms import LearningToLearn

    defaults = signature_defaults(MAMLpp)
    assert defaults["query_slot"] is True and defaults["adapt_bn"] is None and defaults["inner_loss_reduction"] == "mean"
    assert signature_defaults(Reptile)["meta_optimizer"] == "sgd"  # the subclass's default wins
    # every outer-loop option reaches the learned optimizer through **kwargs (MetaModule's); the
    # inner loop's (MetaLearner's) are not arguments it takes
    assert signature_defaults(LearningToLearn)["weighting"] == "uniform"
    assert "inner_lr" not in signature_defaults(LearningToLearn)
