"""Meta-training speed, side by side with learn2learn 0.2.0.

    python benchmarks/speed.py --algorithm maml --dataset omniglot --ways 5 --shots 1 \\
        --queries 1 --meta-batch-size 32 --inner-steps 1 --steps 30 --compare learn2learn

What one timed step is, for each side (wall clock, ``perf_counter``; on CUDA with a
``synchronize`` before the clock is read):

- **ours**: ``dm.train_batch(step)`` (the DataModule's own sampler: a ``torch.Generator``
  seeded for the step, batched index draws, on-device tensors), then
  ``MetaLearner.outer_update(batch)``: the vmapped inner loop (``run_tasks``) and the shared
  ``MetaStep`` (task weights, one backward, ``optimizer.step()``). That is the whole of
  ``training_step`` except ``self.log`` and the LR scheduler. No Trainer is attached: the
  module's ``optimizers()`` returns a plain Adam and ``manual_backward`` is
  ``loss.backward()``.
- **learn2learn**: the loop of its ``examples/vision/maml_omniglot.py``: ``zero_grad``;
  for each of the meta-batch's tasks ``maml.clone()``, draw one task, split it into
  adaptation/evaluation halves per class, ``learner.adapt(loss)`` ``inner_steps`` times,
  ``evaluation_error.backward()``; then divide the gradients by the meta-batch size and
  ``opt.step()``. The example's per-task meta-validation pass and its ``.item()`` metric
  calls are left out (we do not validate or log either). Reptile follows its
  ``reptile_miniimagenet.py``: ``deepcopy`` the model, Adam(β1=0) on the support set for
  ``inner_steps`` steps, accumulate θ − θ', SGD meta-step.

Both sides get the same network (``lit_meta.models.Conv4``; learn2learn gets a
``deepcopy`` with identical weights), the same task shapes, the same device, the same
meta-optimizer, the same thread count, and draw tasks from images already in memory
(no file I/O on either side). learn2learn's tasks come from its own ``TaskDataset``
(``--baseline-sampler taskdataset``, its Cython transforms over a ``TensorDataset``, as its
benchmarks build them) or from plain tensor indexing (``--baseline-sampler tensor``, the
cheapest draw there is, so the comparison is not flattered by its sampler).

The two sides alternate step by step (A B B A A B ...) after ``--warmup`` untimed steps
each, so a noisy shared machine slows both alike; the ratio is the headline figure.

Peak memory (``*_peak_mem_mb``):
- CPU: each side runs alone in a fresh subprocess (same data and network). After the
  data and network are built, the kernel's resident-set high-water mark is reset
  (``/proc/self/clear_refs``), ``--memory-steps`` steps run (the first one creates the
  optimizer state), and the figure is ``VmHWM - VmRSS at the reset``: the extra resident
  memory training needed at its peak, torch's allocations and Python objects alike.
- CUDA: ``torch.cuda.max_memory_allocated`` during a step minus the allocation before it,
  maximised over the timed steps.

``--scaling`` times ours (and learn2learn unless ``--no-scaling-baseline``) for meta-batch
sizes 4..64 and inner steps 1, 5, 10, one JSON line per point. ``--short`` is CI's smoke
mode: a few small steps, no memory subprocesses, and it fails unless both sides ran and
the ratio is a positive finite number.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from datetime import date
from pathlib import Path
from statistics import median
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_meta.data.base import EpisodicDataModule  # noqa: E402
from lit_meta.tasks import TaskBatch, task_spec  # noqa: E402

OMNIGLOT_PACK = ROOT.parent / "shared" / "data" / "omniglot"
INSTALL_HINT = "learn2learn is not installed: run `bash benchmarks/install_learn2learn.sh`"


# ----------------------------------------------------------------------------- data
class TensorTasks(EpisodicDataModule):
    """Fallback sampler: ``images`` is ``[classes, per_class, C, H, W]`` in memory; a task is
    ``ways`` distinct classes and ``shots + queries`` distinct samples of each, drawn in
    batched tensor ops from the step's generator."""

    name = "tensor"

    def __init__(self, images: torch.Tensor, ways: int, shots: int, queries: int, meta_batch_size: int) -> None:
        super().__init__(meta_batch_size=meta_batch_size)
        self.images, self.ways, self.shots, self.queries = images, ways, shots, queries

    @property
    def task_spec(self) -> dict[str, Any]:
        return task_spec("omniglot", "classification", list(self.images.shape[2:]), ways=self.ways)

    def draw(self, generator: torch.Generator, num_tasks: int) -> torch.Tensor:
        """``[num_tasks, ways, shots + queries, C, H, W]``, class-major."""
        classes, per_class = self.images.shape[:2]
        cls = torch.rand(num_tasks, classes, generator=generator).argsort(1)[:, : self.ways]
        idx = torch.rand(num_tasks, self.ways, per_class, generator=generator).argsort(2)[..., : self.shots + self.queries]
        return self.images[cls[..., None].to(self.images.device), idx.to(self.images.device)]

    def sample_tasks(self, split: str, generator: torch.Generator, num_tasks: int) -> TaskBatch:
        x = self.draw(generator, num_tasks)
        t, w, s, q = num_tasks, self.ways, self.shots, self.queries
        labels = torch.arange(w, device=x.device)
        sx = x[:, :, :s].reshape(t, w * s, *x.shape[3:])
        qx = x[:, :, s:].reshape(t, w * q, *x.shape[3:])
        return TaskBatch(sx, labels.repeat_interleave(s).expand(t, -1),
                         qx, labels.repeat_interleave(q).expand(t, -1))


