"""One prepared GPU check: everything only a GPU can show, in one short run.

    python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json      # on a CUDA machine, <= 8 min 20 s
    python  benchmarks/gpu_check.py --cpu-smoke                    # the same parts, tiny, on the CPU (< 3 min)

Runs from the source tree against the machine's own torch (no ``pip install -e .``): it
installs the wheels of ``.whl/`` (``benchmarks/gpu_wheels.sh``: jsonargparse,
learn2learn for CPython 3.12, ...) with ``pip install --no-index --no-deps --target``
into a temporary folder when jsonargparse is missing, and puts that folder and the
repository on ``PYTHONPATH`` for its parts. No network. Without a CUDA device (and without
``--cpu-smoke``) it stops at once with one line.

Time: every part has its own limit (:data:`LIMITS`, seconds on a GPU), and they add up to
at most the deadline (:data:`DEADLINE`, 8 min 20 s from the check's start, the wheels'
install included), so each part gets its whole limit even when the ones before it use all
of theirs; a part that fails or runs out of time reports an ``error`` and the others still
run. The one-line JSON summary is printed (and written to ``--out``) whatever failed:
setup included, every failure is that part's ``error``.

Parts, and the keys of the summary:

- ``setup``: the wheels installed, and which optional packages import (``import``, not only
  found: a broken learn2learn is reported here and the speed part runs ours alone).
- ``device``: GPU name, memory, capability; torch, CUDA, Lightning versions.
- ``rehearsal``: every algorithm's meta-steps and evaluation on the ``meta`` device
  (``lit_meta.rehearsal``): no host-made tensor copied in, no device value read.
- ``tests``: ``pytest -m gpu`` (the tests marked ``gpu``): passed / failed / errors / skipped.
- ``speed``: ``benchmarks/speed.py --device cuda --compare PEER ...`` per case beside every
  torch peer that imports (learn2learn, higher, torchopt, parallel_metalearn: ``setup``
  checks; JAX is CPU-only), one entry each with learn2learn's ``ours_tasks_per_s``,
  ``baseline_tasks_per_s``, ``ratio`` and both sides' ``*_peak_mem_mb``, and ``peers``: per
  peer its ``ratio``, ``baseline_tasks_per_s``, ``baseline_peak_mem_mb`` or ``absent`` with
  the reason (not importing, or a case it cannot run): second-order MAML, FOMAML and Reptile (5 inner Adam steps) on
  Omniglot 5-way 1-shot (conv4/64, meta-batch 32, random images of Omniglot's shape), and
  second-order MAML on a miniImageNet-shaped task (3x84x84, conv4/32 with max-pool, 5 inner
  steps, meta-batch 4, 15 queries). Without learn2learn the baseline is skipped and said so.
- ``fit``: per precision (``32-true``, with TF32 matmuls as the CLI sets
  ``float32_matmul_precision("high")``, and ``bf16-mixed``), two fits of
  ``configs/omniglot/maml_5w1s.yaml``:

  - the sync check: ``--sync-steps`` steps with a progress bar, logging every 5 and validating after step 10
    under ``torch.cuda.set_sync_debug_mode("warn")`` (``lit_meta.sync_guard.SyncWindow``):
    ``sync_check`` lists the steps, logging steps and validations covered, the hooks
    called, and every sync with its innermost lit_meta line, split into those a logging
    step or a validation's end may make and those no step may (``ok`` when there are none);
  - the timed fit: up to ``--fit-steps`` steps (or ``--fit-seconds`` of training) as the
    config logs: ``steps_per_s`` after ``--fit-warmup`` steps, ``projected_60k_minutes``
    (60,000 steps at that rate plus the config's 60 validations of 600 tasks at the measured
    validation time), ``val_acc`` on the config's 600 validation tasks, ``sample_ms`` (one
    meta-batch drawn on the device), peak memory.

  Data: the real Omniglot packs from ``.gpu_data/omniglot`` (``gpu_wheels.sh`` copies them
  there) when present, else a synthetic pool of Omniglot's shape (``val_acc`` is then
  meaningless).
- ``compile``: ``compile_tasks``
  (``lit_meta/compile.py``, ``fullgraph=True``) against eager
  on the same batch for the capturable paths (Reptile's inner loop, first-order MAML,
  evaluation), in :data:`COMPILE_CASES`' order until the part's time is spent (the rest
  ``"skipped": "time"``): ms per call, compile seconds, the largest difference from eager,
  the speed-up, and ``graphs``: the graphs Dynamo captured (Dynamo is reset before each
  case, so each is compiled afresh; 0 would mean it ran eagerly and its speed-up is not one).
- ``graph``: second-order MAML's whole eager step captured as one CUDA graph and replayed
  against the eager step (``lit_meta.bench.graphed_step``; path ``maml2``, mode ``cuda_graph``:
  ``graphs`` 1 when captured, ``compile_s`` the warm-up and capture, ``max_abs_diff`` of the first
  parameter against 4 eager steps of a twin). Last and in its own process: a failed capture can
  leave the CUDA context unusable.

The next session with a GPU makes exactly this device call (``run``), after
``bash benchmarks/gpu_wheels.sh`` here (it fills the git-ignored ``.whl`` and ``.gpu_data``):

    command: "PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json --log $OUT/parts.log 2>&1 | tee $OUT/gpu_check.log"
    carry:   [".whl", ".gpu_data"]
    timeout_s: 560

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

# Seconds: each part's own limit on a GPU; they add up to at most the deadline, which counts
# from the check's start (the wheels' install included): 8 min 20 s of the lease. Set from the
# first H200 run (2026-12-04, docs/RESULTS.md "GPU figures"): setup 30 s; the rehearsal did 7 of
# its 22 cases in 20 s (at that rate all 22 need ~63 s); pytest -m gpu ran out of 60 s; the four
# speed cases, run apart at 10 + 2 steps, took 41 / 27 / 54 / 26 s; the fit 96 s at 30 s of
# training per precision (now 20);
# compile 57 s; the captured second-order step (its own part, last: a failed capture can leave
# the CUDA context unusable, so it runs in its own process after the others) ~15 s.
LIMITS = {"setup": 30, "rehearsal": 70, "tests": 65, "speed": 165, "fit": 85, "compile": 55, "graph": 25}
DEADLINE = 500
SMOKE_LIMITS = {"setup": 30, "rehearsal": 30, "tests": 60, "speed": 100, "fit": 120, "compile": 60, "graph": 30}
SMOKE_DEADLINE = 450
# (mode, path) in the order they are compiled until the compile part's time is spent: the quick
# CUDA-graph captures first, then Inductor where it is cheapest (evaluation has no backward)
COMPILE_CASES = (("cudagraphs", "reptile"), ("cudagraphs", "fomaml"), ("cudagraphs", "eval"), ("default", "eval"),
                 ("reduce-overhead", "reptile"), ("default", "fomaml"), ("reduce-overhead", "fomaml"),
                 ("default", "reptile"), ("reduce-overhead", "eval"))
SMOKE_COMPILE_CASES = (("aot_eager", "reptile"), ("aot_eager", "fomaml"), ("aot_eager", "eval"))
GRAPH_CASES = (("cuda_graph", "maml2"),)  # the graph part: second-order MAML's step as one CUDA graph
COMPILE_CASE_S = 25  # what one more case needs at least; with less left the rest are skipped
GRAPH_CASE_S = 8  # the same for the captured step (3 warm-up steps, a capture, 22 replays: ~1 s)
# speed.py's peers that run on a GPU (peer -> the module it imports as); JAX is CPU-only here
TORCH_PEERS = {"learn2learn": "learn2learn", "higher": "higher", "torchopt": "torchopt",
               "parallel_metalearn": "metalearn"}
# each speed case's share of the speed part, in proportion to its time on the H200 (2026-12-04,
# every torch peer beside ours: the peers' per-task loops are most of it)
SPEED_WEIGHTS = {"maml_omniglot_5w1s": 41, "fomaml_omniglot_5w1s": 27, "reptile_omniglot_5w1s": 54,
                 "maml_miniimagenet_shaped_5w1s": 26}
SMOKE_PEER_CASES = ("maml_omniglot_5w1s",)  # where --cpu-smoke runs every torch peer (tests/test_peers.py: the rest)
PEER_KEYS = ("peer_version", "baseline_tasks_per_s", "ratio", "baseline_peak_mem_mb", "baseline_step_s_median",
             "absent")


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
        cases = [(name, [*flags, "--steps", "10", "--warmup", "2"]) for name, flags in cases]
    return cases


# ----------------------------------------------------------------------------- the parent
class Runner:
    def __init__(self, args: argparse.Namespace, env: dict[str, str]) -> None:
        self.args, self.env = args, env
        self.start = time.monotonic()
        self.deadline = SMOKE_DEADLINE if args.cpu_smoke else args.deadline
        self.limits = SMOKE_LIMITS if args.cpu_smoke else LIMITS
        self.device = "cpu" if args.cpu_smoke else "cuda"
        self.optional: dict[str, Any] = {}  # package -> version, or the import's error line

    def left(self) -> float:
        return self.deadline - (time.monotonic() - self.start)

    def budget(self, part: str) -> float:
        """The part's own limit, or what is left of the deadline if that is less (never
        below 5 s: a part always gets to say why it could not run)."""
        return max(5.0, min(self.limits[part], self.left()))

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
                   "--fit-warmup", str(self.args.fit_warmup), "--sync-steps", str(self.args.sync_steps),
                   "--seconds", str(timeout)]
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
    def setup(self) -> dict[str, Any]:
        """The wheels (when jsonargparse is missing) and the optional packages' imports."""
        out: dict[str, Any] = {}
        paths = [str(ROOT)]
        if not module_imports("jsonargparse", self.env)[0]:
            wheels = sorted(WHEELS.glob("*.whl"))
            if not wheels:
                raise RuntimeError(f"jsonargparse is missing and {WHEELS} has no wheels: run "
                                   "`bash benchmarks/gpu_wheels.sh` on a machine with the package index")
            site = Path(tempfile.gettempdir()) / "lit_meta_gpu_site"
            code, output, _ = self.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                        "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
                                        *map(str, wheels)], self.budget("setup"))
            if code != 0:
                raise RuntimeError(f"pip install of {WHEELS}: {last_error_line(output)}")
            paths.append(str(site))  # after the repository: a wheel here ships a top-level `tests` package
            out["wheels"] = [w.name for w in wheels]
        self.env["PYTHONPATH"] = os.pathsep.join(paths + ([self.env["PYTHONPATH"]] if self.env.get("PYTHONPATH")
                                                          else []))
        for package, module in (("jsonargparse", "jsonargparse"), *TORCH_PEERS.items()):
            ok, detail = module_imports(module, self.env)
            self.optional[package] = detail if ok else {"error": detail}
        out["imports"] = dict(self.optional)
        return out

    def rehearsal(self) -> dict[str, Any]:
        lines, error, seconds = self.worker("rehearsal", self.budget("rehearsal"))
        out: dict[str, Any] = {"cases": lines, "seconds": round(seconds, 1),
                               "ok": not error and bool(lines) and all(line["ok"] for line in lines)}
        if error:
            out["error"] = error
        return out

    def tests(self) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            junit = Path(tmp) / "junit.xml"
            # only the files that hold gpu tests: collecting all of tests/ costs the part seconds
            cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "-o",
                   "addopts=", f"--junitxml={junit}", *gpu_test_files()]
            code, output, seconds = self.run(cmd, self.budget("tests"))
            out: dict[str, Any] = {"seconds": round(seconds, 1)}
            if junit.exists():
                out.update(junit_counts(junit.read_text()))
            if code is None:  # no junit file: what finished, from pytest's own lines
                out.update(verbose_counts(output), error="timed out")
            elif code not in (0, 5):  # 5: no test selected
                out["failures"] = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))][:10]
            return out

    def speed(self) -> list[dict[str, Any]]:
        """speed.py per case beside every torch peer that imports; the learn2learn row's
        figures at the entry's top level (as before the other peers), every peer's in ``peers``."""
        importing = [p for p in TORCH_PEERS if isinstance(self.optional.get(p), str)]
        missing = {p: self.optional.get(p, {}).get("error", "not checked") if isinstance(self.optional.get(p), dict)
                   else "not checked" for p in TORCH_PEERS if p not in importing}
        part_end = time.monotonic() + self.budget("speed")
        cases = speed_cases(self.args.cpu_smoke)
        entries = []
        for index, (name, flags) in enumerate(cases):
            # what is left of the part's time, shared by the cases still to run in proportion to
            # their measured times, so the last case gets its turn
            weights = [SPEED_WEIGHTS[n] for n, _ in cases[index:]]
            share = max(5.0, (part_end - time.monotonic()) * weights[0] / sum(weights))
            # --cpu-smoke rehearses the other peers' code on one case, not all four: each peer costs its
            # build and steps in a subprocess, and the smoke has its time limit
            running = [p for p in importing if not self.args.cpu_smoke or p == "learn2learn" or name in SMOKE_PEER_CASES]
            cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), *flags, "--device", self.device,
                   "--compare", *(running or ["none"])]
            code, output, seconds = self.run(cmd, share)
            entry: dict[str, Any] = {"case": name, "seconds": round(seconds, 1)}
            rows = json_lines(output)
            if code == 0 and rows:
                l2l = next((r for r in rows if r.get("peer") == "learn2learn"), rows[0])
                keep = ("ours_tasks_per_s", "baseline_tasks_per_s", "ratio", "ours_peak_mem_mb",
                        "baseline_peak_mem_mb", "ours_step_s_median", "baseline_step_s_median", "algorithm",
                        "dataset", "meta_batch_size", "inner_steps", "queries", "first_order", "learn2learn", "data")
                entry.update({k: l2l.get(k) for k in keep})
                entry.setdefault("ratio", None)
                if "learn2learn" not in importing:
                    entry["ratio"] = entry["baseline_tasks_per_s"] = entry["baseline_peak_mem_mb"] = None
                    entry["baseline"] = f"learn2learn does not import ({missing['learn2learn']}): ours only"
                entry["peers"] = {r["peer"]: {k: r[k] for k in PEER_KEYS if k in r} for r in rows if r.get("peer")}
                entry["peers"].update({p: {"absent": f"{p} does not import ({why})"} for p, why in missing.items()})
                entry["peers"].update({p: {"absent": "not run on this case in --cpu-smoke"}
                                       for p in importing if p not in running})
            else:
                entry["error"] = "timed out" if code is None else last_error_line(output)
            entries.append(entry)
        return entries

    def fit(self) -> dict[str, Any]:
        lines, error, seconds = self.worker("fit", self.budget("fit"))
        out: dict[str, Any] = {}
        for line in lines:
            out.setdefault(line.pop("precision"), {}).update(line)
        for precision in PRECISIONS:
            entry = out.setdefault(precision, {})
            if "steps_per_s" not in entry:
                entry.setdefault("error", error or "not run")
        out["seconds"] = round(seconds, 1)
        return out

    def compile(self, part: str = "compile") -> dict[str, Any]:
        lines, error, seconds = self.worker(part, self.budget(part))
        out: dict[str, Any] = {"cases": lines, "seconds": round(seconds, 1)}
        if error:
            out["error"] = error
        best: dict[str, Any] = {}
        for line in lines:
            if line.get("graphs") and line.get("speedup") and \
                    line["speedup"] > best.get(line["path"], {}).get("speedup", 1.0):
                best[line["path"]] = {"mode": line["mode"], "speedup": line["speedup"]}
        out["faster_than_eager"] = best
        return out


