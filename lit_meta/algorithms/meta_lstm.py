"""Meta-Learner LSTM (Ravi & Larochelle 2017, "Optimization as a Model for Few-Shot Learning").

The learner's parameters are the cell state of an LSTM:

    c_t = f_t ⊙ c_{t−1} + i_t ⊙ (−∇_{θ_{t−1}} L_t),   θ_t = c_t,

with f_t (a learned weight decay) and i_t (a learned learning rate) computed per
coordinate from [∇_t, L_t, θ_{t−1}, previous gate] (``MetaLSTMCell``, coordinate-wise
sharing, inputs preprocessed as in Andrychowicz et al.). c_0 is the learner's
initialisation, meta-learned with the LSTM: here it is simply ``self.net``'s parameters,
which ``MetaLearner`` already hands to the engine as θ_0. So the algorithm is one
``UpdateRule`` (:class:`MetaLSTMRule`) plugged into the shared inner loop and meta-step.

As in the paper, the LSTM's inputs (gradient and loss) are treated as constants of the
meta-parameters (their Figure 2's dashed lines): the rule detaches them, and with
``first_order=True`` (default) so is the ∇ in the cell update. The outer gradient still
flows through c_t to c_0 and through the gates to the LSTM. Updates take the whole
support set per step (``inner_steps`` = epochs × batches of the paper). Gradient
clipping 0.25 is the ``MetaStep``'s ``grad_clip``.

BatchNorm: the learner normalises with the statistics of the batch it sees and keeps no
running averages, so nothing leaks from one episode to the next: the paper's point
(statistics are collected per meta-test dataset and erased before the next one) holds by
construction. By default the query batch is normalised with its own statistics
(transductive, as in the MAML line of work); ``transductive: support`` normalises it with
the support set's statistics under the adapted weights, which is what the reference code
(twitter/meta-learning-lstm) does in effect: its learner collects running statistics over
the support batches of the episode (momentum 0.9, reset per episode) and switches to them
(``learner.set('evaluate')``) for the query; ``false`` predicts each query example beside
the support set.

Two more points of the reference code, behind options whose defaults keep lit_meta's first
behaviour:

- ``gate_preactivation``: the previous f and i enter the gates before the sigmoid
  (``meta-learner-lstm.lua`` keeps ``fS[s] = fN``, the pre-sigmoid value, and feeds it to
  the next step), not after it.
- ``grad_divide_by_batch``: the learner's gradient is divided by the batch size once more
  (its ``feval`` calls ``gradParameters:div(inputs:size(1))`` on the gradient of a criterion
  that already averages), both as the LSTM's input and in the cell update; the loss it
  reads is not.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor
from torch.func import functional_call

from lit_meta.algorithms.base import MetaLearner
from lit_meta.episode import EpisodeContext
from lit_meta.models.lstm_optimizers import MetaLSTMCell, MetaLSTMState
from lit_meta.update_rules import Params, flatten, unflatten


@dataclass
class MetaLSTMRule:
    """c_t = f_t ⊙ c_{t−1} − i_t ⊙ ∇_t over all learner coordinates at once.

    ``weights`` (the cell's parameters by name) replaces the cell's own when the engine
    rebuilds the rule to recompute a step (inner checkpointing)."""

    cell: MetaLSTMCell
    weights: Params | None = None

    def init_state(self, params: Params) -> MetaLSTMState:
        return self.cell.init_state(flatten(params))

    def tensors(self) -> Params:
        return dict(self.cell.named_parameters())

    def with_tensors(self, tensors: Params) -> MetaLSTMRule:
        return replace(self, weights=dict(tensors))

    def __call__(self, step: int, params: Params, grads: Params, loss: Tensor,
                 state: MetaLSTMState) -> tuple[Params, MetaLSTMState]:
        theta, grad = flatten(params), flatten(grads)
        inputs = (grad.detach(), loss.detach(), theta, state)
        if self.weights is None:
            f, i, state = self.cell(*inputs)
        else:
            f, i, state = functional_call(self.cell, self.weights, inputs)
        return unflatten(f * theta - i * grad, params), state


class MetaLSTM(MetaLearner):
    algorithm = "meta_lstm"

    def __init__(
        self,
        task_spec: dict[str, Any],
        hidden_size: int = 20,
        preprocess_p: float = 10.0,
        init_lr: float = 0.01,
        init_forget: float = 0.995,
        gate_preactivation: bool = False,
        grad_divide_by_batch: bool = False,
        # shared options whose defaults differ here (the paper's); every other shared option
        # comes through ``kwargs`` as for any algorithm
        inner_steps: int = 12,
        first_order: bool = True,
        meta_batch_size: int = 1,
        grad_clip: float | None = 0.25,
        **kwargs: Any,
    ) -> None:
        # a checkpoint's hparams record the inner_lr this passes on (= init_lr); any other is a mistake
        if kwargs.pop("inner_lr", init_lr) != init_lr:
            raise ValueError("meta_lstm has no inner_lr: its LSTM computes the steps, starting from init_lr")
        super().__init__(task_spec, inner_lr=init_lr, inner_steps=inner_steps, first_order=first_order,
                         meta_batch_size=meta_batch_size, grad_clip=grad_clip, **kwargs)
        self.meta_learner = MetaLSTMCell(hidden_size, preprocess_p, init_lr, init_forget, gate_preactivation)
        self.grad_divide_by_batch = grad_divide_by_batch

    def support_loss_fn(self, prediction: Tensor, target: Tensor) -> Tensor:
        loss = super().support_loss_fn(prediction, target)
        if not self.grad_divide_by_batch:
            return loss
        # the value stays the loss (the LSTM reads it); its gradient is divided by the batch size
        scaled = loss / target.shape[0]
        return scaled + (loss - scaled).detach()

    def update_rule(self, ctx: EpisodeContext) -> MetaLSTMRule:
        return MetaLSTMRule(self.meta_learner)

    def set_inner_lr(self, inner_lr: float) -> bool:
        raise ValueError(f"inner_lr does not apply to {self.algorithm}: its LSTM computes the inner steps")