def build_data(args: argparse.Namespace, device: torch.device) -> tuple[EpisodicDataModule, torch.Tensor, str]:
    """Our DataModule, the baseline's image tensor ``[classes, per_class, C, H, W]`` (the same
    images, on ``device``), and a description. Ours is ``OmniglotDataModule`` on the real pack
    at ../shared/data/omniglot; without the pack, both sides draw from random images."""
    if args.dataset == "miniimagenet":
        # miniImageNet's shape (64 train classes of 3x84x84), random images: no pack here
        g = torch.Generator().manual_seed(0)
        images = torch.rand(64, 20, 3, 84, 84, generator=g).to(device)
        dm = TensorTasks(images, args.ways, args.shots, args.queries, args.meta_batch_size)
        return dm, images, "random images [64, 20, 3, 84, 84], TensorTasks sampler (benchmarks/speed.py)"
    if args.dataset != "omniglot":
        raise SystemExit(f"--dataset {args.dataset!r}: only omniglot and miniimagenet are supported")
    if args.random_images or not OMNIGLOT_PACK.exists():
        if not args.random_images:
            print(f"speed.py: no Omniglot pack at {OMNIGLOT_PACK}; timing on random images of its shape",
                  file=sys.stderr)
        g = torch.Generator().manual_seed(0)
        images = torch.rand(964, 20, 1, 28, 28, generator=g).to(device)
        dm = TensorTasks(images, args.ways, args.shots, args.queries, args.meta_batch_size)
        return dm, images, "random images [964, 20, 1, 28, 28], TensorTasks sampler (benchmarks/speed.py)"
    from lit_meta.data import OmniglotDataModule
    from lit_meta.data.images import normalize

    dm = OmniglotDataModule(root=str(OMNIGLOT_PACK), ways=args.ways, shots=args.shots, queries=args.queries,
                            meta_batch_size=args.meta_batch_size, image_size=28)
    dm.setup("fit")
    dm.pools = {split: pool.to(device) for split, pool in dm.pools.items()}  # a Trainer would do this
    pool = dm.pools["train"]
    per_class = int(pool.counts[0])
    if not bool((pool.counts == per_class).all()):
        raise SystemExit("speed.py: the baseline sampler needs the same number of images per class")
    # The train split's images without the rotated copies (which would only cost learn2learn more).
    images = normalize(pool.images, dm.mean, dm.std).reshape(len(pool.counts), per_class, *pool.images.shape[1:])
    return dm, images, "Omniglot (../shared/data/omniglot), finn train split, 28x28; ours: OmniglotDataModule"


