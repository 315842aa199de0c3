"""Host tensors onto the training device without the host waiting for it.

A CUDA step is fast only while the host runs ahead of the GPU. A copy from pageable host
memory (``tensor.to("cuda")``) makes the host wait until the copy is done; a copy from
pinned (page-locked) memory with ``non_blocking=True`` is queued like a kernel. Every
host-made tensor that a step sends to the device (sampled indices, the inner mini-batch
schedule, a batch drawn on the host) goes through :func:`to_device`.

Other non-CPU devices (PyTorch's ``meta`` device, which the CPU rehearsal of the GPU path
uses: ``lit_meta.rehearsal``) cannot pin without CUDA, but get the same non-blocking copy,
so the rehearsal sees exactly the copies a GPU run makes.
"""
from __future__ import annotations

import torch
from torch import Tensor


def to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """``tensor`` on ``device``: on CUDA through pinned memory with a non-blocking copy."""
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=device.type != "cpu")


def pin(tensor: Tensor) -> Tensor:
    """A page-locked copy of a host tensor (a device tensor, or where nothing can pin, as it is)."""
    if tensor.device.type != "cpu" or not torch.cuda.is_available():
        return tensor
    return tensor.pin_memory()