def gpu_test_files() -> list[str]:
    """The test files that hold tests marked ``gpu``, relative to the repository."""
    return sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in path.read_text())


def verbose_counts(output: str) -> dict[str, Any]:
    """Outcomes of the tests that finished, from ``pytest -v`` lines (``path::test PASSED``),
    and the failed ones' names."""
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    keys = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped"}
    for line in output.splitlines():
        words = line.split()
        if len(words) >= 2 and "::" in words[0] and words[1] in keys:
            counts[keys[words[1]]] += 1
            if words[1] in ("FAILED", "ERROR"):
                counts.setdefault("failures", []).append(words[0])
    return counts


def junit_counts(xml: str) -> dict[str, int]:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(xml)
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    total, failed, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return {"passed": total - failed - errors - skipped, "failed": failed, "errors": errors, "skipped": skipped}


def json_lines(output: str) -> list[dict[str, Any]]:
    rows = []
    for line in output.strip().splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def last_error_line(output: str) -> str:
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or line.startswith(("error", "RuntimeError", "SystemExit")):
            return line[:300]
    return (lines[-1] if lines else "failed with no output")[:300]


def module_imports(name: str, env: dict[str, str]) -> tuple[bool, str]:
    """Whether ``import name`` works in a fresh interpreter with ``env``: (True, its version) or
    (False, the error's last line). An import, not ``find_spec``: a package that is there but
    cannot import (a wheel built for another torch) must not be reported as usable."""
    probe = f"import {name}; print(getattr({name}, '__version__', 'unknown'))"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    if done.returncode == 0:
        return True, done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "unknown"
    return False, last_error_line(done.stderr)


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
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if args.cpu_smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    runner = Runner(args, env)
    summary: dict[str, Any] = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu",
                               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "deadline_s": runner.deadline, "limits_s": dict(runner.limits)}
    parts: dict[str, Callable[[], Any]] = {"setup": runner.setup, "device": device_info,
                                           "rehearsal": runner.rehearsal, "tests": runner.tests,
                                           "speed": runner.speed, "fit": runner.fit, "compile": runner.compile,
                                           "graph": lambda: runner.compile("graph")}
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


