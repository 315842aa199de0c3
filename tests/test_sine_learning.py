"""MAML on sine learns an initialisation that adapts (Finn et al. 2017, fig. 2)."""
from __future__ import annotations

import torch

from lit_meta.algorithms import MAML
from lit_meta.data import SineDataModule


def _post_adaptation_mse(model: MAML, dm: SineDataModule, steps: int) -> tuple[float, float]:
    batch = dm.eval_batch("test", 0)
    out = model.run_tasks(batch, steps, first_order=True, training=False)
    return out["before_loss"].mean().item(), out["query_loss"].mean().item()


def test_maml_lowers_post_adaptation_mse_below_pre_and_below_untrained_init():
    torch.manual_seed(0)
    dm = SineDataModule(meta_batch_size=25, test_tasks=200, eval_batch_size=200)
    model = MAML(dm.task_spec, inner_lr=0.01, inner_steps=1, eval_inner_steps=10)
    untrained = MAML(dm.task_spec, inner_lr=0.01, eval_inner_steps=10)
    untrained.load_state_dict(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(1500):
        out = model.run_tasks(dm.train_batch(step), 1, first_order=False, training=True)
        model.meta_step(model, out["updates"], query_losses=out["query_loss"], optimizer=optimizer)
    before, after = _post_adaptation_mse(model, dm, 10)
    _, untrained_after = _post_adaptation_mse(untrained, dm, 10)
    assert after < 0.5 * before, (before, after)
    assert after < 0.5 * untrained_after, (after, untrained_after)
    assert after < 1.5


def test_meta_learners_beat_the_transfer_baseline_with_the_same_budget():
    """The qualitative result of the MAML and Reptile papers: pooled pretraining learns the
    mean function (≈ 0), which adapts poorly from K=10 points."""
    from lit_meta.algorithms import MetaSGD, Reptile, Transfer

    dm = SineDataModule(meta_batch_size=10, test_tasks=200, eval_batch_size=200)
    spec = dm.task_spec
    common = {"task_spec": spec, "meta_batch_size": 10, "eval_inner_steps": 10}
    models = {
        "maml": MAML(**common, inner_lr=0.01),
        # Li et al. test with the one learned step it trains; its rates diverge over 10.
        "metasgd": MetaSGD(**{**common, "eval_inner_steps": 1}, inner_lr=0.01),
        "reptile": Reptile(**common, inner_optimizer="sgd", inner_lr=0.02, inner_steps=5, meta_lr=1.0),
        "transfer": Transfer(**common, inner_lr=0.01, inner_steps=0),
    }
    after = {}
    for name, model in models.items():
        torch.manual_seed(0)
        for step in range(800):
            model.outer_update(dm.train_batch(step))
        after[name] = _post_adaptation_mse(model, dm, model.eval_inner_steps)[1]
    for name in ("maml", "metasgd", "reptile"):
        assert after[name] < after["transfer"], after