# ----------------------------------------------------------------------------- ours
def build_ours(args: argparse.Namespace, dm: EpisodicDataModule, device: torch.device):
    import lit_meta.algorithms as algorithms

    first_order = args.first_order or args.algorithm == "fomaml"
    if args.algorithm == "reptile":
        cls = getattr(algorithms, "Reptile", None)
        if cls is None:
            raise SystemExit("--algorithm reptile: lit_meta.algorithms has no Reptile yet")
    else:
        cls = algorithms.MAML
    # Finn et al. 2017: conv4/64 stride 2 on Omniglot, conv4/32 with max-pool on miniImageNet
    backbone_kwargs = {"filters": 32, "max_pool": True} if args.dataset == "miniimagenet" else None
    kwargs = dict(task_spec=dm.task_spec, backbone="conv4", backbone_kwargs=backbone_kwargs,
                  inner_lr=args.inner_lr, inner_steps=args.inner_steps,
                  first_order=first_order or args.algorithm == "reptile", meta_batch_size=args.meta_batch_size,
                  meta_lr=args.meta_lr, task_chunk_size=args.task_chunk_size)
    model = cls(**kwargs).to(device)
    model.configure_optimizers()  # validates the hparams; we build the optimizer ourselves
    opt = (torch.optim.SGD if args.algorithm == "reptile" else torch.optim.Adam)(
        model.meta_parameters(), lr=args.meta_lr)
    # Trainer-free: the two Lightning hooks the meta-step calls, as a Trainer would supply them.
    model.optimizers = lambda use_pl_optimizer=True: opt
    model.manual_backward = lambda loss, *a, **k: loss.backward(*a, **k)
    model.train()
    step_index = [0]

    def step() -> None:
        batch = dm.train_batch(step_index[0]).to(device)
        step_index[0] += 1
        model.outer_update(batch)

    return model, step


# ----------------------------------------------------------------------------- learn2learn
def import_learn2learn():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import learn2learn as l2l
    except ImportError as err:
        raise SystemExit(f"{INSTALL_HINT} ({err})") from err
    return l2l


def l2l_task_source(args: argparse.Namespace, images: torch.Tensor, sampler: str, seed: int):
    """Returns ``draw() -> (data, labels)`` for one task, class-grouped like learn2learn's
    ``ConsecutiveLabels`` output (``shots + queries`` samples per class)."""
    l2l = import_learn2learn()
    ways, k = args.ways, args.shots + args.queries
    if sampler == "tensor":
        gen = torch.Generator().manual_seed(seed)
        sampler_dm = TensorTasks(images, ways, args.shots, args.queries, 1)
        labels = torch.arange(ways, device=images.device).repeat_interleave(k)

        def draw():
            x = sampler_dm.draw(gen, 1)[0]
            return x.reshape(ways * k, *x.shape[2:]), labels

        return draw
    import random

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


def build_l2l(args: argparse.Namespace, net: torch.nn.Module, images: torch.Tensor, device: torch.device,
              sampler: str, seed: int = 1):
    l2l = import_learn2learn()
    draw = l2l_task_source(args, images, sampler, seed)
    shots, k = args.shots, args.shots + args.queries
    loss = torch.nn.CrossEntropyLoss(reduction="mean")
    net = copy.deepcopy(net).to(device)
    net.train()

    def split(data: torch.Tensor, labels: torch.Tensor):
        # Per class: the first `shots` samples adapt, the rest evaluate (for shots ==
        # queries this is the examples' even/odd split).
        data, labels = data.to(device), labels.to(device)
        adapt = torch.arange(data.shape[0], device=device) % k < shots
        return data[adapt], labels[adapt], data[~adapt], labels[~adapt]

    if args.algorithm == "reptile":
        opt = torch.optim.SGD(net.parameters(), lr=args.meta_lr)
        adapt_state = torch.optim.Adam(net.parameters(), lr=args.inner_lr, betas=(0.0, 0.999)).state_dict()

        def step() -> None:
            nonlocal adapt_state
            opt.zero_grad()
            for p in net.parameters():
                p.grad = torch.zeros_like(p.data)
            for _ in range(args.meta_batch_size):
                learner = copy.deepcopy(net)
                adapt_opt = torch.optim.Adam(learner.parameters(), lr=args.inner_lr, betas=(0.0, 0.999))
                adapt_opt.load_state_dict(adapt_state)
                ax, ay, _, _ = split(*draw())
                for _ in range(args.inner_steps):
                    adapt_opt.zero_grad()
                    loss(learner(ax), ay).backward()
                    adapt_opt.step()
                adapt_state = adapt_opt.state_dict()
                for p, q in zip(net.parameters(), learner.parameters()):
                    p.grad.data.add_(q.data, alpha=-1.0)
            for p in net.parameters():
                p.grad.data.mul_(1.0 / args.meta_batch_size).add_(p.data)
            opt.step()

        return net, step

    first_order = args.first_order or args.algorithm == "fomaml"
    maml = l2l.algorithms.MAML(net, lr=args.inner_lr, first_order=first_order)
    opt = torch.optim.Adam(maml.parameters(), lr=args.meta_lr)

    def step() -> None:
        opt.zero_grad()
        for _ in range(args.meta_batch_size):
            learner = maml.clone()
            ax, ay, ex, ey = split(*draw())
            for _ in range(args.inner_steps):
                learner.adapt(loss(learner(ax), ay))
            loss(learner(ex), ey).backward()
        for p in maml.parameters():
            p.grad.data.mul_(1.0 / args.meta_batch_size)
        opt.step()

    return net, step


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Seconds for one call, and (CUDA) the peak allocation above the start, in MB."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else float("nan")
    return seconds, peak


