"""Preprocessing: uint8 images to the tensors a network sees (resize, centre crop, normalise).

Input pipeline (recorded in ``task_spec``, so a checkpoint can turn raw files into the
tensors it was trained on; :func:`images_from_files` is that path)::

    file -> PIL "L" (channels=1) or "RGB" (channels=3) -> uint8 [C, H, W]
                                                  (lit_meta.data.decoding)
         -> 255 - x if invert
         -> resize to S x S, S = resize_size or image_size (aspect ratio not kept), with
            ``resize`` (default "bilinear-antialias": torch bilinear, antialias=True,
            = PIL BILINEAR within 1 gray level), on x/255 in float32, then rounded back
            to uint8 (skipped when already that size)
         -> centre crop image_size x image_size when resize_size > image_size
            (torchvision CenterCrop's offsets; the CloserLook CUB transform, Chen et al. 2019)
    ---- cached once as uint8 (lit_meta.data.cache) ----
         -> x/255 -> (x - mean[c]) / std[c]      (at sampling time, on the device: normalize)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lit_meta.data.decoding import decode_image_and_mode

RESIZE = "bilinear-antialias"
# name -> (torch interpolate mode, antialias); "area" is torch's box average (close to cv2 INTER_AREA)
RESIZE_MODES = {"bilinear-antialias": ("bilinear", True), "bilinear": ("bilinear", False),
                "bicubic-antialias": ("bicubic", True), "bicubic": ("bicubic", False), "area": ("area", False)}
_CHUNK = 2048  # images per resize batch: bounds the float32 copy while preprocessing


def check_resize(resize: str, image_size: int, resize_size: int | None) -> None:
    """One-line errors for the resize options (``--data.interpolation``, ``--data.resize_size``)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"interpolation must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if resize_size is not None and (not isinstance(resize_size, int) or resize_size < image_size):
        raise ValueError(f"resize_size must be an integer >= image_size={image_size}, got {resize_size!r}")


def pipeline_options(spec: dict[str, Any]) -> dict[str, Any]:
    """The resize options recorded in a task_spec (checkpoints from before they existed used the defaults)."""
    return {"resize": spec.get("resize", RESIZE), "resize_size": spec.get("resize_size")}


def preprocess(images: Tensor | np.ndarray, image_size: int, invert: bool = False, resize: str = RESIZE,
               resize_size: int | None = None) -> Tensor:
    """uint8 ``[N, C, H, W]`` -> uint8 ``[N, C, image_size, image_size]`` (invert, resize, centre crop)."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"preprocess expects uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}")
    target = resize_size or image_size
    mode, antialias = RESIZE_MODES[resize]
    top = left = int(round((target - image_size) / 2.0))  # torchvision CenterCrop's offsets
    out = []
    for chunk in images.split(_CHUNK):
        if invert:
            chunk = 255 - chunk
        if chunk.shape[-2:] != (target, target):
            extra = {} if mode == "area" else {"antialias": antialias, "align_corners": False}
            x = F.interpolate(chunk.float() / 255, size=(target, target), mode=mode, **extra)
            chunk = (x * 255).round_().clamp_(0, 255).to(torch.uint8)
        if target != image_size:
            chunk = chunk[..., top:top + image_size, left:left + image_size]
        out.append(chunk.contiguous())
    if not out:
        return torch.empty(0, images.shape[1], image_size, image_size, dtype=torch.uint8)
    return torch.cat(out)


def preprocess_list(arrays: Sequence[np.ndarray], image_size: int, invert: bool = False, resize: str = RESIZE,
                    resize_size: int | None = None) -> Tensor:
    """Like :func:`preprocess` for ``[C, H, W]`` arrays of possibly different sizes (runs of one size are batched)."""
    out, run = [], []
    for array in arrays:
        if run and array.shape != run[0].shape:
            out.append(preprocess(np.stack(run), image_size, invert, resize, resize_size))
            run = []
        run.append(array)
    if run:
        out.append(preprocess(np.stack(run), image_size, invert, resize, resize_size))
    return torch.cat(out) if out else torch.empty(0, 1, image_size, image_size, dtype=torch.uint8)


def channel_constants(values: Sequence[float], device: torch.device) -> Tensor:
    """float32 ``[C, 1, 1]`` on ``device``, filled there: ``torch.tensor(values, device=cuda)``
    would copy from pageable host memory and wait for it (a host sync every sampled batch)."""
    return torch.stack([torch.full((), float(v), device=device) for v in values]).view(len(values), 1, 1)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``[..., C, H, W]`` -> float32 ``(x/255 - mean) / std`` per channel.

    The divisor is a 0-dim tensor on the images' device, not a Python number: CUDA divides
    by a host scalar as a multiply by its reciprocal, which puts about half of the 256 gray
    levels one ulp away from the CPU's x/255; tensor by tensor, both devices divide exactly
    (IEEE division is correctly rounded), so a step's tasks are the same bits on any device."""
    x = images.float().div_(torch.full((), 255.0, device=images.device))
    if any(m != 0 for m in mean) or any(s != 1 for s in std):
        x = (x - channel_constants(mean, x.device)) / channel_constants(std, x.device)
    return x


@dataclass
class ImageFiles:
    """What :func:`images_from_files` read."""

    images: Tensor  # float [N, C, S, S], normalised
    files: list[Path]  # the files of ``images``, in order
    unreadable: dict[str, str] = field(default_factory=dict)  # skipped file -> one-line reason
    converted: int = 0  # files whose colour mode had another channel count (RGB into gray, or back)


def images_from_files(paths: Iterable[str | os.PathLike], spec: dict[str, Any],
                      skip_unreadable: bool = False) -> ImageFiles:
    """Raw image files -> float ``[N, C, S, S]``, exactly as the data behind ``spec`` (a task_spec)
    was made. An undecodable file raises a one-line ValueError naming it, or with
    ``skip_unreadable`` is left out and listed in ``unreadable``."""
    channels, size = spec["channels"], spec["image_size"]
    arrays, files, unreadable, converted = [], [], {}, 0
    for path in map(Path, paths):
        try:
            array, other_mode = decode_image_and_mode(path, channels)
        except ValueError as error:
            if not skip_unreadable:
                raise
            unreadable[str(path)] = str(error)
            continue
        arrays.append(array)
        files.append(path)
        converted += other_mode
    if not arrays:
        return ImageFiles(torch.empty(0, channels, size, size), files, unreadable, converted)
    images = preprocess_list(arrays, size, spec.get("invert", False), **pipeline_options(spec))
    x = normalize(images, spec["mean"], spec["std"])
    return ImageFiles(x, files, unreadable, converted)


