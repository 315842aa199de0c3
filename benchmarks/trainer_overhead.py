"""What the Trainer costs: meta-training through ``train.py``'s Trainer (logging,
checkpointing, validation as the config sets them) against the bare meta-step loop.

Both sides are built from the same config by ``MetaCLI(run=False)``; same model, data,
seed and thread count. Bare: ``model.outer_update(dm.train_batch(step))`` ``--steps``
times. Trainer: ``trainer.fit`` for ``--steps`` steps, timed from ``on_train_start`` to
``on_train_end`` (so start-up and the end-of-fit meta-test are out, but every
validation, log write and checkpoint save inside training is in). The two alternate
``--repeats`` times; one JSON line reports the medians and the overhead, and the same
from each side's fastest run (``*_best``): on a shared VM a run only ever gets slower
than its cost, and at sine's ~4 ms a step repeats of one side differ by up to 1.7x.

    python benchmarks/trainer_overhead.py --config configs/sine/maml.yaml --steps 2000
    python benchmarks/trainer_overhead.py --config configs/omniglot/quick_5w1s.yaml --steps 100 \\
        -- --data.root ../shared/data/omniglot
    python benchmarks/trainer_overhead.py --floor --steps 2000

``--floor`` times the Trainer alone: a LightningModule whose manual-optimization step
only calls ``optimizer.step()`` on one parameter, with no validation, a CSV logger and a
checkpoint at the end (the least any meta-step pays for going through the Trainer).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path
from statistics import median

import pytorch_lightning as pl
import torch

from lit_meta.cli import DEFAULT_CONFIG, MetaCLI


class TrainTimer(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.start


def build(config: str, steps: int, extra: list[str], workdir: Path) -> MetaCLI:
    args = ["--config", config, "--trainer.max_steps", str(steps), "--trainer.logger.init_args.save_dir",
            str(workdir / "logs"), *extra]
    return MetaCLI(args=args, run=False)


def bare(config: str, steps: int, extra: list[str], workdir: Path) -> float:
    cli = build(config, steps, extra, workdir)
    for callback in cli.trainer.callbacks:  # e.g. TorchThreads: the bare loop gets the same setup
        if not isinstance(callback, pl.callbacks.ModelCheckpoint):
            callback.setup(cli.trainer, cli.model, "fit")
    model, dm = cli.model, cli.datamodule
    dm.setup("fit")
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        model.outer_update(dm.train_batch(step))
    return time.perf_counter() - start


def trainer(config: str, steps: int, extra: list[str], workdir: Path) -> float:
    cli = build(config, steps, extra, workdir)
    timer = TrainTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, cli.datamodule)
    return timer.seconds


class _FloorModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.optimizers().step()  # manual optimization: global_step counts optimizer steps

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.weight])


class _Zeros(torch.utils.data.IterableDataset):
    def __iter__(self):
        while True:
            yield torch.zeros(1)


def floor(steps: int, workdir: Path) -> float:
    timer = TrainTimer()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=pl.loggers.CSVLogger(str(workdir)),
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         inference_mode=False, callbacks=[timer], default_root_dir=str(workdir))
    trainer.fit(_FloorModule(), torch.utils.data.DataLoader(_Zeros(), batch_size=None))
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--floor", action="store_true", help="time the Trainer around an empty step instead")
    parser.add_argument("extra", nargs="*", help="more train.py flags, after --")
    args = parser.parse_args()
    if args.floor:
        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as tmp:
            runs = [floor(args.steps, Path(tmp) / str(r)) for r in range(args.repeats)]
        print(json.dumps({"floor": True, "steps": args.steps, "trainer_ms_per_step": round(1000 * median(runs) / args.steps, 3),
                          "trainer_ms_per_step_best": round(1000 * min(runs) / args.steps, 3), "runs": runs,
                          "threads": torch.get_num_threads(), "date": date.today().isoformat()}))
        return
    times: dict[str, list[float]] = {"bare": [], "trainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, fn in (("bare", bare), ("trainer", trainer)):
                times[name].append(fn(args.config, args.steps, args.extra, Path(tmp) / f"{name}{r}"))
    bare_s, trainer_s = median(times["bare"]), median(times["trainer"])
    bare_best, trainer_best = min(times["bare"]), min(times["trainer"])
    print(json.dumps({
        "config": args.config, "steps": args.steps, "extra": args.extra,
        "bare_s": round(bare_s, 2), "trainer_s": round(trainer_s, 2),
        "bare_ms_per_step": round(1000 * bare_s / args.steps, 3),
        "trainer_ms_per_step": round(1000 * trainer_s / args.steps, 3),
        "overhead_pct": round(100 * (trainer_s / bare_s - 1), 1),
        "bare_ms_per_step_best": round(1000 * bare_best / args.steps, 3),
        "trainer_ms_per_step_best": round(1000 * trainer_best / args.steps, 3),
        "overhead_pct_best": round(100 * (trainer_best / bare_best - 1), 1),
        "runs": times, "threads": torch.get_num_threads(), "date": date.today().isoformat(),
    }))


if __name__ == "__main__":
    main()