def fit_cli(args: argparse.Namespace, precision: str, root: Path, tmp: Path, extra: list[str]) -> Any:
    """The fit config on ``root`` for ``precision`` (smoke: a tiny network and meta-batch)."""
    from lit_meta.cli import MetaCLI

    torch.set_float32_matmul_precision("high")  # as lit_meta.cli.main does: TF32 matmuls on CUDA
    overrides = ["--config", str(FIT_CONFIG), "--data.init_args.root", str(root), "--trainer.precision", precision,
                 "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
                 "--trainer.enable_model_summary", "false", "--trainer.enable_progress_bar", "false",
                 "--trainer.accelerator", args.device, "--trainer.devices", "1",
                 "--trainer.default_root_dir", str(tmp), *extra]
    if args.cpu_smoke:
        overrides += ["--model.init_args.meta_batch_size", "4",
                      "--model.init_args.backbone_kwargs", '{"filters": 8, "max_pool": false}',
                      "--data.init_args.val_tasks", "8", "--data.init_args.eval_batch_size", "4",
                      "--data.init_args.eval_queries", "2"]
    return MetaCLI(args=overrides, run=False)


def sync_check(args: argparse.Namespace, precision: str, root: Path, tmp: Path) -> dict[str, Any]:
    """``--sync-steps`` steps logging every 5, a validation after step 10 (an epoch of 10 steps),
    all under :class:`lit_meta.sync_guard.SyncWindow`."""
    from lit_meta.sync_guard import SyncWindow

    steps = args.sync_steps
    # one step more than the window, so that it closes before the fit's end (whose last progress
    # line and divergence-counter read are the end of training, not a step's); with a progress bar,
    # whose values must be host copies (MetaModule.log_training_values: a CPU test cannot tell)
    cli = fit_cli(args, precision, root, tmp, [
        "--trainer.max_steps", str(steps + 1), "--trainer.enable_progress_bar", "true",
        "--trainer.log_every_n_steps", "5", "--data.init_args.steps_per_epoch",
        "10", "--data.init_args.val_tasks", "8" if args.cpu_smoke else "20"])
    window = SyncWindow(steps, cuda=args.device == "cuda")
    cli.trainer.callbacks.append(window)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return window.summary()