def interleave(sides: dict[str, Callable[[], None]], steps: int, warmup: int,
               device: torch.device) -> dict[str, dict[str, Any]]:
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, list[float]] = {n: [] for n in names}
    for i in range(steps):
        order = names if i % 2 == 0 else names[::-1]  # A B, B A, ...: neither always goes first
        for name in order:
            s, p = timed(sides[name], device)
            times[name].append(s)
            peaks[name].append(p)
    return {n: {"seconds": times[n], "peak_mb": max(peaks[n]) if peaks[n] else float("nan")} for n in names}


def rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def memory_child(args: argparse.Namespace) -> None:
    """Run one side alone and print its peak extra resident memory (see the module docstring)."""
    device = torch.device(args.device)
    _, step = setup_side(args, args.memory_side, device)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base = rss_kb("VmRSS")
    for _ in range(args.memory_steps):
        step()
    print(json.dumps({"side": args.memory_side, "peak_mem_mb": (rss_kb("VmHWM") - base) / 1024}))


def setup_side(args: argparse.Namespace, side: str, device: torch.device):
    """Both sides are built identically in every process, so their weights match."""
    torch.manual_seed(args.seed)
    dm, images, _ = build_data(args, device)
    model, ours = build_ours(args, dm, device)
    if side == "ours":
        return model, ours
    return build_l2l(args, model.net, images, device, args.baseline_sampler)


def measure_memory(args: argparse.Namespace, side: str) -> float:
    cmd = [sys.executable, __file__, *args.argv, "--memory-side", side]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mem_mb"]


def build_sides(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Callable[[], None]], str | None, str]:
    """Our step and, with ``--compare learn2learn``, learn2learn's: one data build, the
    same initial weights. Returns the steps by side, learn2learn's version, the data source."""
    torch.manual_seed(args.seed)
    dm, images, source = build_data(args, device)
    model, ours = build_ours(args, dm, device)
    sides = {"ours": ours}
    l2l_version = None
    if args.compare == "learn2learn":
        l2l_version = import_learn2learn().__version__
        sides["baseline"] = build_l2l(args, model.net, images, device, args.baseline_sampler)[1]
    return sides, l2l_version, source


