"""Every algorithm on Omniglot 5-way 1-shot for the same wall-clock budget, with and without
Gradient Agreement, meta-tested on the same 600 tasks: one table, one JSON file, one figure.

    python benchmarks/omniglot_table.py --data-root ../shared/data/omniglot

trains MAML, FOMAML, Reptile, Meta-SGD, MAML++, ANIL, the transfer baseline, Prototypical
Networks, R2-D2, iMAML and BOIL from their
own configs (``configs/omniglot/<algo>_5w1s.yaml``: the papers' hyperparameters, schedules
over the papers' step counts) and MAML, FOMAML and Reptile again with ``weighting:
gradient_agreement`` (Eshratifar et al. 2018), each stopped by Lightning's ``max_time`` after
``--budget-minutes`` (default 10, validation included) with one intra-op thread,
``--jobs`` (default 2) runs at a time. Every run then meta-tests its best checkpoint (by
validation accuracy) on the same tasks: 600 Finn-split test tasks, 1 query per class, test
classes turned by random quarter turns (cbfinn/maml's protocol), the same seed and chunking,
so the tasks are identical for all; what differs is each algorithm's own test-time procedure
(its steps, rule and BatchNorm mode, listed in the table). Validation (``--val-tasks``, the
same tasks for all) runs about ``--validations`` times per budget.

Writes: a Markdown table into ``--results-md`` (docs/RESULTS.md) between the markers
``<!-- omniglot_table:begin -->`` / ``<!-- omniglot_table:end -->`` (appended with a heading
if absent), the JSON ``--json`` (every run's row, results.json and command), the figure
``--figure`` (validation accuracy against wall-clock minutes, all runs), and each run's
logs under ``--out-dir``. ``--only maml,reptile+ga`` runs a subset (the names of the table).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- omniglot_table:begin -->", "<!-- omniglot_table:end -->"
GA = ["--model.init_args.weighting", "gradient_agreement"]

# name -> (config, extra arguments, rough meta-steps per second on one core of the 2-core CPU,
# from the 20-step runs in docs/RESULTS.md; only used to space the validations)
RUNS: dict[str, tuple[str, list[str], float]] = {
    "maml": ("maml_5w1s", [], 2.5),
    "fomaml": ("fomaml_5w1s", [], 6.0),
    "reptile": ("reptile_5w1s", [], 6.0),
    "metasgd": ("metasgd_5w1s", [], 3.0),
    "mamlpp": ("mamlpp_5w1s", [], 0.4),
    "anil": ("anil_5w1s", [], 5.0),
    "transfer": ("transfer_5w1s", [], 8.0),
    "protonet": ("protonet_5w1s", [], 1.0),
    "r2d2": ("r2d2_5w1s", [], 1.0),
    "imaml": ("imaml_5w1s", [], 0.3),
    "boil": ("boil_5w1s", [], 2.5),
    "maml+ga": ("maml_5w1s", GA, 2.5),
    "fomaml+ga": ("fomaml_5w1s", GA, 6.0),
    "reptile+ga": ("reptile_5w1s", GA, 6.0),
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.platform()


def max_time(minutes: float) -> str:
    seconds = max(1, round(minutes * 60))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    mins, secs = divmod(rest, 60)
    return f"{days:02d}:{hours:02d}:{mins:02d}:{secs:02d}"


def command(name: str, args: argparse.Namespace) -> list[str]:
    config, extra, speed = RUNS[name]
    # the config's own validation interval (configs/omniglot/protocol.yaml: 1000), as a cap
    steps_per_epoch = {"mamlpp_5w1s": 500, "metalstm_5w1s": 600, "quick_5w1s": 500}.get(config, 1000)
    every = max(1, min(steps_per_epoch, round(speed * args.budget_minutes * 60 / max(args.validations, 1))))
    return [
        sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / "configs" / "omniglot" / f"{config}.yaml"),
        "--data.root", str(args.data_root),
        "--trainer.max_time", max_time(args.budget_minutes),
        "--trainer.val_check_interval", str(every),
        "--trainer.logger.init_args.save_dir", str(args.out_dir),
        "--trainer.logger.init_args.name", name.replace("+", "_"),
        # the same validation and test tasks for every run: the MAML test protocol
        "--data.seed", "0", "--data.eval_shots", "1", "--data.eval_queries", "1", "--data.eval_rotations", "true",
        "--data.val_tasks", str(args.val_tasks), "--data.test_tasks", str(args.test_tasks),
        "--data.eval_batch_size", str(args.eval_batch_size),
        *extra, *args.extra,
    ]


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = command(name, args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    log = args.out_dir / f"{name.replace('+', '_')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=handle, text=True, env=env, cwd=REPO)
        handle.write(done.stdout)
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("results: ")]
    if done.returncode or not lines:
        return {"name": name, "error": f"exit {done.returncode}, see {log}", "command": cmd, "wall_s": wall}
    path = Path(lines[-1].removeprefix("results: "))
    return {"name": name, "results_json": str(path), "results": json.loads(path.read_text()), "command": cmd,
            "wall_s": round(wall, 1), "log": str(log)}


def row(entry: dict[str, Any]) -> dict[str, Any]:
    if "error" in entry:
        return {"name": entry["name"], "error": entry["error"]}
    r = entry["results"]
    m = r.get("metrics", {})
    return {"name": entry["name"], "algorithm": r.get("algorithm"), "acc": m.get("test/acc"),
            "ci95": m.get("test/acc_ci95"), "acc_before": m.get("test/acc_before"), "steps": r.get("train/steps"),
            "train_s": r.get("train/seconds"), "test_steps": r.get("test/adapt_steps"), "bn": r.get("bn"),
            "test_batch": r.get("test/inner_batch_size"), "acc_by_step": m.get("test/acc_by_step"),
            "best_val": max((v.get("val/acc", 0.0) for v in r.get("val_curve", [])), default=None)}


def pct(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any]) -> str:
    out = [f"`{info['command']}` — {info['date']}, {info['machine']}, load average {info['load_before']} before, "
           f"{info['load_after']} after.", "",
           f"Budget {args.budget_minutes:g} min of fit per run (Lightning `max_time`, validation included), one "
           f"intra-op thread, {args.jobs} runs at a time; each config's own hyperparameters (learning-rate "
           "schedules over the paper's step count, cut short by the budget). Test: the best checkpoint by "
           f"validation accuracy ({args.val_tasks} validation tasks), on the same {args.test_tasks} Finn-split "
           "tasks for every run, 1 query per class, rotated test classes (cbfinn/maml's protocol); each "
           "algorithm adapts with its own test-time procedure.", "",
           "| run | test accuracy % (± 95% CI) | before adaptation % | steps | train s | test-time steps | BN at test |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['name']} | failed: {r['error']} | | | | | |")
            continue
        steps = f"{r['test_steps']}" + (f" (batches of {r['test_batch']})" if r.get("test_batch") else "")
        out.append(f"| {r['name']} | **{pct(r['acc'])}** ± {pct(r['ci95'])} | {pct(r['acc_before'])} | {r['steps']} | "
                   f"{r['train_s']:.0f} | {steps} | {r['bn']} |")
    by_name = {r["name"]: r for r in rows if "error" not in r}
    verdicts = []
    for base in ("maml", "fomaml", "reptile"):
        a, b = by_name.get(base), by_name.get(f"{base}+ga")
        if a and b and a["acc"] is not None and b["acc"] is not None:
            diff, margin = b["acc"] - a["acc"], math.hypot(a["ci95"] or 0.0, b["ci95"] or 0.0)
            word = "helped" if diff > margin else "hurt" if diff < -margin else "made no measurable difference"
            verdicts.append(f"- Gradient Agreement {word} on {base}: {pct(b['acc'])} vs {pct(a['acc'])} % "
                            f"({100 * diff:+.2f} points; combined 95% half-width {100 * margin:.2f}).")
    if verdicts:
        out += ["", *verdicts]
    out += ["", f"![validation accuracy against wall-clock time]({os.path.relpath(args.figure, args.results_md.parent)})"]
    return "\n".join(out) + "\n"


def write_markdown(path: Path, text: str) -> None:
    current = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{text}{END}"
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        updated = head + block + rest.split(END, 1)[1]
    else:
        updated = current.rstrip("\n") + "\n\n### Omniglot 5-way 1-shot: every algorithm for one wall-clock budget\n\n" \
            + block + "\n"
    path.write_text(updated)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "omniglot")
    p.add_argument("--budget-minutes", type=float, default=10.0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(RUNS)}")
    p.add_argument("--validations", type=int, default=10, help="about how many validations per budget")
    p.add_argument("--val-tasks", type=int, default=100)
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--eval-batch-size", type=int, default=100)
    p.add_argument("--out-dir", type=Path, default=REPO / "logs" / "omniglot_table")
    p.add_argument("--results-md", type=Path, default=REPO / "docs" / "RESULTS.md")
    p.add_argument("--json", type=Path, default=REPO / "docs" / "figures" / "omniglot_table.json")
    p.add_argument("--figure", type=Path, default=REPO / "docs" / "figures" / "omniglot_table.png")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py arguments for every run")
    args = p.parse_args(argv)
    names = list(RUNS) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        print(f"error: unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}", file=sys.stderr)
        return 2
    if not args.data_root.exists():
        print(f"error: Omniglot data root not found: {args.data_root} (set --data-root)", file=sys.stderr)
        return 2
    args.out_dir = args.out_dir.resolve()
    info = {"command": "python benchmarks/omniglot_table.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{os.cpu_count()} cores, {cpu_name()}",
            "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        entries = list(pool.map(lambda n: run_one(n, args), names))
    info["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = [row(e) for e in entries]
    for r in rows:
        print(json.dumps({k: v for k, v in r.items() if k != "acc_by_step"}))

    from lit_meta.curves import plot_runs, read_run

    curves = [read_run(Path(e["results_json"]), e["name"]) for e in entries if "results_json" in e]
    if curves:
        plot_runs(curves, args.figure, x="time", panels=("validation",),
                  title=f"Omniglot 5-way 1-shot, {args.budget_minutes:g} min per run")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"info": info, "budget_minutes": args.budget_minutes, "rows": rows,
                                     "runs": entries}, indent=1))
    write_markdown(args.results_md, markdown(rows, args, info))
    print(f"table: {args.results_md}\njson: {args.json}\nfigure: {args.figure}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
