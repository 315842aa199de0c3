"""Loss curves of a learned-optimizer run: ``python scripts/plot_learned_optimizer.py RESULTS_JSON OUT_PNG [--title T]``.

Reads ``loss_curves`` and ``tuned_lr`` that ``LearningToLearn`` puts in results.json
(mean f(θ_t) over the held-out test functions, t = 0..eval_steps) and draws them on a
log scale, as Figure 2 of Andrychowicz et al. 2016.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

LABELS = {"learned": "LSTM (learned)", "sgd": "SGD", "rmsprop": "RMSprop", "adam": "Adam", "nag": "NAG"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--title", default=None)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(args.results.read_text())
    curves, lrs = results.get("loss_curves"), results.get("tuned_lr", {})
    if not curves:
        raise SystemExit(f"error: {args.results} has no loss_curves (not a LearningToLearn run?)")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, curve in curves.items():
        label = LABELS.get(name, name) + (f" (lr {lrs[name]:g})" if name in lrs else "")
        ax.plot(range(len(curve)), curve, label=label, lw=2.2 if name == "learned" else 1.3,
                color="black" if name == "learned" else None)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("mean loss over held-out functions")
    ax.set_title(args.title or f"{results.get('dataset')}: learned optimizer vs tuned baselines")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
