"""The shared meta-step: every algorithm's outer update goes through :class:`MetaStep`.

1. It takes the per-task outer contributions (query losses, or per-task gradient-like
   tensors such as Reptile's θ − θ'_i) and the per-task inner updates g_i = θ − θ'_i.
2. It weights the tasks: ``uniform`` (the mean) or ``gradient_agreement``
   (Eshratifar et al. 2018, "Gradient Agreement as an Optimization Objective for
   Meta-Learning"): w_i = Σ_j g_i·g_j / Σ_k Σ_j |g_k·g_j|.
3. It writes ``.grad`` = Σ_i w_i × (task i's outer gradient), clips it (by norm and/or by
   value) and steps the meta-optimizer through the divergence guard
   (:mod:`lit_meta.nonfinite`): a step whose meta-loss or resulting weights are not finite
   is undone on the device and counted.

Weights are detached, so for losses the weighted meta-gradient is one backward pass of
Σ_i w_i L_i. Under DDP the weights are global: the updates of all ranks are gathered
for the Gram matrix, each rank keeps the weights of its own tasks, and the local loss is
scaled by the world size because DDP averages the ranks' gradients.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from lit_meta.internals import attached_trainer, grad_scaler_scale
from lit_meta.nonfinite import NonFiniteGuard

if TYPE_CHECKING:
    import pytorch_lightning as pl

WEIGHTINGS = ("uniform", "gradient_agreement")
Params = dict[str, Tensor]


def _grad_scaler(module: "pl.LightningModule") -> "torch.amp.GradScaler | None":
    """Lightning's GradScaler under 16-mixed, else None."""
    return getattr(module.trainer.precision_plugin, "scaler", None)


def flatten_tasks(per_task: Params) -> Tensor:
    """``{name: [T, ...]}`` -> ``[T, P]``."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in per_task.values()], dim=1)


def _no_autocast(device_type: str) -> AbstractContextManager:
    """Autocast off on ``device_type`` (a device without autocast, e.g. ``meta``, has none to turn off)."""
    return torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) else nullcontext()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gradient_agreement_weights(updates: Tensor, eps: float = 1e-12) -> Tensor:
    """w_i = Σ_j g_i·g_j / Σ_k Σ_j |g_k·g_j| for rows g_i of ``updates`` ([T, P])."""
    gram = updates @ updates.T
    return gram.sum(1) / gram.abs().sum().clamp_min(eps)


def task_weights(weighting: str, inner_updates: Tensor | None, num_local: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Detached weights of this rank's ``num_local`` tasks, normalised over the global meta-batch,
    on ``device`` (default: the updates', else the CPU)."""
    world = dist.get_world_size() if _distributed() else 1
    if weighting == "uniform":
        if device is None and inner_updates is not None:
            device = inner_updates.device
        # filled where it is used: a host tensor moved there would be a blocking copy every step
        return torch.full((num_local,), 1.0 / (num_local * world), device=device, dtype=dtype)
    if inner_updates is None:
        raise ValueError("weighting 'gradient_agreement' needs the per-task inner updates")
    # At least fp32: under 16-mixed the dot products of small updates underflow in half.
    updates = inner_updates.detach().to(torch.promote_types(inner_updates.dtype, torch.float32))
    if world > 1:
        gathered = [torch.empty_like(updates) for _ in range(world)]
        dist.all_gather(gathered, updates.contiguous())
        rank = dist.get_rank()
        weights = gradient_agreement_weights(torch.cat(gathered))
        return weights[rank * num_local : (rank + 1) * num_local]
    return gradient_agreement_weights(updates)


