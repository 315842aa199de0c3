"""Cache build time and size per image of the original-source benchmarks, and projections to
their real sizes.

1. On the tests' miniatures (tests/source_fixtures.py: the real classes, 2-16 tiny images
   each), each benchmark's cache is built through its DataModule at its default image size,
   then loaded again (the key check that every later run pays): seconds, images, cache bytes
   per image.
2. Per-image decode + resize cost on full-size images (the miniatures' images are 10x8 px, far
   cheaper to decode than real ones): ``--full`` synthetic JPEGs of 500x375 (about ImageNet's
   and CUB's average size, smooth content so they compress like photos) through the same
   build code, one process, one thread.
3. Projection: real image count x the full-size per-image time (CIFAR and Omniglot: the
   miniature's own per-image time, their images being real-size 32x32 pickles / 105x105 PNGs),
   real count x bytes per image, and real count x the miniature's load time per image (the key
   check stats every source file; for Omniglot's official folders, every PNG).

    PYTHONPATH=. python benchmarks/cache_build.py [--full 300]   # from the repo root: the
    miniatures are written by the tests' tests/source_fixtures.py
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lit_meta.data import (
    CIFARFSDataModule,
    CUBDataModule,
    MiniImageNetDataModule,
    OmniglotDataModule,
    TieredImageNetDataModule,
)
from lit_meta.data.image_cache import decode_all

REAL_IMAGES = {"cifar100 (CIFAR-FS, FC100)": 60000, "cub": 11788, "miniimagenet": 60000, "tieredimagenet": 779165,
               "omniglot (official folders)": 32460}
OWN_SIZE = ("cifar", "omniglot")  # miniatures whose images have the real size: their own per-image time projects


def cache_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.suffix in (".pt", ".u8"))


def timed(make) -> tuple[float, float, int]:
    """(build seconds, load seconds, images) of a fresh DataModule's pools, then a second one's."""
    start = time.perf_counter()
    pools = make().build_pools()
    built = time.perf_counter() - start
    start = time.perf_counter()
    make().build_pools()
    return built, time.perf_counter() - start, sum(int(p.counts.sum()) for p in pools.values())


def full_size_seconds(count: int, folder: Path) -> float:
    """Seconds per image to decode and resize (to 84, bilinear-antialias) a 500x375 JPEG."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(count):
        smooth = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        noisy = np.asarray(smooth, dtype=np.int16) + rng.integers(-12, 13, (375, 500, 3))
        buffer = io.BytesIO()
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        path = folder / f"n00000001_{i}.JPEG"
        path.write_bytes(buffer.getvalue())
        items.append((str(path), path))
    options = {"channels": 3, "image_size": 84, "resize": "bilinear-antialias", "resize_size": None}
    start = time.perf_counter()
    decode_all(items, [0] * count, 1, options, "stop", "full-size")
    seconds = (time.perf_counter() - start) / count
    print(f"full-size JPEG: {np.mean([p.stat().st_size for _, p in items]) / 1e3:.0f} kB on average", file=sys.stderr)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", type=int, default=300, help="full-size JPEGs to time")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        from tests.image_data_fixtures import omniglot_arrays, write_omniglot_folders
        from tests.source_fixtures import write_all_sources  # needs the repo root on the path (see above)

        sources = write_all_sources(base / "sources")
        # 100 characters x 20 drawers of 105x105 PNGs, in the official folder layout
        omniglot = write_omniglot_folders(base / "omniglot", omniglot_arrays(60, 40, drawers=20, size=105))
        small = {"ways": 5, "shots": 1, "queries": 1}
        cases = {
            "cifar100 (CIFAR-FS, FC100)": (lambda: CIFARFSDataModule(root=str(sources["cifar"]), **small),
                                           sources["cifar"]),
            "cub": (lambda: CUBDataModule(root=str(sources["cub"]), **small), sources["cub"]),
            "miniimagenet": (lambda: MiniImageNetDataModule(root=str(base / "mini"), imagenet_root=str(
                sources["imagenet"]), split_dir=str(sources["ravi"]), **small), base / "mini"),
            "tieredimagenet": (lambda: TieredImageNetDataModule(root=str(base / "tiered"), imagenet_root=str(
                sources["imagenet"]), **small), base / "tiered"),
            "omniglot (official folders)": (lambda: OmniglotDataModule(root=str(omniglot), **small), omniglot),
        }
        (base / "full").mkdir()
        per_full = full_size_seconds(args.full, base / "full")
        rows = []
        for name, (make, folder) in cases.items():
            built, loaded, images = timed(make)
            per_image_bytes = cache_bytes(folder) / images
            per_image_s = built / images if name.startswith(OWN_SIZE) else per_full
            real = REAL_IMAGES[name]
            rows.append({"benchmark": name, "miniature_images": images, "build_s": round(built, 3),
                         "load_s": round(loaded, 3), "bytes_per_image": round(per_image_bytes),
                         "real_images": real, "projected_build_min": round(real * per_image_s / 60, 1),
                         "projected_cache_GB": round(real * per_image_bytes / 1e9, 2),
                         # a later run's load: the key check stats every source file (ImageNet: one per image)
                         "projected_load_s": round(real * loaded / images, 1)})
            print(json.dumps(rows[-1]))
    print(json.dumps({"full_size_s_per_image": round(per_full, 5), "load": os.getloadavg()}))


if __name__ == "__main__":
    main()
