"""Margins of the test suite's learning tests under other rounding.

A test that asserts learning ("after training the loss is lower", "the trained checkpoint
beats a random one") measures one training run, whose outcome depends on the processor's
floating-point kernels (an AMD EPYC and an Intel Xeon round reductions differently, and the
differences grow over hundreds of steps). Here each such test's own measurement (its
``measure_*`` function) is re-run with other seeds (initial weights and task stream) and one
or two torch threads (another reduction order): a perturbation larger than another CPU's
rounding. Each line gives the values and whether the test's check (its ``check_*``) holds.

    PYTHONPATH=. python -m tests.learning_margins [--seeds 0 1 2 3 4] [--threads 1 2] [--only NAME ...]

(``--only`` also takes the two slow tests on the real Omniglot pack, which the default leaves out.)

The figures are in docs/RESULTS.md ("Margins of the learning tests").
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch


def adapt_trained_vs_random(seed: int) -> tuple[dict[str, Any], Callable[[Any], None]]:
    from tests import test_adapt as t

    with tempfile.TemporaryDirectory() as folder:
        omni = t.make_omni(Path(folder))
        return t.measure_trained_vs_random(omni["root"], seed), t.check_trained_beats_random


def adapt_other_ways(seed: int) -> tuple[dict[str, Any], Callable[[Any], None]]:
    from tests import test_adapt as t

    with tempfile.TemporaryDirectory() as folder:
        omni = t.make_omni(Path(folder) / "omniglot")
        _, trained = t.train_fomaml(t.lake_datamodule(omni["root"], seed), seed)
        ckpt = t.save_checkpoint(trained, Path(folder) / "trained.ckpt")
        accuracy = t.measure_other_ways(omni, ckpt, Path(folder) / "tasks")

    def check(values: dict[int, float]) -> None:
        for ways, value in values.items():
            t.check_other_ways(ways, value)

    return accuracy, check


def sine_maml(seed: int) -> tuple[dict[str, Any], Callable[[Any], None]]:
    from tests import test_sine_learning as t

    return t.measure_maml_sine(seed), t.check_maml_sine


def sine_against_transfer(seed: int) -> tuple[dict[str, Any], Callable[[Any], None]]:
    from tests import test_sine_learning as t

    return t.measure_against_transfer(seed), t.check_against_transfer


def learned_optimizer(seed: int) -> tuple[dict[str, Any], Callable[[Any], None]]:
    from tests import test_learned_optimizers as t

    def check(m: dict[str, float]) -> None:
        t.check_held_out_loss(m["held_out_before"], m["held_out_after"])
        t.check_trains_a_model(m["linear_first"], m["linear_last"])

    return t.measure_learned_optimizer(seed), check


def blobs_adaptation(seed: int) -> tuple[dict[str, Any], Callable[[Any], None]]:
    from tests import test_distributed as t

    return t.measure_blobs(seed), t.check_blobs


def real_omniglot_fomaml(seed: int) -> tuple[dict[str, Any], Callable[[Any], None]]:
    from tests import test_data_images as t

    with tempfile.TemporaryDirectory() as folder:
        return t.measure_real_fomaml(t.real_omniglot(seed), Path(folder), seed), t.check_real_fomaml


def real_omniglot_meta_lstm(seed: int) -> tuple[dict[str, Any], Callable[[Any], None]]:
    from tests import test_learned_optimizers as t

    with tempfile.TemporaryDirectory() as folder:
        return t.measure_meta_lstm_real(Path(folder), seed), t.check_meta_lstm_real


SLOW = {  # tests marked slow, on the real Omniglot pack: run them with --only
    "test_data_images::real_omniglot_fomaml": real_omniglot_fomaml,
    "test_learned_optimizers::meta_lstm_real_omniglot": real_omniglot_meta_lstm,
}
MEASUREMENTS: dict[str, Callable[[int], tuple[dict[str, Any], Callable[[Any], None]]]] = {
    "test_adapt::trained_beats_random": adapt_trained_vs_random,
    "test_adapt::other_ways": adapt_other_ways,
    "test_sine_learning::maml": sine_maml,
    "test_sine_learning::against_transfer": sine_against_transfer,
    "test_learned_optimizers::learned_optimizer": learned_optimizer,
    "test_distributed::blobs_adaptation": blobs_adaptation,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--only", nargs="+", default=list(MEASUREMENTS), choices=list(MEASUREMENTS) + list(SLOW),
                        help="measurements to run (default: those of the default test tier)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    failures = 0
    for name in args.only:
        for seed in args.seeds:
            for threads in args.threads:
                torch.set_num_threads(threads)
                start = time.perf_counter()
                values, check = {**MEASUREMENTS, **SLOW}[name](seed)
                try:
                    check(values)
                    holds = True
                except AssertionError:
                    holds, failures = False, failures + 1
                print(json.dumps({"test": name, "seed": seed, "threads": threads, "holds": holds,
                                  "values": values, "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    print(json.dumps({"failures": failures}))


if __name__ == "__main__":
    main()
