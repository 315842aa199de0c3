"""A CPU rehearsal of the GPU path: an algorithm's step with the model and the data on a device
that is not the host.

On a CPU every tensor is a host tensor, so code that makes a tensor on the host inside a
step and copies it to the device, or reads a device value on the host, runs as fast as
any other and no test sees it; on a GPU each such place makes the host wait for the
device, every step. PyTorch's ``meta`` device stands in for the GPU here: its tensors
have shapes and no values, and live on a device other than the CPU. With the model and
the data on it, :func:`device_boundary` makes each of these an error that names the
innermost lit_meta line (``file:line in function``):

- a copy from the host to the device that the host would wait for: ``Tensor.to``,
  ``copy_`` or ``torch.tensor(..., device=...)`` from host memory without
  ``non_blocking=True`` (``lit_meta.devices.to_device`` is the way that does not wait);
- a copy from the device to the host (``.cpu()``, ``.tolist()``, ``.numpy()``) and any read
  of a device value (``.item()``, ``bool()``, ``int()``, ``float()``, a Python branch on a
  tensor);
- a host tensor with elements mixed into device computation (torch raises for that on
  its own; a 0-dim host tensor is a scalar argument on CUDA too, and allowed).

Meta tensors cost nothing to compute, so every algorithm is rehearsed in the default test
tier, under a second each (:func:`rehearse`: meta-steps as ``training_step`` takes them,
then an evaluation batch; tests/test_rehearsal.py). What it cannot see: Lightning's own
code around the step (its loops, logging and progress bar read values on logging steps),
which :class:`lit_meta.sync_guard.SyncWindow` records on a real CPU fit and, on a GPU,
``benchmarks/gpu_check.py`` under ``torch.cuda.set_sync_debug_mode``.
"""
from __future__ import annotations

import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from lit_meta.internals import COPY_INTO, TO_COPY, VALUE_READ_OPS, TorchDispatchMode
from lit_meta.sync_guard import HostSyncError, innermost_frame, no_host_sync

DEVICE = torch.device("meta")


def _device_of(value: Any) -> torch.device | None:
    return value.device if isinstance(value, Tensor) else None


class DeviceBoundary(TorchDispatchMode):
    """Raises :class:`~lit_meta.sync_guard.HostSyncError` where a step crosses between the host
    and ``device`` in a way that would make a CUDA host wait (see the module docstring)."""

    def __init__(self, device: torch.device = DEVICE) -> None:
        super().__init__()
        self.device = device

    def fail(self, what: str) -> None:
        raise HostSyncError(f"{what} at {innermost_frame(traceback.extract_stack())}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        on_device = [t for t in tensors if t.device == self.device]
        if func in VALUE_READ_OPS and on_device:
            self.fail(f"host read of a {self.device.type} tensor's value ({func.__name__})")
        if func is TO_COPY and args and isinstance(args[0], Tensor):
            source, target = args[0].device, kwargs.get("device") or args[0].device
            if source.type == "cpu" and target == self.device and not kwargs.get("non_blocking", False):
                self.fail(f"blocking copy of a host tensor {list(args[0].shape)} to {self.device.type}")
            if source == self.device and target.type == "cpu":
                self.fail(f"copy of a {self.device.type} tensor to the host")
        elif func is COPY_INTO and len(args) >= 2:
            dst, src = _device_of(args[0]), _device_of(args[1])
            blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
            if dst == self.device and src is not None and src.type == "cpu" and blocking:
                self.fail(f"blocking copy of a host tensor {list(args[1].shape)} into a {self.device.type} tensor")
            if src == self.device and dst is not None and dst.type == "cpu":
                self.fail(f"copy of a {self.device.type} tensor to the host")
        elif on_device:
            host = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
            if host:
                self.fail(f"host tensor {list(host[0].shape)} mixed into {self.device.type} computation "
                          f"({func.__name__})")
        return func(*args, **kwargs)


@contextmanager
def device_boundary(device: torch.device = DEVICE) -> Iterator[None]:
    """Inside the block, the host/device crossings of the module docstring raise."""
    # the function-level guard names .tolist()/.cpu()/printing of device tensors; the dispatch
    # mode sees every op, inside vmap and the autograd engine too
    with no_host_sync(strict=False), DeviceBoundary(device):
        yield


@dataclass
class Rehearsal:
    """What :func:`rehearse` ran: the parts (``"training step 0"``, ..., ``"evaluation"``), and
    the first crossing, if one happened (``None``: none)."""

    parts: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def rehearse(model: torch.nn.Module, train_batch: Callable[[int], Any], eval_batch: Any | None = None,
             steps: int = 2, split: str = "test") -> Rehearsal:
    """Move ``model`` to the meta device and take ``steps`` meta-steps on ``train_batch(step)``
    (a host or meta batch; a host one crosses as Lightning's transfer does, ``TaskBatch.to``),
    then evaluate ``eval_batch`` as a ``split`` batch (the test split also records the curves
    after every inner step), all under :func:`device_boundary`. Returns what ran and the first
    crossing instead of raising it."""
    model = model.to(DEVICE)
    report = Rehearsal()
    try:
        for step in range(steps):
            with device_boundary():
                batch = train_batch(step).to(DEVICE)
                model.outer_update(batch)
            report.parts.append(f"training step {step}")
        if eval_batch is not None:
            model.eval_sums.reset()
            model.begin_evaluation(split)
            step = model.test_step if split == "test" else model.validation_step
            with device_boundary():
                step(eval_batch.to(DEVICE), 0)
            report.parts.append("evaluation")
    except HostSyncError as error:
        report.error = str(error)
    return report


# ----------------------------------------------------------------------------- every algorithm
WAYS, SHOTS, QUERIES, TASKS = 3, 2, 2, 2


def meta_pool(classes: int = 6, per_class: int = 5, size: int = 8) -> Any:
    """An image pool on the meta device, as an image DataModule's ``setup`` puts it on the GPU."""
    from lit_meta.data.class_pools import ClassPool

    images = torch.zeros(classes * per_class, 1, size, size, dtype=torch.uint8, device=DEVICE)
    return ClassPool(images, torch.full((classes,), per_class), [f"c{i}" for i in range(classes)])


def episodes(pool: Any, labels: bool = False) -> Callable[[int], Any]:
    """``step -> meta-batch`` drawn on the pool's device by the DataModules' own sampler."""
    from lit_meta.data.class_pools import sample_episodes

    def draw(step: int) -> Any:
        generator = torch.Generator().manual_seed(step)
        return sample_episodes(pool, generator, TASKS, WAYS, SHOTS, QUERIES, [0.5], [0.25], labels=labels)

    return draw


# name -> (algorithm class name in lit_meta.algorithms, options): every algorithm, and the options
# that take another code path in the step (chunks, Gradient Agreement, checkpointing, clipping,
# inner mini-batches, per-step BatchNorm, carried inner state)
IMAGE_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "maml": ("MAML", {"inner_steps": 2}),
    "fomaml": ("MAML", {"first_order": True}),
    "maml_gradient_agreement_chunked": ("MAML", {"weighting": "gradient_agreement", "task_chunk_size": 1}),
    "maml_checkpointed_clipped": ("MAML", {"inner_steps": 2, "inner_checkpointing": True, "grad_clip": 1.0,
                                           "grad_clip_value": 0.5}),
    "maml_inner_mini_batches": ("MAML", {"inner_batch_size": 2, "eval_inner_batch_size": 2,
                                         "inner_loss_reduction": "sum_over_shots"}),
    "anil": ("ANIL", {}),
    "metasgd": ("MetaSGD", {}),
    "mamlpp_msl_bnrs_per_example": ("MAMLpp", {"inner_steps": 2, "transductive": False}),
    "mamlpp_support_bn": ("MAMLpp", {"inner_steps": 2, "transductive": "support", "first_order_epochs": 1}),
    "reptile_carried_adam": ("Reptile", {"inner_steps": 2, "persistent_inner_state": True}),
    "metalstm": ("MetaLSTM", {"inner_steps": 2, "transductive": "support"}),
    "protonet": ("ProtoNet", {}),
    "protonet_cosine_per_example": ("ProtoNet", {"distance": "cosine", "transductive": False}),
    "r2d2": ("R2D2", {"learn_lambda": True, "transductive": "support"}),
    "imaml": ("IMAML", {"inner_steps": 2, "cg_steps": 2}),
    "boil": ("BOIL", {"inner_steps": 2}),
    "metabaseline": ("MetaBaseline", {}),
    "maml_resnet12": ("MAML", {"backbone": "resnet12",
                               "backbone_kwargs": {"channels": [4, 4, 4, 4], "drop_rate": 0.1}}),
}
OTHER_CASES = ("transfer", "maml_sine_host_batches", "reptile_sine_host_batches", "learning_to_learn")
CASES = (*IMAGE_CASES, *OTHER_CASES)


