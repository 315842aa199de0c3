"""One prepared GPU check: everything only a GPU can show, in one short run.

    python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json      # on a CUDA machine, <= 7 min
    python  benchmarks/gpu_check.py --cpu-smoke                    # the same code paths, tiny, on the CPU

Runs from the source tree against the machine's own torch (no ``pip install -e .``): it
installs the wheels of ``.whl/`` (``benchmarks/gpu_wheels.sh``: jsonargparse,
learn2learn for CPython 3.12, ...) with ``pip install --no-index --no-deps --target``
into a temporary folder when jsonargparse is missing, and puts that folder and the
repository on ``PYTHONPATH`` for its parts. Each part is a subprocess with its own time
limit (and all of them share a deadline), so one slow part cannot eat the rest; a part
that fails or times out reports an ``error`` and the others still run. No network.
Without a CUDA device (and without ``--cpu-smoke``) it stops at once with one line.

Parts, and the keys of the one-line JSON summary printed last (and written to ``--out``):

- ``device``: GPU name, memory, capability; torch, CUDA, Lightning versions.
- ``tests``: ``pytest -m gpu`` (the tests marked ``gpu``): passed / failed / errors / skipped.
- ``speed``: ``benchmarks/speed.py --device cuda --compare learn2learn`` per case, one
  entry each with ``ours_tasks_per_s``, ``baseline_tasks_per_s``, ``ratio`` and both
  sides' ``*_peak_mem_mb``: second-order MAML, FOMAML and Reptile (5 inner Adam steps) on
  Omniglot 5-way 1-shot (conv4/64, meta-batch 32, random images of Omniglot's shape), and
  second-order MAML on a miniImageNet-shaped task (3x84x84, conv4/32 with max-pool, 5 inner
  steps, meta-batch 4, 15 queries). Without learn2learn the baseline is skipped and said so.
- ``fit``: ``configs/omniglot/maml_5w1s.yaml`` trained for up to ``--fit-steps`` steps
  (or ``--fit-seconds`` of training) in ``32-true`` (TF32 matmuls: the CLI sets
  ``float32_matmul_precision("high")``) and in ``bf16-mixed``: ``steps_per_s`` after
  ``--fit-warmup`` steps, ``projected_60k_minutes`` (60,000 steps at that rate plus the
  config's 60 validations of 100 tasks at the measured validation time), ``val_acc`` on the
  config's 100 validation tasks, ``sample_ms`` (one meta-batch drawn on the device), peak
  memory. The first ``--sync-steps`` steps run under ``torch.cuda.set_sync_debug_mode("error")``
  (sampling and ``training_step``): ``sync_check`` is ``ok`` or the error. Data: the real
  Omniglot packs from ``.gpu_data/omniglot`` (``gpu_wheels.sh`` copies them there) when
  present, else a synthetic pool of Omniglot's shape (``val_acc`` is then meaningless).
- ``compile``: ``compile_tasks`` (``lit_meta/compile.py``) against eager on the same batch
  for the capturable paths (Reptile's inner loop, first-order MAML, evaluation) and the
  modes ``cudagraphs``, ``reduce-overhead`` and ``default``: ms per call, compile seconds,
  the largest difference from eager, and the speed-up.

The next session with a GPU makes exactly this device call (``run``), after
``bash benchmarks/gpu_wheels.sh`` here (it fills the git-ignored ``.whl`` and ``.gpu_data``):

    command: "PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json --log $OUT/parts.log 2>&1 | tee $OUT/gpu_check.log"
    carry:   [".whl", ".gpu_data"]
    timeout_s: 540

and copies the summary into docs/RESULTS.md ("GPU figures").
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
OMNIGLOT = ROOT / ".gpu_data" / "omniglot"
FIT_CONFIG = ROOT / "configs" / "omniglot" / "maml_5w1s.yaml"
PRECISIONS = ("32-true", "bf16-mixed")
GPU_COMPILE_MODES = ("cudagraphs", "reduce-overhead", "default")
COMPILE_PATHS = ("reptile", "fomaml", "eval")

# Seconds: each part's own limit on a GPU, and the deadline they share (7 minutes less
# the start-up, the wheel install and the summary).
LIMITS = {"tests": 90, "speed_case": 55, "fit": 140, "compile": 100}
RESERVE = {"tests": 200, "speed": 130, "fit": 40, "compile": 0}  # kept for the parts after each one
DEADLINE = 400
SMOKE_LIMITS = {"tests": 120, "speed_case": 90, "fit": 150, "compile": 120}
SMOKE_DEADLINE = 600


# ----------------------------------------------------------------------------- speed cases
def speed_cases(smoke: bool) -> list[tuple[str, list[str]]]:
    """(name, speed.py flags). ``--random-images``: the machine has no ../shared pack; the
    shapes are what the timing depends on."""
    omniglot = ["--dataset", "omniglot", "--ways", "5", "--shots", "1", "--queries", "1", "--meta-batch-size", "32",
                "--random-images"]
    cases = [
        ("maml_omniglot_5w1s", ["--algorithm", "maml", "--inner-steps", "1", *omniglot]),
        ("fomaml_omniglot_5w1s", ["--algorithm", "fomaml", "--inner-steps", "1", *omniglot]),
        ("reptile_omniglot_5w1s", ["--algorithm", "reptile", "--inner-steps", "5", *omniglot]),
        ("maml_miniimagenet_shaped_5w1s", ["--algorithm", "maml", "--dataset", "miniimagenet", "--ways", "5",
                                           "--shots", "1", "--queries", "15", "--meta-batch-size", "4",
                                           "--inner-steps", "5", "--random-images"]),
    ]
    if smoke:  # --short: 4 tasks, 1 + 2 steps per side; one inner step and one query keep it cheap on a CPU
        cases = [(name, [*flags, "--short", "--inner-steps", "1", "--queries", "1", "--threads", "1"])
                 for name, flags in cases]
    else:
        cases = [(name, [*flags, "--steps", "30", "--warmup", "3"]) for name, flags in cases]
    return cases


# ----------------------------------------------------------------------------- the parent
class Runner:
    def __init__(self, args: argparse.Namespace, env: dict[str, str]) -> None:
        self.args, self.env = args, env
        self.start = time.monotonic()
        self.deadline = SMOKE_DEADLINE if args.cpu_smoke else args.deadline
        self.limits = SMOKE_LIMITS if args.cpu_smoke else LIMITS
        self.device = "cpu" if args.cpu_smoke else "cuda"

    def budget(self, part: str, limit: float) -> float:
        left = self.deadline - (time.monotonic() - self.start) - RESERVE[part]
        return max(5.0, min(limit, left))

    def run(self, cmd: list[str], timeout: float) -> tuple[int | None, str, float]:
        """(return code or None on timeout, stdout + stderr, seconds). Kills the whole group on timeout."""
        begin = time.monotonic()
        process = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=timeout)
            code: int | None = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            code = None
        seconds = time.monotonic() - begin
        if self.args.verbose:
            sys.stderr.write(output)
        if self.args.log:  # every part's own output, for diagnosis after the machine is gone
            with open(self.args.log, "a") as handle:
                status = "timed out" if code is None else f"exit {code}"
                handle.write(f"\n===== {' '.join(cmd[1:])}  ({status}, {seconds:.1f} s)\n{output}")
        return code, output, seconds

    def worker(self, part: str, timeout: float) -> tuple[list[dict[str, Any]], str | None, float]:
        """Run ``gpu_check.py --worker part``; its JSON lines (written as it goes, so a timeout
        keeps what finished) and an error line if it failed."""
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "lines.jsonl"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", part, "--result", str(result),
                   "--device", self.device, *(["--cpu-smoke"] if self.args.cpu_smoke else []),
                   "--fit-steps", str(self.args.fit_steps), "--fit-seconds", str(self.args.fit_seconds),
                   "--fit-warmup", str(self.args.fit_warmup), "--sync-steps", str(self.args.sync_steps)]
            code, output, seconds = self.run(cmd, timeout)
            lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()] \
                if result.exists() else []
        error = None
        if code is None:
            error = f"timed out after {timeout:.0f} s"
        elif code != 0:
            error = last_error_line(output)
        return lines, error, seconds

    # -- parts --------------------------------------------------------------------
    def tests(self) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            junit = Path(tmp) / "junit.xml"
            cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-o",
                   "addopts=", f"--junitxml={junit}", "tests"]
            code, output, seconds = self.run(cmd, self.budget("tests", self.limits["tests"]))
            out: dict[str, Any] = {"seconds": round(seconds, 1)}
            if junit.exists():
                out.update(junit_counts(junit.read_text()))
            if code is None:
                out["error"] = "timed out"
            elif code not in (0, 5):  # 5: no test selected
                out["failures"] = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))][:10]
            return out

    def speed(self) -> list[dict[str, Any]]:
        baseline = "learn2learn" if learn2learn_available(self.env) else "none"
        entries = []
        for name, flags in speed_cases(self.args.cpu_smoke):
            cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), *flags, "--device", self.device,
                   "--compare", baseline]
            code, output, seconds = self.run(cmd, self.budget("speed", self.limits["speed_case"]))
            entry: dict[str, Any] = {"case": name, "seconds": round(seconds, 1)}
            row = last_json_line(output)
            if code == 0 and row is not None:
                keep = ("ours_tasks_per_s", "baseline_tasks_per_s", "ratio", "ours_peak_mem_mb",
                        "baseline_peak_mem_mb", "ours_step_s_median", "baseline_step_s_median", "algorithm",
                        "dataset", "meta_batch_size", "inner_steps", "queries", "first_order", "learn2learn", "data")
                entry.update({k: row.get(k) for k in keep})
                entry.setdefault("ratio", None)
                if baseline == "none":
                    entry["baseline"] = "learn2learn not installed (.whl has no cp312 build): ours only"
            else:
                entry["error"] = "timed out" if code is None else last_error_line(output)
            entries.append(entry)
        return entries

    def fit(self) -> dict[str, Any]:
        lines, error, seconds = self.worker("fit", self.budget("fit", self.limits["fit"]))
        out: dict[str, Any] = {line.pop("precision"): line for line in lines}
        for precision in PRECISIONS:
            out.setdefault(precision, {"error": error or "not run"})
        out["seconds"] = round(seconds, 1)
        return out

    def compile(self) -> dict[str, Any]:
        lines, error, seconds = self.worker("compile", self.budget("compile", self.limits["compile"]))
        out: dict[str, Any] = {"cases": lines, "seconds": round(seconds, 1)}
        if error:
            out["error"] = error
        best: dict[str, Any] = {}
        for line in lines:
            if line.get("speedup") and line["speedup"] > best.get(line["path"], {}).get("speedup", 1.0):
                best[line["path"]] = {"mode": line["mode"], "speedup": line["speedup"]}
        out["faster_than_eager"] = best
        return out


def junit_counts(xml: str) -> dict[str, int]:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(xml)
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    total, failed, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return {"passed": total - failed - errors - skipped, "failed": failed, "errors": errors, "skipped": skipped}


def last_json_line(output: str) -> dict[str, Any] | None:
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def last_error_line(output: str) -> str:
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or line.startswith(("error", "RuntimeError", "SystemExit")):
            return line[:300]
    return (lines[-1] if lines else "failed with no output")[:300]


def learn2learn_available(env: dict[str, str]) -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('learn2learn') is None)"
    return subprocess.run([sys.executable, "-c", probe], env=env).returncode == 0


def prepare_environment(smoke: bool) -> tuple[dict[str, str], dict[str, Any]]:
    """PYTHONPATH for the parts: the wheels' folder (installed here if jsonargparse is
    missing) and the repository. Returns the environment and what was done."""
    import importlib.util

    paths = [str(ROOT)]
    done: dict[str, Any] = {}
    if importlib.util.find_spec("jsonargparse") is None:
        wheels = sorted(WHEELS.glob("*.whl"))
        if not wheels:
            raise SystemExit(f"gpu_check: jsonargparse is missing and {WHEELS} has no wheels: "
                             "run `bash benchmarks/gpu_wheels.sh` on a machine with the package index")
        site = Path(tempfile.gettempdir()) / "lit_meta_gpu_site"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
        paths.append(str(site))  # after the repository: a wheel here ships a top-level `tests` package
        done["wheels"] = [w.name for w in wheels]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env, done


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "lightning": pl.__version__, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, memory_gb=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
    else:
        info["name"] = "cpu (smoke)"
    return info


def main_parent(args: argparse.Namespace) -> dict[str, Any]:
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__} sees none); "
              "use --cpu-smoke to rehearse on the CPU", file=sys.stderr)
        raise SystemExit(2)
    env, prepared = prepare_environment(args.cpu_smoke)
    runner = Runner(args, env)
    summary: dict[str, Any] = {"device": device_info(), "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
                               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **prepared}
    parts: dict[str, Callable[[], Any]] = {"tests": runner.tests, "speed": runner.speed, "fit": runner.fit,
                                           "compile": runner.compile}
    for name, part in parts.items():
        if name in args.skip:
            summary[name] = {"skipped": "--skip"}
            continue
        try:
            summary[name] = part()
        except Exception as error:  # a broken part must not lose the others' figures
            summary[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
        print(f"gpu_check: {name} done at {time.monotonic() - runner.start:.0f} s", file=sys.stderr, flush=True)
    summary["seconds"] = round(time.monotonic() - runner.start, 1)
    return summary


# ----------------------------------------------------------------------------- workers
def emit(path: str, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def synthetic_omniglot(root: Path, smoke: bool) -> None:
    """Random strokes in Omniglot's pack format: 964 + 659 characters x 20 drawers (smoke: 120 + 80)."""
    import numpy as np

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for half, n in (("images_background", 120 if smoke else 964), ("images_evaluation", 80 if smoke else 659)):
        images = rng.random((n, 20, 28, 28)) > 0.15  # True = paper, as in the real packs
        np.savez(root / f"{half}.npz", images=images)


