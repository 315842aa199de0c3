"""The networks of the two learned optimizers; no training logic.

Both work coordinate-wise: every parameter coordinate of the optimizee is one row of a
batch, all rows share the LSTM's weights and each row has its own hidden state. So the
optimizer's size does not depend on the optimizee's, and inputs are ``[N]`` vectors of
coordinates (``vmap`` adds the task dimension).

- :class:`CoordinateLSTM`: m(∇; φ) of Andrychowicz et al. 2016, "Learning to learn by
  gradient descent by gradient descent": two LSTM layers of 20 units, a linear read-out
  scaled by 0.1, and the step θ_{t+1} = θ_t + g_t.
- :class:`MetaLSTMCell`: the meta-learner of Ravi & Larochelle 2017, "Optimization as a
  Model for Few-Shot Learning": a plain LSTM layer over the preprocessed gradient and
  loss, then a cell whose state *is* the learner's parameters,
  c_t = f_t ⊙ c_{t−1} + i_t ⊙ (−∇_t).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def preprocess(x: Tensor, p: float = 10.0) -> Tensor:
    """Andrychowicz et al. 2016, appendix A: ``[...]`` -> ``[..., 2]``.

    (log|x| / p, sign x) when |x| ≥ e^−p, else (−1, e^p · x). Gradients span many orders
    of magnitude; this keeps both the scale and the sign in a range an LSTM can read.
    """
    small = x.abs() < math.exp(-p)
    # The clamp keeps log (and its derivative) finite where the branch is not taken.
    log = torch.log(x.abs().clamp_min(math.exp(-p))) / p
    first = torch.where(small, torch.full_like(x, -1.0), log)
    second = torch.where(small, math.exp(p) * x, torch.sign(x))
    return torch.stack([first, second], dim=-1)


class LSTMCell(nn.Module):
    """A standard LSTM cell on ``[N, in]`` rows (written out so it runs under ``vmap``)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.linear = nn.Linear(input_size + hidden_size, 4 * hidden_size)
        bound = 1.0 / math.sqrt(hidden_size)
        nn.init.uniform_(self.linear.weight, -bound, bound)
        nn.init.uniform_(self.linear.bias, -bound, bound)

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        gates = self.linear(torch.cat([x, h], dim=-1))
        n = self.hidden_size
        i, f, o = torch.sigmoid(gates[..., : 3 * n]).chunk(3, dim=-1)  # one call: these are large, cheap ops
        c = f * c + i * torch.tanh(gates[..., 3 * n :])
        h = o * torch.tanh(c)
        return h, c


LSTMState = tuple[Tensor, Tensor]  # (h, c), each [layers, N, hidden]


class CoordinateLSTM(nn.Module):
    """m(∇; φ): preprocessed gradient coordinate -> step. ``forward(grad [N], state)``."""

    def __init__(self, hidden_size: int = 20, num_layers: int = 2, output_scale: float = 0.1,
                 preprocess_p: float = 10.0) -> None:
        super().__init__()
        if hidden_size < 1 or num_layers < 1:
            raise ValueError(f"hidden_size and num_layers must be >= 1, got {hidden_size}, {num_layers}")
        if output_scale <= 0 or preprocess_p <= 0:
            raise ValueError(f"output_scale and preprocess_p must be > 0, got {output_scale}, {preprocess_p}")
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.output_scale, self.preprocess_p = output_scale, preprocess_p
        self.cells = nn.ModuleList(LSTMCell(2 if k == 0 else hidden_size, hidden_size) for k in range(num_layers))
        self.out = nn.Linear(hidden_size, 1)

    def config(self) -> dict[str, float]:
        return {"hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "output_scale": self.output_scale, "preprocess_p": self.preprocess_p}

    def init_state(self, like: Tensor) -> LSTMState:
        """Zero state for the coordinates of ``like`` (any shape; ``numel`` rows)."""
        zeros = like.new_zeros(self.num_layers, like.numel(), self.hidden_size)
        return zeros, zeros.clone()

    def forward(self, grad: Tensor, state: LSTMState) -> tuple[Tensor, LSTMState]:
        x = preprocess(grad, self.preprocess_p)
        hs, cs = [], []
        for k, cell in enumerate(self.cells):
            h, c = cell(x, state[0][k], state[1][k])
            hs.append(h)
            cs.append(c)
            x = h
        step = self.output_scale * self.out(x).squeeze(-1)
        return step, (torch.stack(hs), torch.stack(cs))


MetaLSTMState = tuple[Tensor, Tensor, Tensor, Tensor]  # h [N, hidden], c [N, hidden], f [N], i [N]


class MetaLSTMCell(nn.Module):
    """Ravi & Larochelle's meta-learner: gates (f_t, i_t) for every learner coordinate.

    Layer 1 is a plain LSTM over [preprocessed ∇_t, preprocessed L_t]; its output h_t
    feeds f_t = σ(W_F [h_t, θ_{t−1}, f_{t−1}] + b_F) and i_t = σ(W_I [h_t, θ_{t−1}, i_{t−1}] + b_I).
    The biases start so that f ≈ ``init_forget`` (keep the parameters) and i ≈ ``init_lr``
    (a small gradient step): training begins as plain gradient descent. With
    ``gate_preactivation`` the previous gates enter before their sigmoid (f_{t−1} and i_{t−1}
    above are then the pre-activations, as in the authors' code).
    """

    def __init__(self, hidden_size: int = 20, preprocess_p: float = 10.0, init_lr: float = 0.01,
                 init_forget: float = 0.995, gate_preactivation: bool = False) -> None:
        super().__init__()
        for name, value in (("init_lr", init_lr), ("init_forget", init_forget)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value}")
        self.hidden_size, self.preprocess_p = hidden_size, preprocess_p
        self.gate_preactivation = gate_preactivation
        self.lstm = LSTMCell(4, hidden_size)
        # Both gates read [h_t, θ_{t−1}, own previous value]: W_F and W_I stacked as one
        # linear map of h_t plus per-gate weights of the two scalars (no [N, hidden + 2] copies).
        self.from_h = nn.Linear(hidden_size, 2)
        self.from_theta = nn.Parameter(torch.empty(2))
        self.from_prev = nn.Parameter(torch.empty(2))
        for w in (self.from_h.weight, self.from_theta, self.from_prev):
            nn.init.uniform_(w, -0.01, 0.01)
        with torch.no_grad():
            self.from_h.bias.copy_(torch.tensor([init_forget, init_lr]).logit())

    def init_state(self, like: Tensor) -> MetaLSTMState:
        n = like.numel()
        return (like.new_zeros(n, self.hidden_size), like.new_zeros(n, self.hidden_size),
                like.new_zeros(n), like.new_zeros(n))

    def forward(self, grad: Tensor, loss: Tensor, theta: Tensor,
                state: MetaLSTMState) -> tuple[Tensor, Tensor, MetaLSTMState]:
        """``grad``, ``theta``: ``[N]``; ``loss``: scalar. Returns (f_t, i_t, state)."""
        h, c, f_prev, i_prev = state
        g = preprocess(grad, self.preprocess_p)
        l = preprocess(loss, self.preprocess_p).expand(grad.shape[0], 2)
        h, c = self.lstm(torch.cat([g, l], dim=-1), h, c)
        prev = torch.stack([f_prev, i_prev], dim=-1)
        z = self.from_h(h) + theta[:, None] * self.from_theta + prev * self.from_prev
        f, i = torch.sigmoid(z).unbind(-1)
        if self.gate_preactivation:
            return f, i, (h, c, *z.unbind(-1))
        return f, i, (h, c, f, i)