def timed_fit(args: argparse.Namespace, precision: str, root: Path, tmp: Path) -> dict[str, Any]:
    """The config as it trains (logging every 100 steps), timed after ``--fit-warmup`` steps."""
    cli = fit_cli(args, precision, root, tmp, ["--trainer.max_steps", str(args.fit_steps),
                                               "--trainer.limit_val_batches", "0"])
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    timer = StepClock(args.device, args.fit_warmup, args.fit_seconds)
    trainer.callbacks.append(timer)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, datamodule=dm)
    record: dict[str, Any] = {"steps": trainer.global_step, "timed_steps": timer.timed_steps,
                              "timed_seconds": round(timer.seconds, 2)}
    record["steps_per_s"] = round(timer.timed_steps / timer.seconds, 2) if timer.seconds > 0 else None
    if args.device == "cuda":
        record["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    # validation: the config's 600 fixed tasks (3 adaptation steps); the second pass is timed
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
    draws = 5 if args.cpu_smoke else 50
    synchronize(args.device)
    begin = time.perf_counter()
    for step in range(draws):
        dm.train_batch(100000 + step)
    synchronize(args.device)
    record["sample_ms"] = round(1000 * (time.perf_counter() - begin) / draws, 3)
    return record


class StepClock(pl.Callback):
    """Times the fit after ``warmup`` steps (synchronised at both ends) and stops it after
    ``seconds`` of timed training."""

    def __init__(self, device: str, warmup: int, seconds: float) -> None:
        self.device, self.warmup, self.budget = device, warmup, seconds
        self.begin: float | None = None
        self.begin_step = 0
        self.timed_steps, self.seconds = 0, 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step == self.warmup:
            synchronize(self.device)
            self.begin, self.begin_step = time.perf_counter(), step
        elif self.begin is not None and time.perf_counter() - self.begin > self.budget:
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.begin is not None:
            synchronize(self.device)
            self.seconds = time.perf_counter() - self.begin
            self.timed_steps = trainer.global_step - self.begin_step


def error_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def worker_fit(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_fit_"))
    if (OMNIGLOT / "images_background.npz").is_file() and not args.cpu_smoke:
        root, data = OMNIGLOT, "omniglot npz packs (.gpu_data/omniglot), Finn split"
    else:
        root, data = tmp / "synthetic_omniglot", "synthetic Omniglot-shaped pool: val_acc is not meaningful"
        synthetic_omniglot(root, args.cpu_smoke)
    for precision in PRECISIONS:
        for name, part in (("sync_check", sync_check), ("timed", timed_fit)):
            try:
                record = part(args, precision, root, tmp)
                record = {"sync_check": record} if name == "sync_check" else {**record, "data": data}
            except Exception as error:  # the other fits still run
                record = {f"{name}_error": error_line(error)}
            emit(args.result, {"precision": precision, **record})


def worker_rehearsal(args: argparse.Namespace) -> None:
    from lit_meta.rehearsal import CASES, rehearse_case

    for name in CASES:
        try:
            report = rehearse_case(name)
            emit(args.result, {"case": name, "ok": report.ok, "parts": report.parts, "error": report.error})
        except Exception as error:
            emit(args.result, {"case": name, "ok": False, "error": error_line(error)})


def worker_compile(args: argparse.Namespace) -> None:
    """Each (mode, path) of :data:`COMPILE_CASES` (the graph part: :data:`GRAPH_CASES`), eager
    first, on one fixed batch, Dynamo reset before each case; cases that no longer fit the part's
    time are reported skipped."""
    from lit_meta.algorithms import MAML, Reptile
    from lit_meta.bench.graphed_step import GraphedStep
    from lit_meta.episode import run_tasks
    from lit_meta.internals import compiled_graph_count
    from lit_meta.tasks import TaskBatch, task_spec

    end = time.monotonic() + args.seconds - 5  # leave the parent time to read the lines
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

    def model(path: str, mode: str | None):
        torch.manual_seed(0)
        common = dict(task_spec=spec, backbone_kwargs={"filters": filters}, meta_batch_size=tasks,
                      compile_tasks=None if mode == "cuda_graph" else mode)
        if path == "reptile":
            return Reptile(inner_steps=1 if smoke else 5, inner_lr=0.001, **common).to(device)
        return MAML(inner_lr=0.4, inner_steps=1, first_order=path != "maml2", eval_inner_steps=3, **common).to(device)

    def call(m, path: str) -> torch.Tensor:
        """One meta-step (training paths; returns a parameter) or one evaluation (its losses);
        ``m`` a GraphedStep: one replay of the captured second-order step."""
        if isinstance(m, GraphedStep):
            return m(train)
        if path == "eval":
            with torch.enable_grad():
                return run_tasks(m, evaluation, m.context(False, evaluation), 3, True)["final_query_loss"]
        m.outer_update(train)
        return next(m.net.parameters()).detach()

    def clock(m, path: str) -> float:
        synchronize(args.device)
        begin = time.perf_counter()
        for _ in range(calls):
            call(m, path)
        synchronize(args.device)
        return 1000 * (time.perf_counter() - begin) / calls

    cases = GRAPH_CASES if args.worker == "graph" else SMOKE_COMPILE_CASES if smoke else COMPILE_CASES
    eager: dict[str, tuple[torch.Tensor, float]] = {}
    for path in dict.fromkeys(p for _, p in cases):  # eager first: the reference values and times
        m = model(path, None)
        first = call(m, path).clone()
        call(m, path)  # warm-up
        eager[path] = (first, clock(m, path))
        emit(args.result, {"path": path, "mode": "eager", "ms_per_call": round(eager[path][1], 3)})
    for mode, path in cases:
        record: dict[str, Any] = {"path": path, "mode": mode}
        if end - time.monotonic() < (5 if smoke else GRAPH_CASE_S if args.worker == "graph" else COMPILE_CASE_S):
            emit(args.result, {**record, "skipped": "time"})
            continue
        try:
            torch.compiler.reset()  # each case compiles afresh: no recompile limit shared with the others
            graphs = compiled_graph_count()
            m = model(path, mode)
            begin = time.perf_counter()
            if mode == "cuda_graph":
                # the whole eager second-order step, captured on CUDA after 3 warm-up steps (capture
                # records, it does not run); against 4 eager steps of the same Adam on a twin
                captured = device.type == "cuda"
                m = GraphedStep(m, train, capture=captured, warmup=3)
                synchronize(args.device)
                record["compile_s"] = round(time.perf_counter() - begin, 1)
                record["graphs"] = int(m.graph is not None)
                after = call(m, path).clone()
                twin = GraphedStep(model(path, None), train, capture=False)
                for _ in range(4 if captured else 1):
                    expected = twin(train)
                record["max_abs_diff"] = float((after.float() - expected.float()).abs().max())
            else:
                first = call(m, path).clone()
                synchronize(args.device)
                record["compile_s"] = round(time.perf_counter() - begin, 1)
                record["graphs"] = compiled_graph_count() - graphs
                record["max_abs_diff"] = float((first.float() - eager[path][0].float()).abs().max())
            call(m, path)
            ms = clock(m, path)
            record.update(ms_per_call=round(ms, 3), speedup=round(eager[path][1] / ms, 3))
        except Exception as error:
            record["error"] = error_line(error)
        emit(args.result, record)


# ----------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="also write the JSON summary to this file")
    p.add_argument("--log", help="append every part's own output to this file")
    p.add_argument("--cpu-smoke", action="store_true", help="the same code paths with tiny sizes on the CPU")
    p.add_argument("--skip", nargs="*", default=[],
                   choices=("rehearsal", "tests", "speed", "fit", "compile", "graph"))
    p.add_argument("--deadline", type=float, default=DEADLINE, help="seconds all parts share (GPU)")
    p.add_argument("--fit-steps", type=int, default=None, help="most timed-fit steps per precision (GPU 4000, smoke 8)")
    p.add_argument("--fit-seconds", type=float, default=None, help="most timed training seconds per precision")
    p.add_argument("--fit-warmup", type=int, default=None, help="untimed steps first (GPU 100, smoke 3)")
    p.add_argument("--sync-steps", type=int, default=None, help="steps of the sync check (GPU 12, smoke 12)")
    p.add_argument("--verbose", action="store_true", help="copy the parts' output to stderr")
    p.add_argument("--worker", choices=("fit", "compile", "graph", "rehearsal"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)  # a worker's time
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    for name, gpu, cpu in (("fit_steps", 4000, 8), ("fit_seconds", 20.0, 60.0), ("fit_warmup", 100, 3),
                           ("sync_steps", 12, 12)):
        if getattr(args, name) is None:
            setattr(args, name, cpu if smoke else gpu)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        {"fit": worker_fit, "compile": worker_compile, "graph": worker_compile,
         "rehearsal": worker_rehearsal}[args.worker](args)
        return
    summary = main_parent(args)
    line = json.dumps(summary)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()
