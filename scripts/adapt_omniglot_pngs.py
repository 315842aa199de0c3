"""Adapt a checkpoint to held-out Omniglot evaluation characters written out as PNG files.

    python scripts/adapt_omniglot_pngs.py CKPT TASKS   (needs ../shared/data/omniglot)

Each task is written as the official PNGs (mode "1"): ``support/<char>/`` with one drawer
and ``query/<char>/`` with five others, from characters of the Finn test split that
come from the evaluation half (never seen in training). It is adapted with ``lit_meta.adapt``,
exactly as ``train.py adapt`` does. Prints a markdown row per setting:

- 5-way with the checkpoint's own head, and on the *same* tasks with that head zeroed
  (the paired difference is the cost of starting from a zero head);
- 3- and 10-way, where ``adapt`` resizes the head to zeros.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lit_meta.adapt import adapt, read_query_folder, read_support_folder
from lit_meta.checkpoint import load_checkpoint
from lit_meta.data import OmniglotDataModule

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
BACKGROUND_CHARACTERS = 964


def held_out_characters() -> list[int]:
    """Evaluation-half indices of the Finn test characters."""
    split = OmniglotDataModule(str(ROOT), split="finn").split_classes(1623, BACKGROUND_CHARACTERS)
    return [int(c) - BACKGROUND_CHARACTERS for c in split["test"] if c >= BACKGROUND_CHARACTERS]


def write_task(images: np.ndarray, characters: list[int], folder: Path, rng: np.random.Generator,
               ways: int, shots: int = 1, queries: int = 5) -> tuple[Path, Path]:
    for c in rng.choice(characters, ways, replace=False):
        drawers = rng.permutation(images.shape[1])[:shots + queries]
        for part, chosen in (("support", drawers[:shots]), ("query", drawers[shots:])):
            target = folder / part / f"char{c:03d}"
            target.mkdir(parents=True)
            for k in chosen:
                Image.fromarray(images[c, k]).save(target / f"{c:04d}_{k + 1:02d}.png")
    return folder / "support", folder / "query"


def zero_head_accuracy(ckpt: str, support: Path, query: Path) -> float:
    """``adapt`` with the checkpoint's head zeroed: what a resized head starts from."""
    model = load_checkpoint(ckpt)
    support_images, support_y, names = read_support_folder(support, model.task_spec)
    query_images, query_y = read_query_folder(query, model.task_spec, names)
    torch.nn.init.zeros_(model.net.head.weight)
    torch.nn.init.zeros_(model.net.head.bias)
    logits = model.adapt_and_predict(support_images.images, support_y, query_images.images)
    return float((logits.argmax(-1) == query_y).float().mean())


def row(label: str, accs: list[float], chance: float) -> str:
    a = np.array(accs)
    return f"| {label} | {len(a)} | {a.mean():.3f} ± {1.96 * a.std(ddof=1) / np.sqrt(len(a)):.3f} | {chance:.2f} |"


def main() -> None:
    ckpt, tasks = sys.argv[1], int(sys.argv[2])
    images = np.load(ROOT / "images_evaluation.npz")["images"]  # bool [659, 20, 105, 105], True = paper
    characters = held_out_characters()
    print(f"{len(characters)} held-out evaluation characters in the finn test split")
    out = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)

    own, zeroed = [], []
    for t in range(tasks):
        support, query = write_task(images, characters, out / f"5way_{t}", rng, 5)
        own.append(adapt(ckpt, support, query).accuracy)
        zeroed.append(zero_head_accuracy(ckpt, support, query))
    print(row("5-way, own head", own, 0.2), flush=True)
    print(row("5-way, head zeroed (same tasks)", zeroed, 0.2), flush=True)
    print(row("paired difference zeroed − own", list(np.array(zeroed) - np.array(own)), 0.0), flush=True)
    for ways in (3, 10):
        accs = [adapt(ckpt, *write_task(images, characters, out / f"{ways}way_{t}", rng, ways)).accuracy
                for t in range(tasks)]
        print(row(f"{ways}-way, resized zero head", accs, 1 / ways), flush=True)
    print("example task:", out / "5way_0")


if __name__ == "__main__":
    main()
