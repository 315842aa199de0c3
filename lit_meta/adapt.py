"""``train.py adapt``: fine-tune a meta-trained checkpoint on one new task given as files.

    python train.py adapt --ckpt_path CKPT --support DIR --query DIR [--steps N]
                          [--inner_lr LR] [--output preds.csv] [--device cpu|cuda]

- ``--support DIR``: one sub-folder per class (any K >= 1 images each); classes are
  numbered in sorted folder-name order and predictions are those folder names.
- ``--query DIR``: images directly in DIR (unlabelled) or one sub-folder per class
  (labelled: ``accuracy: <float>`` is printed and the CSV gets a ``label`` column).
- Regression checkpoints (sine) take ``--support FILE.csv --query FILE.csv`` with columns
  ``x,y`` (the query's ``y`` is optional; with it ``mse: <float>`` is printed).

Images go through the pipeline stored in the checkpoint's ``task_spec`` (decode, ink
inversion, resize, normalisation: ``lit_meta.data.preprocessing``), so a task's original files
give the tensors the DataModule gave in training. Adaptation is the checkpoint's own
inner loop and evaluation mode (``MetaLearner.adapt_and_predict``: its update rule and
learned rates, its BatchNorm mode) for its test-time step count unless ``steps`` is given.

When the support set has another number of classes than the checkpoint's head, the
model gets a zero-initialised head of the right width (``MetaLearner.resize_head``; BOIL,
whose inner loop cannot move its head, keeps that many rows of the meta-learned one).
This module only reads the files, calls the model and writes the predictions.
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from lit_meta.algorithms.base import MetaLearner
from lit_meta.checkpoint import load_checkpoint
from lit_meta.data.decoding import IMAGE_EXTENSIONS
from lit_meta.data.preprocessing import ImageFiles, images_from_files


@dataclass
class AdaptResult:
    """What ``adapt`` returns: one row per readable query item, in file (or CSV row) order."""

    files: list[str]  # query image paths, or the query x values (as text) for regression
    predictions: list[Any]  # support class names (classification) or predicted y (regression)
    labels: list[Any] | None  # query labels when known
    outputs: Tensor  # logits [n, ways] or predictions [n, out]
    accuracy: float | None = None
    mse: float | None = None
    notices: list[str] = field(default_factory=list)  # head resized, images converted or skipped
    skipped: list[str] = field(default_factory=list)  # query files that could not be decoded
    regression: bool = False

    def rows(self) -> list[list[Any]]:
        return [[f, p] + ([lab] if self.labels is not None else [])
                for f, p, lab in zip(self.files, self.predictions, self.labels or [None] * len(self.files))]

    def header(self) -> list[str]:
        first, label = ("x", "y") if self.regression else ("file", "label")
        return [first, "prediction"] + ([label] if self.labels is not None else [])

    def write_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.header())
            writer.writerows(self.rows())


# ---------------------------------------------------------------------------- files
def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_support_folder(folder: Path, spec: dict[str, Any]) -> tuple[ImageFiles, Tensor, list[str]]:
    """Class sub-folders -> images, labels (sorted folder order) and the class names."""
    if not folder.is_dir():
        raise ValueError(f"--support folder not found: {folder}")
    classes = _class_folders(folder)
    if len(classes) < 2:
        raise ValueError(f"--support {folder} needs one sub-folder per class and at least 2 classes, "
                         f"found {len(classes)}")
    files, labels = [], []
    for label, directory in enumerate(classes):
        images = _images_in(directory)
        if not images:
            raise ValueError(f"support class folder has no images ({'/'.join(IMAGE_EXTENSIONS)}): {directory}")
        files += images
        labels += [label] * len(images)
    return images_from_files(files, spec), torch.tensor(labels), [c.name for c in classes]


def read_query_folder(folder: Path, spec: dict[str, Any], names: list[str]) -> tuple[ImageFiles, Tensor | None]:
    """Loose images (unlabelled) or class sub-folders (labels: indices into ``names``);
    unreadable images are skipped."""
    if not folder.is_dir():
        raise ValueError(f"--query folder not found: {folder}")
    loose, classes = _images_in(folder), _class_folders(folder)
    if loose and classes:
        raise ValueError(f"--query {folder} mixes images and class sub-folders: use one or the other")
    if loose:
        return images_from_files(loose, spec, skip_unreadable=True), None
    unknown = [c.name for c in classes if c.name not in names]
    if unknown:
        raise ValueError(f"--query class folder {unknown[0]!r} is not a support class ({', '.join(names)})")
    files = [f for c in classes for f in _images_in(c)]
    if not files:
        raise ValueError(f"--query {folder} has no images ({'/'.join(IMAGE_EXTENSIONS)}) in it or its sub-folders")
    read = images_from_files(files, spec, skip_unreadable=True)
    return read, torch.tensor([names.index(f.parent.name) for f in read.files], dtype=torch.long)


def read_xy_csv(path: Path, dim: int, option: str, need_y: bool) -> tuple[Tensor, Tensor | None]:
    """``x,y`` columns (``x0..x{d-1}`` for d-dimensional inputs) -> float tensors."""
    if not path.is_file():
        raise ValueError(f"{option} file not found: {path}")
    xs = ["x"] if dim == 1 else [f"x{i}" for i in range(dim)]
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in xs + (["y"] if need_y else []) if c not in columns]
        if missing:
            raise ValueError(f"{option} {path} needs columns {','.join(xs)},y; missing {','.join(missing)}")
        has_y = "y" in columns
        try:
            rows = [([float(r[c]) for c in xs], float(r["y"]) if has_y else 0.0) for r in reader]
        except (TypeError, ValueError) as error:
            raise ValueError(f"{option} {path} has a value that is not a number: {error}") from None
    if not rows:
        raise ValueError(f"{option} {path} has no rows")
    x = torch.tensor([r[0] for r in rows])
    y = torch.tensor([[r[1]] for r in rows]) if has_y else None
    return x, y


# ---------------------------------------------------------------------------- adaptation
def adapt(checkpoint: str | Path, support: str | Path, query: str | Path, steps: int | None = None,
          inner_lr: float | None = None, device: str = "cpu",
          notify: Callable[[str], None] | None = None) -> AdaptResult:
    """Adapt the model in ``checkpoint`` to the task in ``support`` and predict ``query``.

    ``support``/``query`` are folders (classification) or CSV files (regression); see
    the module docstring. ``notify`` gets each notice as it happens (the CLI prints them);
    they are also in ``result.notices``.
    """
    if steps is not None and steps < 0:
        raise ValueError(f"--steps must be >= 0, got {steps}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available")
    model = load_checkpoint(checkpoint, device)
    if not isinstance(model, MetaLearner):
        raise ValueError(f"checkpoint {checkpoint} is a learned optimizer ({type(model).__name__}): "
                         "there is no task to adapt it to")
    notices: list[str] = []
    if inner_lr is not None and model.set_inner_lr(inner_lr):
        notices.append(f"note: --inner_lr {inner_lr} replaces the learned inner rates of {model.algorithm}")
    spec = model.task_spec
    support, query = Path(support), Path(query)
    if model.regression:
        sx, sy = read_xy_csv(support, spec["input_shape"][0], "--support", need_y=True)
        qx, qy = read_xy_csv(query, spec["input_shape"][0], "--query", need_y=False)
        out = model.adapt_and_predict(sx.to(device), sy.to(device), qx.to(device), steps).cpu()
        mse = None if qy is None else float(((out - qy) ** 2).mean())
        files = [",".join(f"{v:g}" for v in row) for row in qx.tolist()]
        result = AdaptResult(files, [round(float(v), 6) for v in out[:, 0]],
                             None if qy is None else [float(v) for v in qy[:, 0]], out, mse=mse, notices=notices,
                             regression=True)
    else:
        if "image_size" not in spec:
            raise ValueError(f"checkpoint {checkpoint} has no image pipeline in its task_spec "
                             f"(dataset {spec.get('dataset')!r}): cannot read image files for it")
        support_images, sy, names = read_support_folder(support, spec)
        query_images, qy = read_query_folder(query, spec, names)
        notices += [f"warning: skipped query image, {reason}" for reason in query_images.unreadable.values()]
        if not query_images.files:
            raise ValueError(f"--query {query}: none of its images could be read")
        converted = support_images.converted + query_images.converted
        if converted:
            kind = "grayscale" if spec["channels"] == 1 else "RGB"
            notices.append(f"note: converted {converted} image(s) to {kind}: "
                           f"the model takes {spec['channels']} channel(s)")
        if (old := model.resize_head(len(names))) != len(names):
            notices.insert(0, f"note: the checkpoint has {old} classes, the support set {len(names)}: "
                              f"{model.resized_head_note(len(names))}")
        logits = model.adapt_and_predict(support_images.images.to(device), sy.to(device),
                                         query_images.images.to(device), steps).cpu()
        predicted = logits.argmax(-1)
        accuracy = None if qy is None else float((predicted == qy).float().mean())
        result = AdaptResult([str(f) for f in query_images.files], [names[i] for i in predicted.tolist()],
                             None if qy is None else [names[i] for i in qy.tolist()], logits,
                             accuracy=accuracy, notices=notices, skipped=list(query_images.unreadable))
    if notify is not None:
        for note in notices:
            notify(note)
    return result


# ---------------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py adapt", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt_path", required=True, help="checkpoint to adapt (e.g. best-*.ckpt of a fit)")
    p.add_argument("--support", required=True, help="folder: one sub-folder per class; or FILE.csv (x,y)")
    p.add_argument("--query", required=True, help="folder of images or of class sub-folders; or FILE.csv")
    p.add_argument("--steps", type=int, default=None, help="inner steps (default: the checkpoint's test-time steps)")
    p.add_argument("--inner_lr", type=float, default=None, help="override the inner learning rate(s)")
    p.add_argument("--output", default=None, help="write predictions to this CSV (default: print a table)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    return p


def print_table(result: AdaptResult, limit: int = 20) -> None:
    header = result.header()
    rows = result.rows()
    widths = [max(len(str(v)) for v in [h] + [r[i] for r in rows[:limit]]) for i, h in enumerate(header)]
    for row in [header] + rows[:limit]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    if len(rows) > limit:
        print(f"... {len(rows) - limit} more (use --output FILE.csv for all)")


def main(args: list[str]) -> None:
    options = parser().parse_args(args)
    result = adapt(options.ckpt_path, options.support, options.query, options.steps, options.inner_lr,
                   options.device, notify=lambda note: print(note, file=sys.stderr))
    if options.output:
        result.write_csv(options.output)
        print(f"predictions: {Path(options.output).resolve()}")
    else:
        print_table(result)
    if result.accuracy is not None:
        print(f"accuracy: {result.accuracy:.4f}")
    if result.mse is not None:
        print(f"mse: {result.mse:.6f}")
