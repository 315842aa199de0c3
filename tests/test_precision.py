"""Mixed precision on CPU: every algorithm takes finite meta-steps under bf16-mixed (and
16-mixed, whose inner loop runs in fp32) that update the parameters in the fp32 steps'
direction, and one meta-step equals the fp32 one on the same batch to within the precision's
rounding, for MAML's backward and Reptile's written gradients."""
from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision

from lit_meta.algorithms import ANIL, MAML, MAMLpp, MetaSGD, Reptile, Transfer
from lit_meta.episode import inner_precision
from lit_meta.data.sine import SineDataModule

ALGORITHMS = {
    "maml": (MAML, {}), "fomaml": (MAML, {"first_order": True}), "reptile": (Reptile, {"inner_optimizer": "sgd"}),
    "metasgd": (MetaSGD, {}), "mamlpp": (MAMLpp, {"inner_steps": 2, "bnwb": False, "bnrs": False}),
    "anil": (ANIL, {}), "transfer": (Transfer, {"inner_steps": 0}),
    "mamlpp_checkpointed": (MAMLpp, {"inner_steps": 2, "bnwb": False, "bnrs": False, "inner_checkpointing": True}),
}


class GradientWatch(pl.Callback):
    """Each step's meta-gradient norm, and its parameter update (after − before, in float32)."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.updates: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.before = torch.cat([p.detach().flatten().float() for p in module.parameters()])

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        self.norms.append(torch.stack([g.float().norm() for g in grads]).norm().item())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.updates.append(torch.cat([p.detach().flatten().float() for p in module.parameters()]) - self.before)


def three_meta_steps(tmp_path, name: str, precision: str) -> tuple[pl.LightningModule, GradientWatch, dict]:
    """Three meta-steps of ``ALGORITHMS[name]`` from seed 0's weights on the sine task stream
    (the same batches at every precision)."""
    cls, kwargs = ALGORITHMS[name]
    dm = SineDataModule(meta_batch_size=8)
    torch.manual_seed(0)
    model = cls(task_spec=dm.task_spec, **{"inner_lr": 0.01, **kwargs})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    watch = GradientWatch()
    # Lightning turns a plain precision="16-mixed" into bf16 on CPU; the plugin forces fp16 + GradScaler
    # (init_scale 2^8: no overflow in these steps, so every step is taken and can be compared; the
    # skipped steps of an overflowing scale are test_steps_the_scaler_skips_are_counted_and_are_not_divergence's)
    plugins = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))] \
        if precision == "16-mixed" else []
    trainer = pl.Trainer(accelerator="cpu", plugins=plugins, max_steps=3, logger=False,
                         precision=None if plugins else precision,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         inference_mode=False, limit_val_batches=0, callbacks=[watch],
                         default_root_dir=tmp_path / precision)
    trainer.fit(model, dm)
    return model, watch, before


_FP32_UPDATES: dict[str, list[torch.Tensor]] = {}


def fp32_updates(tmp_path, name: str) -> list[torch.Tensor]:
    """The 32-true run's three updates (one run per algorithm, shared by both precisions)."""
    if name not in _FP32_UPDATES:
        _FP32_UPDATES[name] = three_meta_steps(tmp_path, name, "32-true")[1].updates
    return _FP32_UPDATES[name]


# Cosine similarity of each meta-step's parameter update with the fp32 run's (same weights at
# seed 0, same batches; the default Adam meta-optimizer). Measured: bf16-mixed 0.973-0.996 over
# the 8 algorithms x 3 steps (Reptile 1.0000), 16-mixed >= 0.9991. A step that goes the wrong
# way, or follows another gradient, is far below the bound 0.9.
UPDATE_COSINE = 0.9


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_meta_steps_are_finite_under_mixed_precision(tmp_path, name, precision):
    """Three finite meta-steps under mixed precision, each updating the parameters in the
    direction the fp32 meta-step does (cosine > 0.9)."""
    model, watch, before = three_meta_steps(tmp_path, name, precision)
    assert len(watch.norms) == 3 and all(math.isfinite(n) and n > 0 for n in watch.norms)
    assert model.meta_step.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    reference = fp32_updates(tmp_path, name)
    cosines = [float(torch.nn.functional.cosine_similarity(mixed, fp32, dim=0))
               for mixed, fp32 in zip(watch.updates, reference)]
    assert len(cosines) == 3 and min(cosines) > UPDATE_COSINE, cosines


def test_16_mixed_runs_the_inner_loop_in_fp32():
    seen: list[torch.dtype] = []
    dm = SineDataModule(meta_batch_size=2)
    model = MAML(task_spec=dm.task_spec)

    class Probe:
        precision = "16-mixed"

    model._trainer = Probe()
    with torch.autocast("cpu", dtype=torch.float16):
        with inner_precision(model.context(True), "cpu"):
            seen.append(torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype)
        seen.append(torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype)
    model._trainer = None
    assert seen == [torch.float32, torch.float16]


