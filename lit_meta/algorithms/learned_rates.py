"""Meta-learned inner learning rates, one tensor per adapted parameter.

Meta-SGD (Li et al. 2017) learns a rate per parameter entry (each tensor shaped as its
parameter); MAML++'s LSLR (Antoniou et al. 2019) a rate per parameter tensor and inner
step (each tensor ``[steps]``). Both are this ParameterDict, so its checkpoint keys are
``inner_lrs.<parameter name with "." as "__">`` in both.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def lr_key(name: str) -> str:
    """ParameterDict keys cannot hold dots."""
    return name.replace(".", "__")


class LearnedRates(nn.ParameterDict):
    def __init__(self, initial: dict[str, Tensor], learn: bool = True) -> None:
        """``initial``: parameter name -> the rate tensor's starting value; ``learn``: whether the meta-step trains them."""
        super().__init__({lr_key(n): nn.Parameter(t, requires_grad=learn) for n, t in initial.items()})

    def of(self, name: str) -> nn.Parameter:
        """The rates of the parameter called ``name`` (in the network's ``named_parameters``)."""
        return self[lr_key(name)]

    def replace(self, name: str, value: Tensor, learn: bool = False) -> None:
        """New rates for ``name`` (e.g. a head of another width)."""
        self[lr_key(name)] = nn.Parameter(value, requires_grad=learn)

    @torch.no_grad()
    def fill_(self, rate: float) -> None:
        """Every learned rate set to ``rate`` (``--inner_lr`` at adaptation)."""
        for p in self.values():
            p.fill_(rate)