def build_case(name: str) -> tuple[torch.nn.Module, Callable[[int], Any], Any, str]:
    """(model, ``step -> batch``, evaluation batch, split) of rehearsal case ``name`` (:data:`CASES`)."""
    import lit_meta.algorithms as algorithms
    from lit_meta.data.optimizees import OptimizeeDataModule
    from lit_meta.data.sine import SineDataModule
    from lit_meta.tasks import task_spec

    spec = task_spec("rehearsal", "classification", [1, 8, 8], WAYS)
    small = {"backbone_kwargs": {"filters": 4}, "meta_batch_size": TASKS}
    if name in IMAGE_CASES:
        cls, options = IMAGE_CASES[name]
        size = 16 if options.get("backbone") == "resnet12" else 8  # four 2x2 poolings
        draw = episodes(meta_pool(size=size))
        spec = task_spec("rehearsal", "classification", [1, size, size], WAYS)
        return getattr(algorithms, cls)(task_spec=spec, **{**small, **options}), draw, draw(100), "test"
    if name == "transfer":  # pre-training on the global labels of the episodes
        pool = meta_pool()
        model = algorithms.Transfer(task_spec={**spec, "train_classes": pool.num_classes}, **small)
        return model, episodes(pool, labels=True), episodes(pool)(100), "test"
    if name.endswith("_sine_host_batches"):  # drawn on the host; Lightning's transfer moves them
        dm = SineDataModule(meta_batch_size=TASKS, eval_batch_size=TASKS)
        cls = algorithms.MAML if name.startswith("maml") else algorithms.Reptile
        return cls(task_spec=dm.task_spec, meta_batch_size=TASKS), dm.train_batch, dm.eval_batch("val", 0), "test"
    if name == "learning_to_learn":
        dm = OptimizeeDataModule(meta_batch_size=4, val_tasks=4)
        model = algorithms.LearningToLearn(task_spec=dm.task_spec, meta_batch_size=4, unroll=4, truncation=2,
                                           eval_steps=3)
        return model, dm.train_batch, dm.eval_batch("val", 0), "val"  # (test tunes the baselines on the host)
    raise ValueError(f"unknown rehearsal case {name!r}; the cases are {', '.join(CASES)}")


def rehearse_case(name: str) -> Rehearsal:
    model, draw, evaluation, split = build_case(name)
    return rehearse(model, draw, evaluation, split=split)
