"""The learn2learn 0.2.0 side of a benchmark :class:`~lit_meta.bench.case.Case`.

- MAML / FOMAML: the loop of learn2learn's ``examples/vision/maml_omniglot.py``:
  ``zero_grad``; for each of the meta-batch's tasks ``maml.clone()``, draw one task, split
  it into adaptation/evaluation halves per class, ``learner.adapt(loss)`` ``inner_steps``
  times, ``evaluation_error.backward()``; then divide the gradients by the meta-batch
  size and ``opt.step()`` (Adam). The example's per-task meta-validation pass and its
  ``.item()`` metric calls are left out (our side neither validates nor logs).
- Reptile: its ``reptile_miniimagenet.py``: ``deepcopy`` the model, Adam(β1=0) on the
  support set for ``inner_steps`` steps, accumulate θ − θ', SGD meta-step.

Tasks come from learn2learn's own ``TaskDataset`` (``baseline_sampler="taskdataset"``:
its Cython transforms over a ``TensorDataset``, as its benchmarks build them) or from
plain tensor indexing (``"tensor"``, the cheapest draw there is, so a comparison is not
flattered by its sampler), over the same images as ours.

learn2learn is an optional extra (``bash benchmarks/install_learn2learn.sh``).
"""
from __future__ import annotations

import copy
import random
import warnings
from types import ModuleType
from typing import Callable

import torch
from torch import Tensor

from lit_meta.bench.case import Case, TensorTasks
from lit_meta.data.learn2learn import require_learn2learn

Draw = Callable[[], tuple[Tensor, Tensor]]


def import_learn2learn() -> ModuleType:
    """learn2learn, its import-time warnings silenced; ImportError saying how to install it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return require_learn2learn()


def task_source(case: Case, images: Tensor, seed: int) -> Draw:
    """``draw() -> (data, labels)`` for one task, class-grouped like learn2learn's
    ``ConsecutiveLabels`` output (``shots + queries`` samples per class)."""
    l2l = import_learn2learn()
    ways, k = case.ways, case.shots + case.queries
    if case.baseline_sampler == "tensor":
        gen = torch.Generator().manual_seed(seed)
        sampler = TensorTasks(images, ways, case.shots, case.queries, 1)
        labels = torch.arange(ways, device=images.device).repeat_interleave(k)

        def draw() -> tuple[Tensor, Tensor]:
            x = sampler.draw(gen, 1)[0]
            return x.reshape(ways * k, *x.shape[2:]), labels

        return draw
    from torch.utils.data import TensorDataset

    random.seed(seed)
    classes, per_class = images.shape[:2]
    flat = images.reshape(classes * per_class, *images.shape[2:])
    targets = torch.arange(classes).repeat_interleave(per_class)
    labels_to_indices = {c: list(range(c * per_class, (c + 1) * per_class)) for c in range(classes)}
    dataset = l2l.data.MetaDataset(TensorDataset(flat, targets), labels_to_indices=labels_to_indices)
    taskset = l2l.data.TaskDataset(dataset, task_transforms=[
        l2l.data.transforms.FusedNWaysKShots(dataset, n=ways, k=k),
        l2l.data.transforms.LoadData(dataset),
        l2l.data.transforms.RemapLabels(dataset),
        l2l.data.transforms.ConsecutiveLabels(dataset),
    ], num_tasks=-1)
    return taskset.sample


def build_learn2learn(case: Case, net: torch.nn.Module, images: Tensor, seed: int = 1) -> Callable[[], None]:
    """learn2learn's meta-step for the case, on a ``deepcopy`` of ``net`` (the same initial
    weights as ours) and tasks drawn from ``images`` ``[classes, per_class, C, H, W]``."""
    l2l = import_learn2learn()
    device = torch.device(case.device)
    draw = task_source(case, images, seed)
    shots, k = case.shots, case.shots + case.queries
    loss = torch.nn.CrossEntropyLoss(reduction="mean")
    net = copy.deepcopy(net).to(device)
    net.train()

    def split(data: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # Per class: the first `shots` samples adapt, the rest evaluate (for shots ==
        # queries this is the examples' even/odd split).
        data, labels = data.to(device), labels.to(device)
        adapt = torch.arange(data.shape[0], device=device) % k < shots
        return data[adapt], labels[adapt], data[~adapt], labels[~adapt]

    if case.algorithm == "reptile":
        opt = torch.optim.SGD(net.parameters(), lr=case.meta_lr)
        adapt_state = torch.optim.Adam(net.parameters(), lr=case.inner_lr, betas=(0.0, 0.999)).state_dict()

        def reptile_step() -> None:
            nonlocal adapt_state
            opt.zero_grad()
            for p in net.parameters():
                p.grad = torch.zeros_like(p.data)
            for _ in range(case.meta_batch_size):
                learner = copy.deepcopy(net)
                adapt_opt = torch.optim.Adam(learner.parameters(), lr=case.inner_lr, betas=(0.0, 0.999))
                adapt_opt.load_state_dict(adapt_state)
                ax, ay, _, _ = split(*draw())
                for _ in range(case.inner_steps):
                    adapt_opt.zero_grad()
                    loss(learner(ax), ay).backward()
                    adapt_opt.step()
                adapt_state = adapt_opt.state_dict()
                for p, q in zip(net.parameters(), learner.parameters()):
                    p.grad.data.add_(q.data, alpha=-1.0)
            for p in net.parameters():
                p.grad.data.mul_(1.0 / case.meta_batch_size).add_(p.data)
            opt.step()

        return reptile_step

    maml = l2l.algorithms.MAML(net, lr=case.inner_lr, first_order=case.is_first_order)
    opt = torch.optim.Adam(maml.parameters(), lr=case.meta_lr)

    def maml_step() -> None:
        opt.zero_grad()
        for _ in range(case.meta_batch_size):
            learner = maml.clone()
            ax, ay, ex, ey = split(*draw())
            for _ in range(case.inner_steps):
                learner.adapt(loss(learner(ax), ay))
            loss(learner(ex), ey).backward()
        for p in maml.parameters():
            p.grad.data.mul_(1.0 / case.meta_batch_size)
        opt.step()

    return maml_step
