"""MAML++ (Antoniou, Edwards & Storkey 2019, "How to train your MAML").

Each fix of the paper is its own switch, so an ablation is one config line:

- ``msl``: multi-step loss. The meta-objective is Σ_k v_k L_query(θ_k) over the inner
  steps, with per-step importance v annealed (over ``msl_epochs``) from uniform to the
  final step alone; v sums to 1 (the paper's ``get_per_step_loss_importance_vector``).
- ``first_order_epochs``: derivative-order annealing, first order for the first N epochs.
- ``lslr``: per-layer, per-step learned inner rates (one per parameter tensor and step).
- ``bnwb`` / ``bnrs``: per-step BatchNorm weights and biases / running statistics.
- cosine annealing of the meta learning rate (CA) is ``lr_schedule: cosine`` (per step, to
  ``min_lr``) or ``cosine_epochs`` (per epoch, as the reference code does).

Where the reference code (AntreasAntoniou/HowToTrainYourMAMLPytorch) is followed behind an
option (defaults keep lit_meta's first behaviour, so old checkpoints load as they were):

- ``query_slot``: true (default) gives the query after the last step a per-step BN slot of
  its own (``steps + 1`` slots); false is the reference's layout: ``steps`` slots, and the
  query after step ``k`` is predicted with step ``k``'s slot (its
  ``net_forward(..., num_step=num_step)`` on the target set).
- ``adapt_bn``: whether BN weights and biases adapt in the inner loop. The reference keeps
  them out (``enable_inner_loop_optimizable_bn_params: false``). Default (null): out with
  ``bnwb``, in without it, which is what the first implementation did in effect: its inner
  updates of per-step BN weights changed row ``k`` while later forwards read row ``k + 1``,
  so they had no effect. When they do adapt, the update of step ``k`` now reaches the rows
  the later steps and the query read (:class:`~lit_meta.update_rules.CarryForward`).
- Per-step running statistics (``bnrs``) are those of the support forwards of the inner
  loop, one slot per step; they are used for normalising only by non-transductive
  evaluation (``transductive: false``; the reference's ``F.batch_norm(training=True)``
  always uses the batch's). ``transductive: support`` normalises with the support set's
  statistics, as for every algorithm, BNRS or not.
- The epoch schedules (MSL's annealing, ``first_order_epochs``) read the task stream's
  epoch from the batch (its origin, set by the DataModule), so a resumed run continues
  exactly where it stopped.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_meta.algorithms.base import MetaLearner
from lit_meta.algorithms.learned_rates import LearnedRates
from lit_meta.episode import EpisodeContext
from lit_meta.inner import Adapted
from lit_meta.models.layers import Norm, PerStepBatchNorm
from lit_meta.update_rules import SGD, CarryForward, UpdateRule


def msl_importance(steps: int, epoch: int, msl_epochs: int) -> list[float]:
    """Per-step loss importance at ``epoch`` (Antoniou et al.'s schedule); sums to 1.

    Python floats (float64 arithmetic, as the reference's numpy): the objective multiplies
    each step's loss by its weight as a scalar, so no host tensor is made, or copied to
    the device, inside a step."""
    weights = [1.0 / steps] * steps
    if steps == 1:
        return weights
    decay = 1.0 / steps / msl_epochs
    floor = 0.03 / steps
    weights[:-1] = [max(w - epoch * decay, floor) for w in weights[:-1]]
    weights[-1] = min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return weights


class MAMLpp(MetaLearner):
    algorithm = "mamlpp"

    def __init__(self, msl: bool = True, msl_epochs: int = 10, first_order_epochs: int = 0,
                 lslr: bool = True, bnwb: bool = True, bnrs: bool = True, query_slot: bool = True,
                 adapt_bn: bool | None = None, **kwargs: Any) -> None:
        if msl_epochs < 1:
            raise ValueError(f"msl_epochs must be >= 1, got {msl_epochs}")
        if first_order_epochs < 0:
            raise ValueError(f"first_order_epochs must be >= 0, got {first_order_epochs}")
        # set before MetaLearner's __init__: the network it builds reads them (backbone_options)
        self.bnwb, self.bnrs, self.query_slot = bnwb, bnrs, query_slot
        super().__init__(adapt_bn=not bnwb if adapt_bn is None else adapt_bn, **kwargs)
        if (bnwb or bnrs) and not self.per_step_norms():
            raise ValueError("bnwb/bnrs need a backbone with BatchNorm (conv4); set them false for this data")
        self.msl, self.msl_epochs, self.first_order_epochs = msl, msl_epochs, first_order_epochs
        self.lslr = lslr
        steps = max(self.inner_steps, self.eval_inner_steps, 1)
        self.inner_lrs = LearnedRates({n: torch.full((steps,), self.inner_lr) for n, _ in self.net.named_parameters()},
                                      learn=lslr)

    def backbone_options(self) -> dict[str, Any]:
        # BNWB / BNRS: per-step BatchNorm in conv4 (an MLP has none: checked after it is built)
        if not (self.bnwb or self.bnrs) or len(self.task_spec["input_shape"]) != 3:
            return {}
        return {"bn_steps": max(self.inner_steps, self.eval_inner_steps), "bn_per_step_weights": self.bnwb,
                "bn_per_step_stats": self.bnrs, "bn_query_slot": self.query_slot}

    def per_step_norms(self) -> dict[str, PerStepBatchNorm]:
        return {n: m for n, m in self.net.named_modules() if isinstance(m, PerStepBatchNorm)}

    # -- LSLR
    def update_rule(self, ctx: EpisodeContext) -> UpdateRule:
        rule = SGD({n: self.inner_lrs.of(n) for n in self.adapt_names()}, per_step=True)
        per_step = frozenset(n for n in set(self.adapt_names()) & self.norm_parameter_names()
                             if self.net.get_parameter(n).dim() == 2)  # BNWB rows: [slots, channels]
        return CarryForward(rule, per_step) if per_step else rule

    def set_inner_lr(self, inner_lr: float) -> bool:
        super().set_inner_lr(inner_lr)
        self.inner_lrs.fill_(inner_lr)
        return True

    # -- derivative-order annealing, by the task stream's epoch (the batch's origin)
    def first_order_at(self, ctx: EpisodeContext) -> bool:
        if not ctx.training:
            return True
        return self.first_order or ctx.epoch < self.first_order_epochs

    # -- MSL
    def msl_weights(self, ctx: EpisodeContext) -> list[float] | None:
        if not ctx.training or not self.msl or ctx.epoch >= self.msl_epochs or self.inner_steps < 1:
            return None
        return msl_importance(self.inner_steps, ctx.epoch, self.msl_epochs)

    def trace_inner(self, ctx: EpisodeContext) -> bool:
        return ctx.training and (self.msl_weights(ctx) is not None or self.bnrs)

    def query_objective(self, adapted: Adapted, support_x: Tensor, query_x: Tensor, query_y: Tensor,
                        final_loss: Tensor, ctx: EpisodeContext) -> Tensor:
        weights = self.msl_weights(ctx)
        if weights is None:
            return final_loss
        losses = [self.loss_fn(self.forward_fn(p, query_x, self.query_step(k)), query_y)
                  for k, p in enumerate(adapted.trajectory[1:], start=1)]
        # scalar weights: each product rounds as a float32 weight vector's would
        return torch.stack([w * loss for w, loss in zip(weights, losses)]).sum()

    def query_step(self, step: int) -> int:
        # the reference's layout: the query after k steps uses the slot of step k - 1
        return step if self.query_slot else max(step - 1, 0)

    # -- BNRS: each step's batch statistics leave vmap as outputs, then fill the buffers
    def extra_task_outputs(self, adapted: Adapted, support_x: Tensor, ctx: EpisodeContext) -> dict[str, Any]:
        if not (ctx.training and self.bnrs):
            return {}
        stats: dict[str, list[Tensor]] = {}
        names = list(self.per_step_norms())  # the forward visits them in this (module) order
        # the support forward of each inner step (and, with a query slot, one after the last for it)
        trajectory = adapted.trajectory if self.query_slot else adapted.trajectory[:-1]
        for step, params in enumerate(trajectory):
            recorded: list = []
            self.forward_fn({n: p.detach() for n, p in params.items()}, support_x, step, Norm(record=recorded))
            for name, (_, mean, var) in zip(names, recorded):
                stats.setdefault(name, []).append(torch.stack([mean, var]))
        return {"bn_stats": {n: torch.stack(v) for n, v in stats.items()}}

    def absorb_task_outputs(self, out: dict[str, Any]) -> None:
        for name, per_task in out.get("bn_stats", {}).items():
            norm = self.per_step_norms()[name]
            mean_over_tasks = per_task.mean(0)  # [steps + 1, 2, C]
            for step in range(mean_over_tasks.shape[0]):
                norm.update_running_stats(norm.slot(step), mean_over_tasks[step, 0], mean_over_tasks[step, 1])

    def evaluation_bn(self) -> str:
        # With BNRS, non-transductive evaluation normalises with the per-step running statistics;
        # transductive and support-statistics evaluation do as they say.
        if self.bn_mode == "per_example" and self.bnrs and self.per_step_norms():
            return "running"
        return self.bn_mode