# ---------------------------------------------------------------------------- one step against fp32
def one_meta_step(cls, kwargs: dict, precision: str) -> torch.Tensor:
    """The parameter update of meta-step 0 (same initial weights, same tasks) under ``precision``."""
    dm = SineDataModule(meta_batch_size=8)
    torch.manual_seed(0)
    model = cls(task_spec=dm.task_spec, meta_batch_size=8, **kwargs)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    # init_scale 2^8: no overflow in this step, so GradScaler steps (2^16 may skip it)
    plugins = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))] \
        if precision == "16-mixed" else []
    trainer = pl.Trainer(accelerator="cpu", plugins=plugins, precision=None if plugins else precision, max_steps=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, inference_mode=False, limit_val_batches=0)
    trainer.fit(model, dm)
    assert model.meta_step.skipped_steps == 0
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


# Relative error ||Δθ_mixed − Δθ_fp32|| / ||Δθ_fp32|| of one SGD meta-step (SGD: the update is the
# gradient itself, so a wrongly scaled gradient shows; Adam would normalise it away).
# - bf16 (unit roundoff u = 2^-8 ≈ 3.9e-3): inner loop, query forward and backward in bf16;
#   measured 5.3e-3..8.5e-3 (MAML) and 6.7e-3..8.8e-3 (Reptile) over 3 seeds: bound 4e-2 ≈ 10 u.
# - 16-mixed (u = 2^-11 ≈ 4.9e-4): MAML's query forward and scaled backward in fp16, measured
#   3.1e-4..5.0e-4: bound 5e-3 ≈ 10 u. Reptile's inner loop is fp32 and its written gradient is
#   scaled and unscaled by a power of two, so it equals fp32 (measured 0): bound 1e-6. Without
#   scaler.scale on written gradients the update would be 2^-8 of fp32's: error ≈ 1.
PRECISION_CASES = {
    ("maml", "bf16-mixed"): 4e-2, ("maml", "16-mixed"): 5e-3,
    ("reptile", "bf16-mixed"): 4e-2, ("reptile", "16-mixed"): 1e-6,
}
STEP_ALGORITHMS = {
    "maml": (MAML, {"meta_optimizer": "sgd", "meta_lr": 0.1, "inner_lr": 0.01}),
    "reptile": (Reptile, {"inner_optimizer": "sgd", "inner_lr": 0.02, "inner_steps": 3}),  # meta: SGD at 1.0
}


@pytest.mark.parametrize("name,precision", list(PRECISION_CASES))
def test_a_mixed_precision_meta_step_equals_the_fp32_one_to_its_rounding(name, precision):
    cls, kwargs = STEP_ALGORITHMS[name]
    reference = one_meta_step(cls, kwargs, "32-true")
    mixed = one_meta_step(cls, kwargs, precision)
    error = ((mixed - reference).norm() / reference.norm()).item()
    assert reference.norm() > 0 and error <= PRECISION_CASES[(name, precision)], error


def test_steps_the_scaler_skips_are_counted_and_are_not_divergence(tmp_path):
    """A scale of 2^40 overflows fp16 in the backward: GradScaler skips the steps (halving the
    scale each time), meta/skipped_steps counts them, the weights stay, and the divergence
    guard (whose meta-loss is finite) counts none."""
    dm = SineDataModule(meta_batch_size=8)
    model = MAML(task_spec=dm.task_spec, meta_batch_size=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plugins = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0 ** 40))]
    trainer = pl.Trainer(accelerator="cpu", plugins=plugins, max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                         limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert model.meta_step.skipped_steps == 3 and model.meta_step.guard.skipped == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_plain_16_mixed_on_cpu_is_bf16():
    trainer = pl.Trainer(accelerator="cpu", precision="16-mixed", logger=False)
    assert trainer.precision == "bf16-mixed" and getattr(trainer.precision_plugin, "scaler", None) is None


class ClippedNorm(pl.Callback):
    """The meta-gradient's norm after the optimizer step (the .grad Lightning unscaled and the module clipped)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        self.norms.append(torch.stack([g.float().norm() for g in grads]).norm().item())


@pytest.mark.parametrize("clip", [{"grad_clip": 1e-3}, {"grad_clip": 1e-3, "grad_clip_value": 1e-4}])
def test_16_mixed_with_clipping_unscales_once_and_clips_the_unscaled_gradient(tmp_path, clip):
    """Lightning's MixedPrecision plugin with an fp16 GradScaler (what 16-mixed is on CUDA) unscales
    the gradients once per step; the clip must act after that, on the true gradient. Clipping in
    the meta-step before the plugin's own unscale raised "unscale_() has already been called on
    this optimizer since the last update()" at step 0; clipping the scaled gradient would leave
    a norm of 1e-3 / 2^8 after unscaling."""
    dm = SineDataModule(meta_batch_size=8)
    model = MAML(task_spec=dm.task_spec, meta_batch_size=8, **clip)
    watch = ClippedNorm()
    plugins = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))]
    trainer = pl.Trainer(accelerator="cpu", plugins=plugins, max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                         limit_val_batches=0, callbacks=[watch], default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert model.meta_step.skipped_steps == 0 and len(watch.norms) == 3
    # the raw meta-gradient norm of sine MAML at init is O(1): the clip binds at every step
    for norm in watch.norms:
        assert norm == pytest.approx(1e-3, rel=1e-3) if "grad_clip_value" not in clip else 0 < norm <= 1e-3 * 1.001