def compare(args: argparse.Namespace, device: torch.device, memory: bool) -> dict[str, Any]:
    sides, l2l_version, source = build_sides(args, device)
    result = interleave(sides, args.steps, args.warmup, device)
    tasks = args.meta_batch_size * args.steps
    row: dict[str, Any] = {
        "ours_tasks_per_s": tasks / sum(result["ours"]["seconds"]),
        "ours_step_s_median": median(result["ours"]["seconds"]),
    }
    if "baseline" in result:
        row["baseline_tasks_per_s"] = tasks / sum(result["baseline"]["seconds"])
        row["baseline_step_s_median"] = median(result["baseline"]["seconds"])
        row["ratio"] = row["ours_tasks_per_s"] / row["baseline_tasks_per_s"]
    if device.type == "cuda":
        row["ours_peak_mem_mb"] = result["ours"]["peak_mb"]
        if "baseline" in result:
            row["baseline_peak_mem_mb"] = result["baseline"]["peak_mb"]
    elif memory:
        row["ours_peak_mem_mb"] = measure_memory(args, "ours")
        if "baseline" in result:
            row["baseline_peak_mem_mb"] = measure_memory(args, "baseline")
    row.update(
        algorithm=args.algorithm, dataset=args.dataset, ways=args.ways, shots=args.shots, queries=args.queries,
        meta_batch_size=args.meta_batch_size, inner_steps=args.inner_steps, task_chunk_size=args.task_chunk_size,
        first_order=args.first_order or args.algorithm in ("fomaml", "reptile"), steps=args.steps, warmup=args.warmup,
        device=str(device), threads=torch.get_num_threads(), torch=torch.__version__, learn2learn=l2l_version,
        data=source, baseline_sampler=args.baseline_sampler if l2l_version else None,
        memory=("cuda max_memory_allocated above step start" if device.type == "cuda"
                else "peak RSS above pre-training RSS, one subprocess per side" if memory else None),
        date=date.today().isoformat(),
    )
    return row


def scaling(args: argparse.Namespace, device: torch.device) -> None:
    for inner in (1, 5, 10):
        for batch in (4, 8, 16, 32, 64):
            point = argparse.Namespace(**{**vars(args), "meta_batch_size": batch, "inner_steps": inner})
            if not args.scaling_baseline:
                point.compare = "none"
            print(json.dumps(compare(point, device, memory=False)), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algorithm", choices=("maml", "fomaml", "reptile"), default="maml")
    p.add_argument("--dataset", choices=("omniglot", "miniimagenet"), default="omniglot",
                   help="omniglot 1x28x28 conv4/64; miniimagenet 3x84x84 conv4/32 max-pool (random images)")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=1)
    p.add_argument("--meta-batch-size", type=int, default=32)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--inner-lr", type=float, default=None, help="default: 0.4 (MAML, Omniglot), 0.01 (MAML, miniImageNet), 0.001 (Reptile's Adam)")
    p.add_argument("--meta-lr", type=float, default=None, help="default: 1e-3 (MAML, Adam), 1.0 (Reptile, SGD)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    p.add_argument("--first-order", action="store_true")
    p.add_argument("--task-chunk-size", type=int, default=None,
                   help="ours: adapt and back-propagate this many tasks at a time (bounds memory)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--compare", choices=("learn2learn", "none"), default="learn2learn")
    p.add_argument("--baseline-sampler", choices=("tensor", "taskdataset"), default="tensor")
    p.add_argument("--random-images", action="store_true", help="skip the Omniglot pack, time on random images")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="measure CPU peak memory in subprocesses (default: on, off with --short)")
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--scaling", action="store_true", help="meta-batch 4..64 x inner steps 1, 5, 10")
    p.add_argument("--scaling-baseline", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--short", action="store_true", help="CI smoke mode: 2+1 steps of 4 tasks, checks the output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-side", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    reptile = args.algorithm == "reptile"
    maml_lr = 0.01 if args.dataset == "miniimagenet" else 0.4
    args.inner_lr = args.inner_lr if args.inner_lr is not None else 0.001 if reptile else maml_lr
    args.meta_lr = args.meta_lr if args.meta_lr is not None else 1.0 if reptile else 1e-3
    args.argv = list(sys.argv[1:] if argv is None else argv)  # replayed by the memory subprocesses
    if args.short:
        args.steps, args.warmup, args.meta_batch_size, args.memory_steps = 2, 1, 4, 2
    if args.memory is None:
        args.memory = not args.short
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_side:
        memory_child(args)
        return
    if args.scaling:
        scaling(args, device)
        return
    row = compare(args, device, memory=args.memory)
    print(json.dumps(row), flush=True)
    if args.short:
        ok = all(math.isfinite(row.get(k, float("nan"))) and row[k] > 0
                 for k in ("ours_tasks_per_s", "baseline_tasks_per_s", "ratio"))
        if not ok:
            raise SystemExit("speed.py --short: a side did not run or the ratio is not a positive number")


if __name__ == "__main__":
    main()
