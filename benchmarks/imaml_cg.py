"""How well iMAML's conjugate gradient solves (I + H/λ) v = g on real tasks (Rajeswaran et al. 2019).

For each task of one training batch: adapt as the meta-step does, then run conjugate gradient on
the implicit system and report whether it met a direction of non-positive curvature (A indefinite:
the support loss curves down faster than λ, where ``lit_meta.algorithms.imaml.implicit_gradient``
stops), the relative residual ‖Av − g‖/‖g‖ and cos(v, g). For a checkpoint and for the same
config's untrained network:

    python benchmarks/imaml_cg.py --config configs/omniglot/imaml_5w1s.yaml --data-root DIR [--ckpt LAST.ckpt]

prints one JSON line per network. A diagnostic of the solve, not a speed or accuracy figure.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from torch.func import grad

Params = dict[str, torch.Tensor]


def dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[n] * b[n]).sum() for n in a)


def probe(model: Any, batch: Any, damping: float = 0.0, lam_damping: float = 0.0) -> dict[str, Any]:
    from lit_meta.episode import adapt_task

    ctx = model.context(True, batch)
    lam = model.lam + lam_damping
    stopped, residuals, cosines = [], [], []
    for t in range(batch.num_tasks):
        sx, sy, qx, qy = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]
        theta = {n: p.detach() for n, p in model.inner_params().items()}
        with torch.enable_grad():
            adapted = adapt_task(model, theta, sx, sy, model.inner_steps, True, ctx).params
            phi = {n: adapted[n].detach() for n in model.adapt_names()}
            g = grad(lambda p: model.loss_fn(model.predict(p, sx, sy, qx, model.inner_steps, ctx), qy))(phi)
            support_grad = grad(lambda p: model.support_loss_fn(model.forward_fn(p, sx, model.inner_steps), sy))

            def apply(v: Params) -> Params:
                hv = grad(lambda p: dot(support_grad(p), v))(phi)
                return {n: (1 + damping) * v[n] + hv[n] / lam for n in v}

            v = {n: torch.zeros_like(x) for n, x in g.items()}
            r, p, rr, stop = dict(g), dict(g), dot(g, g), None
            for k in range(model.cg_steps):
                ap = apply(p)
                pap = dot(p, ap)
                if pap <= 0:
                    stop = k
                    break
                alpha = rr / pap
                v = {n: v[n] + alpha * p[n] for n in v}
                r = {n: r[n] - alpha * ap[n] for n in r}
                new = dot(r, r)
                p = {n: r[n] + (new / rr) * p[n] for n in p}
                rr = new
            av = apply(v)
            residuals.append(float(torch.sqrt(dot({n: av[n] - g[n] for n in g}, {n: av[n] - g[n] for n in g}))
                                   / torch.sqrt(dot(g, g))))
            cosines.append(float(dot(v, g) / (torch.sqrt(dot(v, v) * dot(g, g)) + 1e-30)))
        stopped.append(stop)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"tasks": batch.num_tasks, "stopped": sum(s is not None for s in stopped),
            "stopped_at_cg_step": sorted(s for s in stopped if s is not None),
            "residual_median": median(residuals), "residual_max": max(residuals),
            "cos_v_g_median": median(cosines), "cg_steps": model.cg_steps, "lam": model.lam,
            "cg_damping": damping, "lam_damping": lam_damping}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/omniglot/imaml_5w1s.yaml")
    p.add_argument("--data-root", required=True)
    p.add_argument("--ckpt", default=None, help="a checkpoint of that config (default: the untrained network only)")
    p.add_argument("--step", type=int, default=0, help="the training batch's step")
    p.add_argument("--cg-damping", type=float, default=0.0)
    p.add_argument("--lam-damping", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lit_meta.cli import MetaCLI

    cli = MetaCLI(args=["--config", args.config, "--data.root", args.data_root, "--trainer.logger", "false"], run=False)
    model, dm = cli.model, cli.datamodule
    dm.setup("fit")
    model.train()
    batch = dm.train_batch(args.step)
    networks = [("untrained", None)] + ([("checkpoint", args.ckpt)] if args.ckpt else [])
    for name, path in networks:
        if path:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
        row = probe(model, batch, args.cg_damping, args.lam_damping)
        print(json.dumps({"network": name, "ckpt": path, "step": args.step, **row}), flush=True)


if __name__ == "__main__":
    main()