def sync_guard(fn: Callable[..., Any], device: str, active: Callable[[], bool], strict: bool) -> Callable[..., Any]:
    """``fn`` under torch's sync debug mode "error" (CUDA) or, on the CPU, lit_meta's guard
    (``strict``: any tensor value read fails; else only reads of device tensors, so the
    sampler's host-side index draws pass), while ``active()``."""
    from lit_meta.sync_guard import cuda_sync_errors, no_host_sync

    def guarded(*args: Any, **kwargs: Any) -> Any:
        if not active():
            return fn(*args, **kwargs)
        with cuda_sync_errors() if device == "cuda" else no_host_sync(strict=strict):
            return fn(*args, **kwargs)

    return guarded


def fit_once(args: argparse.Namespace, precision: str, root: Path, tmp: Path, guard: bool) -> dict[str, Any]:
    from lit_meta.cli import MetaCLI

    torch.set_float32_matmul_precision("high")  # as lit_meta.cli.main does: TF32 matmuls on CUDA
    smoke = args.cpu_smoke
    overrides = ["--config", str(FIT_CONFIG), "--data.init_args.root", str(root),
                 "--trainer.max_steps", str(args.fit_steps), "--trainer.precision", precision,
                 "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
                 "--trainer.limit_val_batches", "0", "--trainer.enable_model_summary", "false",
                 "--trainer.accelerator", args.device, "--trainer.devices", "1",
                 "--trainer.default_root_dir", str(tmp)]
    if smoke:
        overrides += ["--model.init_args.meta_batch_size", "4",
                      "--model.init_args.backbone_kwargs", '{"filters": 8, "max_pool": false}',
                      "--data.init_args.val_tasks", "8", "--data.init_args.eval_batch_size", "4",
                      "--data.init_args.eval_queries", "2"]
    cli = MetaCLI(args=overrides, run=False)
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    timer = StepClock(args.device, args.fit_warmup, args.fit_seconds, args.sync_steps if guard else 0)
    trainer.callbacks.append(timer)
    if guard:
        model.training_step = sync_guard(model.training_step, args.device, timer.guarding, strict=True)
        dm.train_batch = sync_guard(dm.train_batch, args.device, timer.guarding, strict=False)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, datamodule=dm)
    record: dict[str, Any] = {"precision": precision, "steps": trainer.global_step,
                              "timed_steps": timer.timed_steps, "timed_seconds": round(timer.seconds, 2)}
    record["steps_per_s"] = round(timer.timed_steps / timer.seconds, 2) if timer.seconds > 0 else None
    if args.device == "cuda":
        record["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    # validation: the config's 100 fixed tasks (3 adaptation steps); the second pass is timed
    validator = pl.Trainer(accelerator=args.device, devices=1, precision=precision, logger=False,
                           enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                           inference_mode=False, default_root_dir=str(tmp))
    metrics = validator.validate(model, datamodule=dm, verbose=False)[0]
    synchronize(args.device)
    begin = time.perf_counter()
    validator.validate(model, datamodule=dm, verbose=False)
    synchronize(args.device)
    val_seconds = time.perf_counter() - begin
    record.update(val_acc=round(float(metrics["val/acc"]), 4), val_seconds=round(val_seconds, 3))
    if record["steps_per_s"]:
        # the config validates every 1000 steps (steps_per_epoch): 60 validations in 60k steps
        record["projected_60k_minutes"] = round((60000 / record["steps_per_s"] + 60 * val_seconds) / 60, 2)
    # one meta-batch drawn on the training device (pool already there), synchronised
    draws = 5 if smoke else 50
    synchronize(args.device)
    begin = time.perf_counter()
    for step in range(draws):
        dm.train_batch(100000 + step)
    synchronize(args.device)
    record["sample_ms"] = round(1000 * (time.perf_counter() - begin) / draws, 3)
    return record


class StepClock(pl.Callback):
    """Times the fit after ``warmup`` steps (synchronised at both ends), stops it after
    ``seconds`` of timed training, and says whether the first ``guard_steps`` are guarded."""

    def __init__(self, device: str, warmup: int, seconds: float, guard_steps: int) -> None:
        self.device, self.warmup, self.budget, self.guard_steps = device, warmup, seconds, guard_steps
        self.begin: float | None = None
        self.begin_step = 0
        self.timed_steps, self.seconds = 0, 0.0
        self.step = 0

    def guarding(self) -> bool:
        return self.step < self.guard_steps

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.step = trainer.global_step
        if self.step == self.warmup:
            synchronize(self.device)
            self.begin, self.begin_step = time.perf_counter(), self.step
        elif self.begin is not None and time.perf_counter() - self.begin > self.budget:
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.begin is not None:
            synchronize(self.device)
            self.seconds = time.perf_counter() - self.begin
            self.timed_steps = trainer.global_step - self.begin_step


def worker_fit(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_fit_"))
    if (OMNIGLOT / "images_background.npz").is_file() and not args.cpu_smoke:
        root, data = OMNIGLOT, "omniglot npz packs (.gpu_data/omniglot), Finn split"
    else:
        root, data = tmp / "synthetic_omniglot", "synthetic Omniglot-shaped pool: val_acc is not meaningful"
        synthetic_omniglot(root, args.cpu_smoke)
    for precision in PRECISIONS:
        try:
            record = fit_once(args, precision, root, tmp, guard=True)
            record["sync_check"] = f"ok: the first {args.sync_steps} steps (sampling + training_step) " + (
                "under torch.cuda.set_sync_debug_mode('error')" if args.device == "cuda"
                else "under lit_meta.sync_guard.no_host_sync")
        except Exception as error:  # a host sync (or another failure) in the guarded steps: time it unguarded
            check = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            record = fit_once(args, precision, root, tmp, guard=False)
            record["sync_check"] = f"FAILED: {check[:300]}"
        record["data"] = data
        emit(args.result, record)


def worker_compile(args: argparse.Namespace) -> None:
    """Each capturable path, eager then compiled per mode, on one fixed batch."""
    from lit_meta.algorithms import MAML, Reptile
    from lit_meta.tasks import TaskBatch, task_spec

    torch.set_float32_matmul_precision("high")
    device = torch.device(args.device)
    smoke = args.cpu_smoke
    tasks, filters, calls = (2, 4, 2) if smoke else (32, 64, 20)
    spec = task_spec("omniglot-shaped", "classification", [1, 28, 28], ways=5)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(5).repeat(tasks, 1)
    train = TaskBatch(torch.rand(tasks, 5, 1, 28, 28, generator=g), y, torch.rand(tasks, 5, 1, 28, 28, generator=g),
                      y.clone()).to(device)
    yq = torch.arange(5).repeat_interleave(15).repeat(tasks, 1)
    evaluation = TaskBatch(torch.rand(tasks, 5, 1, 28, 28, generator=g), y,
                           torch.rand(tasks, 75, 1, 28, 28, generator=g), yq).to(device)
    modes = ("aot_eager",) if smoke else GPU_COMPILE_MODES

    def model(path: str, mode: str | None):
        torch.manual_seed(0)
        common = dict(task_spec=spec, backbone_kwargs={"filters": filters}, meta_batch_size=tasks, compile_tasks=mode)
        if path == "reptile":
            return Reptile(inner_steps=1 if smoke else 5, inner_lr=0.001, **common).to(device)
        return MAML(inner_lr=0.4, inner_steps=1, first_order=True, eval_inner_steps=3, **common).to(device)

    def call(m, path: str) -> torch.Tensor:
        """One meta-step (training paths; returns a parameter) or one evaluation (its losses)."""
        if path == "eval":
            with torch.enable_grad():
                return m.run_tasks(evaluation, 3, first_order=True, training=False)["final_query_loss"]
        m.outer_update(train)
        return next(m.net.parameters()).detach()

    def clock(m, path: str) -> float:
        synchronize(args.device)
        begin = time.perf_counter()
        for _ in range(calls):
            call(m, path)
        synchronize(args.device)
        return 1000 * (time.perf_counter() - begin) / calls

    eager: dict[str, tuple[torch.Tensor, float]] = {}
    for path in COMPILE_PATHS:  # eager first: the reference values and times
        m = model(path, None)
        first = call(m, path).clone()
        call(m, path)  # warm-up
        eager[path] = (first, clock(m, path))
        emit(args.result, {"path": path, "mode": "eager", "ms_per_call": round(eager[path][1], 3)})
    for mode in modes:
        for path in COMPILE_PATHS:
            record: dict[str, Any] = {"path": path, "mode": mode}
            try:
                m = model(path, mode)
                begin = time.perf_counter()
                first = call(m, path).clone()
                synchronize(args.device)
                record["compile_s"] = round(time.perf_counter() - begin, 1)
                record["max_abs_diff"] = float((first.float() - eager[path][0].float()).abs().max())
                call(m, path)
                ms = clock(m, path)
                record.update(ms_per_call=round(ms, 3), speedup=round(eager[path][1] / ms, 3))
            except Exception as error:
                record["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:300]
            emit(args.result, record)


# ----------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="also write the JSON summary to this file")
    p.add_argument("--log", help="append every part's own output to this file")
    p.add_argument("--cpu-smoke", action="store_true", help="the same code paths with tiny sizes on the CPU")
    p.add_argument("--skip", nargs="*", default=[], choices=("tests", "speed", "fit", "compile"))
    p.add_argument("--deadline", type=float, default=DEADLINE, help="seconds all parts share (GPU)")
    p.add_argument("--fit-steps", type=int, default=None, help="most steps per precision (GPU 4000, smoke 8)")
    p.add_argument("--fit-seconds", type=float, default=None, help="most timed training seconds per precision")
    p.add_argument("--fit-warmup", type=int, default=None, help="untimed steps first (GPU 100, smoke 3)")
    p.add_argument("--sync-steps", type=int, default=None, help="steps run under the sync guard (GPU 20, smoke 2)")
    p.add_argument("--verbose", action="store_true", help="copy the parts' output to stderr")
    p.add_argument("--worker", choices=("fit", "compile"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    for name, gpu, cpu in (("fit_steps", 4000, 8), ("fit_seconds", 30.0, 60.0), ("fit_warmup", 100, 3),
                           ("sync_steps", 20, 2)):
        if getattr(args, name) is None:
            setattr(args, name, cpu if smoke else gpu)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        {"fit": worker_fit, "compile": worker_compile}[args.worker](args)
        return
    summary = main_parent(args)
    line = json.dumps(summary)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()
