"""``LearnedOptimizer``: a trained coordinate-wise LSTM optimizer as a ``torch.optim.Optimizer``.

    model = ...
    opt = LearnedOptimizer(model.parameters(), checkpoint="runs/learning_to_learn/checkpoints/last.ckpt")
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

Each parameter tensor keeps its coordinates' LSTM state (``h``, ``c``: ``[layers,
numel, hidden]``) in ``opt.state``, so ``state_dict()`` / ``load_state_dict()`` resume
a run exactly; the state dict also carries the LSTM's weights. ``lr`` multiplies the
learned step (1.0 is what it was meta-trained with) and can be scheduled as usual.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from lit_meta.checkpoint import read_checkpoint
from lit_meta.models.lstm_optimizers import CoordinateLSTM


def load_coordinate_lstm(checkpoint: str | os.PathLike) -> CoordinateLSTM:
    """The optimizer network of a ``LearningToLearn`` Lightning checkpoint."""
    ckpt = read_checkpoint(checkpoint, weights_only=True)
    hp = ckpt.get("hyper_parameters") or {}
    weights = {k[len("net."):]: v for k, v in (ckpt.get("state_dict") or {}).items() if k.startswith("net.")}
    if not weights or "hidden_size" not in hp:
        raise ValueError(f"{checkpoint} is not a LearningToLearn (learned LSTM optimizer) checkpoint")
    net = CoordinateLSTM(hp["hidden_size"], hp["num_layers"], hp["output_scale"], hp["preprocess_p"])
    net.load_state_dict(weights)
    return net


class LearnedOptimizer(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                 checkpoint: str | os.PathLike | None = None, *, net: CoordinateLSTM | None = None,
                 lr: float = 1.0) -> None:
        if (checkpoint is None) == (net is None):
            raise ValueError("give exactly one of checkpoint= (a LearningToLearn checkpoint) or net=")
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        super().__init__(params, {"lr": lr})
        self.net = (load_coordinate_lstm(checkpoint) if net is None else net).requires_grad_(False)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LearnedOptimizer does not support sparse gradients")
                net = self._net_like(p)
                state = self.state[p]
                if not state:
                    state["h"], state["c"] = net.init_state(p)
                update, (state["h"], state["c"]) = net(p.grad.reshape(-1).to(p.dtype), (state["h"], state["c"]))
                p.add_(update.view_as(p), alpha=group["lr"])
        return loss

    def _net_like(self, p: Tensor) -> CoordinateLSTM:
        first = next(self.net.parameters())
        if first.device != p.device or first.dtype != p.dtype:
            self.net.to(device=p.device, dtype=p.dtype)
        return self.net

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["net"] = {"config": self.net.config(), "weights": self.net.state_dict()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        net = state_dict.pop("net", None)
        if net is not None:
            if net["config"] != self.net.config():
                self.net = CoordinateLSTM(**net["config"]).requires_grad_(False)
            self.net.load_state_dict(net["weights"])
        super().load_state_dict(state_dict)