class MetaStep:
    def __init__(self, weighting: str = "uniform", grad_clip: float | None = None,
                 grad_clip_value: float | None = None, max_nonfinite: int = 10) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0, got {grad_clip}")
        if grad_clip_value is not None and grad_clip_value <= 0:
            raise ValueError(f"grad_clip_value must be > 0, got {grad_clip_value}")
        self.weighting = weighting
        self.grad_clip = grad_clip
        # each gradient entry clamped to ±value (cbfinn/maml and HowToTrainYourMAMLPytorch on miniImageNet: 10)
        self.grad_clip_value = grad_clip_value
        self._skipped: Tensor | int = 0  # a device tensor under 16-mixed: no host sync per step
        self.guard = NonFiniteGuard(max_nonfinite)
        self._standalone_steps = 0  # the step index outside a Trainer

    @property
    def skipped_steps(self) -> int:
        """Meta-steps GradScaler skipped for inf/NaN gradients (reading it syncs the device)."""
        return int(self._skipped)

    def __call__(
        self,
        module: "pl.LightningModule",
        inner_updates: Params | None,
        query_losses: Tensor | None = None,
        task_grads: Params | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> Tensor:
        """One outer update. Give ``query_losses`` ([T], differentiable) and/or
        ``task_grads`` ({name: [T, ...]} for parameters of ``module``). Returns the weights.

        ``optimizer`` defaults to the module's Lightning optimizer, or outside a Trainer to
        ``module.standalone_optimizer()``; there the backward is a plain ``Tensor.backward``.
        The same update in pieces (bounded memory): ``weights``, ``begin``, one
        ``accumulate`` per chunk of tasks, ``finish``."""
        contribution = query_losses if query_losses is not None else next(iter(task_grads.values()))
        weights = self.weights(inner_updates, contribution.shape[0], contribution)
        optimizer = self.begin(module, optimizer)
        self.accumulate(module, weights, query_losses, task_grads)
        self.finish(module, optimizer, weights)
        return weights

    def weights(self, inner_updates: Params | None, num_local: int, like: Tensor) -> Tensor:
        """Detached weights of this rank's ``num_local`` tasks (dtype at least fp32, on ``like``'s device)."""
        flat = flatten_tasks(inner_updates) if inner_updates and self.weighting != "uniform" else None
        dtype = torch.promote_types(like.dtype, torch.float32)
        return task_weights(self.weighting, flat, num_local, dtype, like.device)

    def begin(self, module: "pl.LightningModule",
              optimizer: torch.optim.Optimizer | None = None) -> torch.optim.Optimizer:
        if optimizer is None:
            optimizer = module.optimizers() if attached_trainer(module) is not None else module.standalone_optimizer()
        optimizer.zero_grad(set_to_none=True)
        self.guard.begin()
        return optimizer

    def accumulate(self, module: "pl.LightningModule", weights: Tensor, query_losses: Tensor | None = None,
                   task_grads: Params | None = None) -> None:
        """Add Σ_i w_i × (task i's outer gradient) to ``.grad`` for the tasks given."""
        world = dist.get_world_size() if _distributed() else 1
        attached = attached_trainer(module) is not None
        scaler = _grad_scaler(module) if attached else None
        if query_losses is not None:
            # One backward, one DDP all-reduce. DDP averages over ranks, hence × world.
            loss = world * (weights.to(query_losses.dtype) * query_losses).sum()
            self.guard.note(loss)
            module.manual_backward(loss) if attached else loss.backward()
        if task_grads is not None:
            named = dict(module.named_parameters())
            for name, per_task in task_grads.items():
                # at least fp32 and outside autocast: under 16-mixed an autocast einsum would round
                # the written gradient to fp16 (and flush its small entries) before it is scaled
                dtype = torch.promote_types(per_task.dtype, torch.float32)
                with _no_autocast(per_task.device.type):
                    g = torch.einsum("t,t...->...", weights.to(dtype), per_task.detach().to(dtype))
                self.guard.note(g)
                if scaler is not None:
                    # the scaler's step unscales every .grad, so written ones must be scaled too
                    # (scale() multiplies on the device: get_scale() would sync the host)
                    g = scaler.scale(g)
                if world > 1:
                    dist.all_reduce(g)
                p = named[name]
                g = g.to(p.dtype)  # under autocast the inner loop may hand back low-precision updates
                p.grad = g if p.grad is None else p.grad + g

    def finish(self, module: "pl.LightningModule", optimizer: torch.optim.Optimizer, weights: Tensor) -> None:
        """Clip, step the meta-optimizer, log the weights.

        Under a Trainer the clipping happens inside the optimizer step, in the module's
        ``on_before_optimizer_step`` (:meth:`clip`): Lightning's precision plugin calls that
        hook after it has unscaled the fp16 gradients, and unscales exactly once per step
        (a second ``unscale_`` raises). Without a Trainer there is no scaler: clip here."""
        attached = attached_trainer(module) is not None
        scaler = _grad_scaler(module) if attached else None
        if not attached:
            self.clip(module)
        scale = grad_scaler_scale(scaler) if scaler is not None else None
        scale = scale.clone() if scale is not None else None
        if attached:
            step = module.trainer.global_step  # this step's index (the optimizer has not stepped yet)
        else:
            step, self._standalone_steps = self._standalone_steps, self._standalone_steps + 1
        self.guard.step(optimizer, step)  # optimizer.step(), undone if the result is not finite
        if scale is not None:
            # GradScaler lowers its scale when it finds inf/NaN in the fp16 gradients and
            # skips the step; compared on the device, so a CUDA step never waits on the host
            self._skipped = self._skipped + (grad_scaler_scale(scaler) < scale).to(torch.int64)
        self._log(module, weights)

    def clip(self, module: "pl.LightningModule") -> None:
        """Clip the meta-gradient (by value, then by norm), which must be unscaled by now."""
        if self.grad_clip_value is not None:
            torch.nn.utils.clip_grad_value_(module.parameters(), self.grad_clip_value)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.grad_clip)

    def _log(self, module: "pl.LightningModule", weights: Tensor) -> None:
        if attached_trainer(module) is None or not getattr(module, "logging_step", lambda: True)():
            return
        w = weights.detach().float()
        # filled on the weights' device: a host tensor here would be copied to the GPU, and wait, every log
        skipped = self._skipped.float() if isinstance(self._skipped, Tensor) else torch.full(
            (), float(self._skipped), device=w.device)
        module.log_dict(
            {"meta/weight_min": w.min(), "meta/weight_max": w.max(), "meta/weight_spread": w.max() - w.min(),
             "meta/skipped_steps": skipped, "train/nonfinite_skipped": self.guard.skipped_tensor(w)},
            on_step=True,
            on_epoch=False,
        )
