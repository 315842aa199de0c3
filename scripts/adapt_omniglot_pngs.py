"""Adapt a checkpoint to held-out Omniglot evaluation characters written out as PNG files.

Usage: python scripts/adapt_omniglot_pngs.py CKPT TASKS  (needs ../shared/data/omniglot). Prints a
markdown row per setting: own 5-way head, 5-way head zeroed, 3- and 10-way resized zero heads.
"""
import sys, shutil, tempfile
from pathlib import Path
import numpy as np, torch
from PIL import Image
from lit_meta.adapt import adapt, load_checkpoint, resize_head, read_support_folder, read_query_folder, adapt_tensors
from lit_meta.data import OmniglotDataModule

ckpt, tasks = sys.argv[1], int(sys.argv[2])
root = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
images = np.load(root / "images_evaluation.npz")["images"]  # bool [659, 20, 105, 105], True = paper
dm = OmniglotDataModule(str(root), split="finn")
test = [int(c) - 964 for c in dm.split_classes(1623, 964)["test"] if c >= 964]  # evaluation chars never trained on
print(f"{len(test)} evaluation characters in the finn test split")
out = Path(tempfile.mkdtemp())
rng = np.random.default_rng(0)

def write_task(folder, ways, shots=1, queries=5):
    chars = rng.choice(test, ways, replace=False)
    for c in chars:
        drawers = rng.permutation(20)[:shots + queries]
        for part, ds in (("support", drawers[:shots]), ("query", drawers[shots:])):
            d = folder / part / f"char{c:03d}"; d.mkdir(parents=True)
            for k in ds:
                Image.fromarray(images[c, k]).save(d / f"{c:04d}_{k + 1:02d}.png")  # mode "1", as the official PNGs
    return folder / "support", folder / "query"

def zero_head_5way(support, query):
    model = load_checkpoint(ckpt); notes = []
    sx, sy, names = read_support_folder(support, model.task_spec, notes)
    qx, kept, qy, _ = read_query_folder(query, model.task_spec, names, notes)
    torch.nn.init.zeros_(model.net.head.weight); torch.nn.init.zeros_(model.net.head.bias)
    return float((adapt_tensors(model, sx, sy, qx).argmax(-1) == qy).float().mean())

for label, ways, fn in (("5-way, own head", 5, None), ("5-way, head zeroed", 5, zero_head_5way),
                        ("3-way, resized zero head", 3, None), ("10-way, resized zero head", 10, None)):
    accs = []
    for t in range(tasks):
        s, q = write_task(out / f"{ways}_{label[7:11]}_{t}", ways)
        accs.append(fn(s, q) if fn else adapt(ckpt, s, q).accuracy)
    a = np.array(accs)
    print(f"| {label} | {tasks} | {a.mean():.3f} ± {1.96 * a.std(ddof=1) / np.sqrt(len(a)):.3f} | {1 / ways:.2f} |", flush=True)
print("example task:", out / "5_own _0")
