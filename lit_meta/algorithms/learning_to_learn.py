"""Learning to learn by gradient descent by gradient descent (Andrychowicz et al. 2016).

The optimizee's parameters move by θ_{t+1} = θ_t + g_t, where [g_t, h_{t+1}] = m(∇_t, h_t; φ)
is a coordinate-wise two-layer LSTM (``lit_meta.models.lstm_optimizers.CoordinateLSTM``).
φ is trained on L(φ) = Σ_t f(θ_t) (eq. 3, w_t = 1) over unrolls of T = ``unroll`` steps,
cut into truncations of ``truncation`` steps for backpropagation (truncated BPTT).

It reuses the engine as is: :class:`LSTMRule` is an ``UpdateRule``, one truncation is
``adapt(f, θ_s, truncation, rule, state=h_s)`` vmapped over the functions of the batch,
and ``first_order=True`` is the paper's ∂∇_t/∂φ = 0 (the gradient input is detached;
the path through θ_t is not). The outer update is the shared ``MetaStep`` with one
"task" per function and query loss = Σ_{t=s+1}^{s+K} f(θ_t).

Lightning steps: one training step is one truncation (one meta-update); the LSTM state
and θ are carried to the next step, and every ``unroll / truncation`` steps a fresh
batch of functions starts (on a mid-unroll resume, the next batch starts afresh). A
function whose truncation loss or θ turns non-finite starts its unroll again from θ_0 with
a fresh LSTM state (decided on the device); the meta-step of that truncation is skipped by
the shared divergence guard (:mod:`lit_meta.nonfinite`, ``max_nonfinite``).
Evaluation runs ``eval_steps`` steps of the learned optimizer and of SGD, RMSprop, Adam
and NAG (``lit_meta.update_rules``; learning rates tuned on training-family functions by
a grid) through the same engine, on the fixed held-out functions of the DataModule.

It extends :class:`~lit_meta.algorithms.meta_module.MetaModule` (meta-optimizer, schedule,
meta-step, evaluation epochs with mean and CI), not ``MetaLearner``: there is no network
that adapts per task here, the network *is* the optimizer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.func import vmap

from lit_meta.algorithms.meta_module import MetaModule
from lit_meta.data.base import derive_seed
from lit_meta.data.optimizees import OptimizeeBatch, build_family
from lit_meta.inner import adapt
from lit_meta.metrics import mean_ci95
from lit_meta.models.lstm_optimizers import CoordinateLSTM, LSTMState
from lit_meta.update_rules import HAND_DESIGNED, Params, UpdateRule, flatten, unflatten

DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
BASELINES = ("sgd", "rmsprop", "adam", "nag")  # the paper's hand-designed competitors (lit_meta.update_rules)


@dataclass
class LSTMRule:
    """θ ← θ + m(∇; φ), all coordinates of all parameters in one batch of LSTM rows."""

    net: CoordinateLSTM

    def init_state(self, params: Params) -> LSTMState:
        return self.net.init_state(flatten(params))

    def __call__(self, step: int, params: Params, grads: Params, loss: Tensor,
                 state: LSTMState) -> tuple[Params, LSTMState]:
        update, state = self.net(flatten(grads), state)
        return unflatten(flatten(params) + update, params), state


class LearningToLearn(MetaModule):
    algorithm = "learning_to_learn"

    def __init__(
        self,
        task_spec: dict[str, Any],
        hidden_size: int = 20,
        num_layers: int = 2,
        output_scale: float = 0.1,
        preprocess_p: float = 10.0,
        unroll: int = 100,
        truncation: int = 20,
        first_order: bool = True,
        meta_batch_size: int = 128,
        eval_steps: int = 100,
        baseline_lrs: list[float] = DEFAULT_LRS,
        tune_functions: int = 128,
        **kwargs: Any,
    ) -> None:
        """The learned optimizer's own options; ``kwargs``: the outer loop's, shared with every
        lit_meta model (``MetaModule``: meta_optimizer, meta_lr, lr_schedule, min_lr,
        weighting, grad_clip, grad_clip_value, max_nonfinite)."""
        if "optimizee" not in task_spec:
            raise ValueError("LearningToLearn trains on optimizee functions: use lit_meta.data.OptimizeeDataModule "
                             f"(task_spec of {task_spec.get('dataset')!r} has no 'optimizee')")
        if truncation < 1 or unroll < truncation or unroll % truncation:
            raise ValueError(f"unroll must be a positive multiple of truncation, got {unroll} and {truncation}")
        if tune_functions < 1 or eval_steps < 1:
            raise ValueError(f"tune_functions and eval_steps must be >= 1, got {tune_functions}, {eval_steps}")
        if not baseline_lrs or min(baseline_lrs) <= 0:
            raise ValueError(f"baseline_lrs must be positive learning rates, got {baseline_lrs}")
        if meta_batch_size < 1:
            raise ValueError(f"meta_batch_size must be >= 1, got {meta_batch_size}")
        super().__init__(task_spec, **kwargs)
        self.save_hyperparameters()
        # The network is the optimizer; the optimizee lives in the data (``family``).
        self.net = CoordinateLSTM(hidden_size, num_layers, output_scale, preprocess_p)
        self.inner_steps, self.eval_inner_steps = truncation, eval_steps
        self.first_order, self.meta_batch_size = first_order, meta_batch_size
        self.family = build_family(task_spec["optimizee"])
        self.chunks = unroll // truncation
        self.baseline_lrs = [float(lr) for lr in baseline_lrs]
        self.tune_functions = tune_functions
        self.tuned_lrs: dict[str, float] = {}
        self.curves: dict[str, list[float]] = {}
        self._unroll: dict[str, Any] | None = None

    def learned_rule(self) -> LSTMRule:
        """The learned optimizer as an update rule of the engine."""
        return LSTMRule(self.net)

    # ------------------------------------------------------------------ running optimizers on functions
    def run_functions(self, batch: OptimizeeBatch, theta: Tensor, state: Any, steps: int, rule: UpdateRule,
                      first_order: bool = True, keep_state: bool = True) -> dict[str, Any]:
        """``steps`` steps of ``rule`` from ``theta`` on every function of ``batch`` (vmapped).

        Returns per function: ``losses`` [steps + 1] = f(θ_s .. θ_{s+steps}), ``theta`` and
        (with ``keep_state``) the rule's ``state`` at the end; ``state=None`` starts afresh.
        """
        family = self.family

        def one(theta: Tensor, state: Any, x: Tensor, y: Tensor) -> dict[str, Any]:
            out = adapt(lambda p, step: family.loss(p["theta"], x, y), {"theta": theta}, steps, rule,
                        first_order=first_order, state=state)
            end = out.params["theta"]
            result = {"losses": torch.stack([*out.support_losses, family.loss(end, x, y)]), "theta": end}
            if keep_state:
                result["state"] = out.state
            return result

        if state is None:  # fresh start: ``adapt`` initialises the rule's state per function
            fresh = lambda t, x, y: one(t, None, x, y)  # noqa: E731
            return vmap(fresh, randomness="different")(theta, batch.support_x, batch.support_y)
        return vmap(one, randomness="different")(theta, state, batch.support_x, batch.support_y)

    def loss_curves(self, batch: OptimizeeBatch, rule: UpdateRule, steps: int | None = None) -> Tensor:
        """f(θ_0..θ_steps) of every function of ``batch`` under ``rule``: ``[functions, steps + 1]``."""
        with torch.no_grad():  # the engine's torch.func.grad still differentiates f
            return self.run_functions(batch, batch.theta0, None, steps or self.eval_inner_steps, rule,
                                      keep_state=False)["losses"]

    # ------------------------------------------------------------------ meta-training
    def outer_update(self, batch: OptimizeeBatch) -> dict[str, Any]:
        """One truncation of the current unroll and one meta-step; every ``unroll / truncation``
        calls a fresh unroll starts on the functions of ``batch``."""
        run = self._unroll
        if run is None or run["chunk"] == self.chunks:
            run = self._unroll = {"batch": batch, "theta": batch.theta0, "state": None, "chunk": 0}
        out = self.run_functions(run["batch"], run["theta"], run["state"], self.inner_steps,
                                 LSTMRule(self.net), first_order=self.first_order)
        # Σ_{t=s+1}^{s+K} f(θ_t): f(θ_s) is a constant of this truncation.
        out["meta_loss"] = meta_loss = out["losses"][:, 1:].sum(1)
        # a non-finite meta-loss: the shared guard skips this meta-step (no host read here)
        self.meta_step(self, {"theta": (run["theta"] - out["theta"]).detach()}, query_losses=meta_loss)
        # ... and the functions that went non-finite start their unroll again from θ_0
        finite = torch.isfinite(meta_loss.detach()) & torch.isfinite(out["theta"].detach()).flatten(1).all(1)

        def kept(new: Tensor, fresh: Tensor) -> Tensor:
            return torch.where(finite.view(-1, *[1] * (new.dim() - 1)), new.detach(), fresh)

        run.update(theta=kept(out["theta"], run["batch"].theta0),
                   state=tuple(kept(s, torch.zeros_like(s)) for s in out["state"]),  # the LSTM's zero state
                   chunk=run["chunk"] + 1)
        return out

    def training_step(self, batch: OptimizeeBatch, batch_idx: int) -> None:
        out = self.outer_update(batch)
        if self.logging_step():
            self.log_training_values({"train/loss": out["meta_loss"].detach().mean() / self.inner_steps})
        self.step_lr_schedule()

    def divergence_cause(self, step: int, batch: Any = None) -> str:
        return (f"the learned steps overflow the optimizee functions: the meta learning rate (meta_lr={self.meta_lr}) "
                f"or the output scale (output_scale={self.net.output_scale}) is too large, or the functions "
                "themselves are not finite")

    # ------------------------------------------------------------------ evaluation
    def tune_baselines(self) -> dict[str, float]:
        """For each baseline, the grid learning rate with the lowest mean f(θ_T) on fresh
        training-family functions (a seed of their own, so not the held-out ones)."""
        generator = torch.Generator().manual_seed(derive_seed(0, "tune", 0))
        batch = self.family.sample(generator, self.tune_functions).to(self.device)
        best: dict[str, float] = {}
        for name in BASELINES:
            scores = {}
            for lr in self.baseline_lrs:
                final = self.loss_curves(batch, HAND_DESIGNED[name](lr))[:, -1]
                scores[lr] = final.mean().item() if torch.isfinite(final).all() else math.inf
            best[name] = min(scores, key=scores.get)
            if best[name] in (min(self.baseline_lrs), max(self.baseline_lrs)) and len(self.baseline_lrs) > 1:
                rank_zero_warn(f"tuned {name} learning rate {best[name]} is at the edge of baseline_lrs")
        return best

    def evaluate_rules(self, rules: dict[str, UpdateRule], batch: OptimizeeBatch) -> None:
        """Add each rule's loss curves on ``batch`` to ``eval_sums``."""
        if not batch.num_tasks:  # a DDP rank with no evaluation function: nothing to add
            return
        for name, rule in rules.items():
            curves = self.loss_curves(batch, rule).double()
            final = curves[:, -1]
            self.eval_sums.add(f"{name}/curve", curves.sum(0))
            self.eval_sums.add_moments(f"{name}/final", final)
            self.eval_sums.add(f"{name}/nonfinite", (~torch.isfinite(final)).sum().double())

    def validation_step(self, batch: OptimizeeBatch, batch_idx: int) -> None:
        self.evaluate_rules({"learned": LSTMRule(self.net)}, batch)

    def test_step(self, batch: OptimizeeBatch, batch_idx: int) -> None:
        rules = {"learned": LSTMRule(self.net), **{n: HAND_DESIGNED[n](lr) for n, lr in self.tuned_lrs.items()}}
        self.evaluate_rules(rules, batch)

    def begin_evaluation(self, split: str) -> None:
        if split == "test":
            self.tuned_lrs = self.tune_baselines()

    def evaluation_metrics(self, split: str, sums: dict[str, Tensor]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        finals: dict[str, float] = {}
        for key in sums:
            name, kind = key.split("/")
            if kind != "final":
                continue
            mean, ci95, n = mean_ci95(sums[key])
            finals[name] = mean
            metrics[f"{split}/final_loss_{name}"] = mean
            metrics[f"{split}/final_loss_{name}_ci95"] = ci95
            metrics[f"{split}/nonfinite_{name}"] = sums[f"{name}/nonfinite"].item()
            self.curves[name] = (sums[f"{name}/curve"] / n).tolist()
            metrics[f"{split}/functions"] = n
        for name, lr in self.tuned_lrs.items() if split == "test" else ():
            metrics[f"{split}/lr_{name}"] = lr
        if "adam" in finals:
            metrics[f"{split}/ratio_learned_to_adam"] = finals["learned"] / finals["adam"]
            best = min(v for k, v in finals.items() if k != "learned")
            metrics[f"{split}/ratio_learned_to_best_baseline"] = finals["learned"] / best
        metrics[f"{split}/eval_steps"] = float(self.eval_inner_steps)
        return metrics

    @property
    def monitor(self) -> tuple[str, str]:
        return "val/final_loss_learned", "min"

    def results_extra(self) -> dict[str, Any]:
        """Added to results.json: the mean loss curves of the last test, and the tuned learning rates."""
        return {"loss_curves": dict(self.curves), "tuned_lr": dict(self.tuned_lrs),
                "eval_steps": self.eval_inner_steps}
