"""Sine regression: MAML, FOMAML, Reptile, Meta-SGD, the transfer baseline and a random
init, trained with one shared budget of meta-steps, then adapted on fixed test tasks.

Writes
- ``docs/figures/sine_adaptation.png``: test MSE vs inner steps 0..10 (mean ± 95% CI);
- ``docs/figures/sine_fits.png``: one test task, support points, true curve and the
  prediction after 0, 1 and 10 steps, for each method;
and prints a markdown table (also GA on/off for MAML and Reptile) for docs/RESULTS.md.

    python benchmarks/sine_compare.py --steps 3000
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from lit_meta.algorithms import MAML, MetaSGD, Reptile, Transfer
from lit_meta.algorithms.base import MetaLearner
from lit_meta.data import SineDataModule
from lit_meta.data.sine import sine_tasks
from lit_meta.episode import adapt_task, run_tasks

ROOT = Path(__file__).resolve().parent.parent


def methods(spec: dict) -> dict[str, MetaLearner]:
    common = {"task_spec": spec, "meta_batch_size": 25}
    return {
        "maml": MAML(**common, inner_lr=0.01, inner_steps=1, meta_lr=1e-3),
        "fomaml": MAML(**common, inner_lr=0.01, inner_steps=1, first_order=True, meta_lr=1e-3),
        "metasgd": MetaSGD(**common, inner_lr=0.01, inner_steps=1, meta_lr=1e-3),
        "reptile": Reptile(**common, inner_optimizer="sgd", inner_lr=0.02, inner_steps=5, meta_lr=1.0),
        "transfer": Transfer(**common, inner_lr=0.01, inner_steps=0, meta_lr=1e-3),
        "maml+GA": MAML(**common, inner_lr=0.01, inner_steps=1, meta_lr=1e-3, weighting="gradient_agreement"),
        "reptile+GA": Reptile(**common, inner_optimizer="sgd", inner_lr=0.02, inner_steps=5, meta_lr=1.0,
                              weighting="gradient_agreement"),
        "random init": MAML(**common, inner_lr=0.01, inner_steps=1),
    }


def curve(model: MetaLearner, batch, max_steps: int) -> tuple[list[float], list[float]]:
    """Test MSE after k = 0..max_steps steps of each method's own inner rule: SGD at 0.01
    (MAML, FOMAML, transfer, random init), SGD at 0.02 (Reptile), learned rates (Meta-SGD)."""
    means, cis = [], []
    for k in range(max_steps + 1):
        out = run_tasks(model, batch, model.context(False, batch), k, True)
        losses = out["final_query_loss"].double()
        means.append(losses.mean().item())
        cis.append(1.96 * losses.std().item() / math.sqrt(losses.numel()))
    return means, cis


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="meta-steps per method (shared budget)")
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    args = parser.parse_args()
    torch.manual_seed(0)
    dm = SineDataModule(meta_batch_size=25, test_tasks=args.test_tasks, eval_batch_size=args.test_tasks)
    test = dm.eval_batch("test", 0)
    results: dict[str, dict] = {}
    models = methods(dm.task_spec)
    init = models["random init"].state_dict()
    for name, model in models.items():
        model.net.load_state_dict({k.removeprefix("net."): v for k, v in init.items() if k.startswith("net.")})
        start = time.perf_counter()
        if name != "random init":
            for step in range(args.steps):
                model.outer_update(dm.train_batch(step))
        means, cis = curve(model, test, 10)
        results[name] = {"mse": means, "ci95": cis, "train_seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps({"method": name, "mse_0": round(means[0], 3), "mse_1": round(means[1], 3),
                          "mse_10": round(means[10], 3), "ci95_10": round(cis[10], 3),
                          "train_seconds": results[name]["train_seconds"]}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sine_compare.json").write_text(json.dumps({"steps": args.steps, "results": results}, indent=1))
    plot(results, models, args.out)
    print("\n| method | MSE 0 steps | MSE 1 step | MSE 5 steps | MSE 10 steps (± 95% CI) | train s |"
          "\n|---|---|---|---|---|---|")
    for name, r in results.items():
        m, c = r["mse"], r["ci95"]
        print(f"| {name} | {m[0]:.3f} | {m[1]:.3f} ± {c[1]:.3f} | {m[5]:.3g} | {m[10]:.3g} ± {c[10]:.3g} "
              f"| {r['train_seconds']} |")


def plot(results: dict, models: dict[str, MetaLearner], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = list(range(11))
    for name, r in results.items():
        mean, ci = torch.tensor(r["mse"]), torch.tensor(r["ci95"])
        ax.plot(steps, mean, marker="o", ms=3, label=name, ls="--" if "GA" in name else "-")
        ax.fill_between(steps, mean - ci, mean + ci, alpha=0.15)
    # Meta-SGD's rates are learned for the one training step; repeated, they diverge
    # (MSE 1e5 by step 3), so the axis is clipped and the divergence is labelled.
    ax.set(xlabel="inner gradient steps at test", ylabel="test MSE (K=10)", yscale="log", ylim=(0.05, 10),
           title="Sine regression: adaptation from each initialisation")
    for name, r in results.items():
        over = [k for k, v in enumerate(r["mse"]) if not v < 10]
        if over:
            ax.annotate(f"{name} diverges (step {over[0]}: {r['mse'][over[0]]:.0e})", (over[0], 9),
                        fontsize=7, ha="left", va="top")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sine_adaptation.png", dpi=120)

    generator = torch.Generator().manual_seed(12345)
    batch, amp, phase = sine_tasks(generator, 1, 10, 0)
    xs = torch.linspace(-5, 5, 200).view(1, -1, 1)
    names = [n for n in models if "GA" not in n]
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3), sharey=True)
    for ax, name in zip(axes, names):
        model = models[name]
        ax.plot(xs[0, :, 0], amp * torch.sin(xs[0, :, 0] - phase), "k", lw=1, label="true")
        ax.scatter(batch.support_x[0, :, 0], batch.support_y[0, :, 0], c="k", s=12, label="support")
        params = {n: p.detach() for n, p in model.net.named_parameters()}
        for k in (0, 1, 10):
            adapted = adapt_task(model, params, batch.support_x[0], batch.support_y[0], k, True, model.context(False))
            with torch.no_grad():
                ax.plot(xs[0, :, 0], model.forward_fn(adapted.params, xs[0])[:, 0], label=f"{k} steps")
        ax.set_title(name, fontsize=9)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "sine_fits.png", dpi=120)


if __name__ == "__main__":
    main()
