"""Optimizee families for learned optimizers (Andrychowicz et al. 2016, section 3).

A "task" here is one function f(θ) to minimise from a starting point θ_0, with θ a flat
vector of ``num_params`` numbers. A family draws functions (their data and θ_0) and
says how to evaluate one: ``loss(theta, x, y)``. Anything with those two methods works;
subclass :class:`OptimizeeFamily` and name it in the config::

    data:
      class_path: lit_meta.data.OptimizeeDataModule
      init_args:
        family:
          class_path: lit_meta.data.optimizees.Quadratic
          init_args: {dim: 10}

The family's class path and arguments go into ``task_spec["optimizee"]``, so a learned
optimizer's checkpoint can rebuild the family it was trained on (:func:`build_family`).

- :class:`Quadratic`: f(θ) = ‖Wθ − y‖² with W ∈ R^{d×d}, y ∈ R^d i.i.d. Gaussian (the paper's 10-dim family).
- :class:`MLPClassification`: cross-entropy of a one-hidden-layer MLP (20 sigmoid units,
  as the paper's MNIST net) on a generated Gaussian-mixture classification problem, full batch.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_meta.data.base import EpisodicDataModule, check_positive
from lit_meta.tasks import TaskBatch, task_spec


@dataclass
class OptimizeeBatch(TaskBatch):
    """A :class:`TaskBatch` of functions: the data of each (support = query: the objective
    is the training loss itself) and its starting point ``theta0`` ``[tasks, P]``."""

    theta0: Tensor


class OptimizeeFamily:
    """Base class of optimizee families. ``init_args`` rebuilds the family (see :func:`build_family`)."""

    name = "optimizee"
    kind = "regression"

    def __init__(self, **init_args: Any) -> None:
        self.init_args = init_args

    @property
    def num_params(self) -> int:
        raise NotImplementedError

    def sample(self, generator: torch.Generator, num: int) -> OptimizeeBatch:
        """``num`` functions and their starting points, using only ``generator``."""
        raise NotImplementedError

    def loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """f(θ) of one function (``x``, ``y`` are its rows of the batch); ``vmap`` batches it."""
        raise NotImplementedError

    def batch(self, x: Tensor, y: Tensor, theta0: Tensor) -> OptimizeeBatch:
        return OptimizeeBatch(x, y, x, y, theta0)


class Quadratic(OptimizeeFamily):
    """f(θ) = ‖Wθ − y‖², W and y standard normal, θ_0 ~ N(0, ``init_std``²)."""

    name = "quadratic"

    def __init__(self, dim: int = 10, init_std: float = 0.01) -> None:
        check_positive("dim", dim)
        super().__init__(dim=dim, init_std=init_std)
        self.dim, self.init_std = dim, init_std

    @property
    def num_params(self) -> int:
        return self.dim

    def sample(self, generator: torch.Generator, num: int) -> OptimizeeBatch:
        w = torch.randn(num, self.dim, self.dim, generator=generator)
        y = torch.randn(num, self.dim, generator=generator)
        theta0 = self.init_std * torch.randn(num, self.dim, generator=generator)
        return self.batch(w, y, theta0)

    def loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return ((x @ theta - y) ** 2).sum()


class MLPClassification(OptimizeeFamily):
    """Cross-entropy of ``inputs``-``hidden``(sigmoid)-``classes`` MLP on its own generated data.

    Each function draws ``clusters`` Gaussian blobs per class (centres ~ N(0, ``spread``² I),
    points = centre + N(0, I)), ``samples`` points in all, and a PyTorch-default start
    (U(±1/√fan_in)). Blobs of one class are not contiguous, so the hidden layer matters;
    they overlap and there are more points than parameters, so the loss has a floor
    above zero (the net cannot just memorise).
    """

    name = "mlp"
    kind = "classification"

    def __init__(self, inputs: int = 10, hidden: int = 20, classes: int = 5, samples: int = 512,
                 clusters: int = 2, spread: float = 1.0) -> None:
        for key, value in (("inputs", inputs), ("hidden", hidden), ("classes", classes),
                           ("samples", samples), ("clusters", clusters)):
            check_positive(key, value)
        super().__init__(inputs=inputs, hidden=hidden, classes=classes, samples=samples,
                         clusters=clusters, spread=spread)
        self.inputs, self.hidden, self.classes = inputs, hidden, classes
        self.samples, self.clusters, self.spread = samples, clusters, spread
        self.shapes = [(hidden, inputs), (hidden,), (classes, hidden), (classes,)]

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def sample(self, generator: torch.Generator, num: int) -> OptimizeeBatch:
        blobs = self.classes * self.clusters
        centres = self.spread * torch.randn(num, blobs, self.inputs, generator=generator)
        blob = torch.randint(blobs, (num, self.samples), generator=generator)
        x = centres.gather(1, blob[..., None].expand(-1, -1, self.inputs))
        x = x + torch.randn(num, self.samples, self.inputs, generator=generator)
        y = blob % self.classes
        parts = []
        for shape, fan_in in zip(self.shapes, (self.inputs, self.inputs, self.hidden, self.hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            parts.append((2 * torch.rand(num, math.prod(shape), generator=generator) - 1) * bound)
        return self.batch(x, y, torch.cat(parts, dim=1))

    def unflatten(self, theta: Tensor) -> list[Tensor]:
        sizes = [math.prod(s) for s in self.shapes]
        return [t.reshape(s) for t, s in zip(theta.split(sizes), self.shapes)]

    def loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        w1, b1, w2, b2 = self.unflatten(theta)
        return F.cross_entropy(torch.sigmoid(x @ w1.T + b1) @ w2.T + b2, y)


def family_spec(family: OptimizeeFamily) -> dict[str, Any]:
    # Not "class_path"/"init_args": jsonargparse would instantiate such a dict inside task_spec.
    cls = type(family)
    return {"family": f"{cls.__module__}.{cls.__qualname__}", "args": dict(family.init_args)}


def build_family(spec: dict[str, Any]) -> OptimizeeFamily:
    """The inverse of :func:`family_spec` (``task_spec["optimizee"]``)."""
    module, _, name = spec["family"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import optimizee family {spec['family']!r}: {error}") from None
    return cls(**spec.get("args", {}))


class OptimizeeDataModule(EpisodicDataModule):
    """Functions of ``family``: training step ``s`` draws ``meta_batch_size`` fresh ones; the
    val/test functions are fixed (held out: drawn from seeds training never uses)."""

    name = "optimizees"

    def __init__(self, family: OptimizeeFamily | None = None, meta_batch_size: int = 128,
                 val_tasks: int = 128, test_tasks: int = 512, **kwargs: Any) -> None:
        super().__init__(meta_batch_size=meta_batch_size, val_tasks=val_tasks, test_tasks=test_tasks, **kwargs)
        self.family = Quadratic() if family is None else family
        if not isinstance(self.family, OptimizeeFamily):
            raise ValueError(f"family must be an OptimizeeFamily, got {type(self.family).__name__}")

    @property
    def task_spec(self) -> dict[str, Any]:
        f = self.family
        return task_spec(f.name, f.kind, [f.num_params], ways=1, optimizee=family_spec(f))

    def sample_tasks(self, split: str, generator: torch.Generator, num_tasks: int) -> OptimizeeBatch:
        return self.family.sample(generator, num_tasks)
