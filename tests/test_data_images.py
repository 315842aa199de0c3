"""Image episodic data: every accepted layout, episodes, splits, determinism and bad input."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.image_data_fixtures import (
    HALVES,
    coded_classes,
    mini_arrays,
    omniglot_arrays,
    write_mini_csv,
    write_mini_pickles,
    write_omniglot_folders,
    write_omniglot_npz,
    write_omniglot_zips,
    write_user_folder,
)
from lit_meta.data import ImageFolderDataModule, MiniImageNetDataModule, OmniglotDataModule
from lit_meta.checkpoint import WriteError, atomic_torch_save
from lit_meta.data.class_pools import ClassPool, sample_episodes
from lit_meta.data.preprocessing import images_from_files, preprocess

from tests.conftest import OMNIGLOT as REAL_OMNIGLOT


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def omniglot(root: Path, **kwargs) -> OmniglotDataModule:
    kwargs = {"ways": 3, "shots": 1, "queries": 2, "image_size": 21, "cache_dir": str(root / "cache"), **kwargs}
    return OmniglotDataModule(root=str(root), **kwargs)


@pytest.fixture(scope="module")
def omni_arrays():
    return omniglot_arrays()


@pytest.fixture(scope="module")
def omni_npz(tmp_path_factory, omni_arrays):
    return write_omniglot_npz(tmp_path_factory.mktemp("omni_npz"), omni_arrays)


# ---------------------------------------------------------------------------- Omniglot layouts
@pytest.mark.parametrize("image_size", [21, 8])
def test_omniglot_layouts_parse_to_the_same_tensors(tmp_path, omni_arrays, image_size):
    roots = {
        "folder": write_omniglot_folders(tmp_path / "folder", omni_arrays),
        "zip": write_omniglot_zips(tmp_path / "zip", omni_arrays),
        "npz": write_omniglot_npz(tmp_path / "npz", omni_arrays),
        "npz_uint8": write_omniglot_npz(tmp_path / "npz8", omni_arrays, dtype="uint8"),
        "torchvision": write_omniglot_folders(tmp_path / "tv" / "omniglot-py", omni_arrays).parent,
    }
    loaded = {name: omniglot(root, image_size=image_size).load_all() for name, root in roots.items()}
    reference = loaded["npz"]
    assert reference["images"].shape == (64 * 6, 1, image_size, image_size)
    assert reference["images"].dtype == torch.uint8
    assert reference["background"] == 40
    for name, data in loaded.items():
        assert torch.equal(data["images"], reference["images"]), name
        assert torch.equal(data["counts"], torch.full((64,), 6)), name
    if image_size == 21:  # no resize: exactly ink = 255, paper = 0, characters in official-number order
        ink = np.concatenate([~omni_arrays[h] for h in HALVES]).reshape(-1, 1, 21, 21)
        assert torch.equal(reference["images"], torch.from_numpy(ink.astype(np.uint8) * 255))
    # Folder character names follow the official numbering, not the path order.
    names = loaded["folder"]["names"]
    assert names != sorted(names[:40]) + sorted(names[40:])


def test_images_from_files_reproduce_the_training_tensors(tmp_path, omni_arrays):
    root = write_omniglot_folders(tmp_path, omni_arrays)
    dm = omniglot(root, image_size=10)
    data = dm.load_all()
    first = sorted((root / "images_background").glob("*/*/0001_*.png"))
    assert len(first) == 6
    x = images_from_files(first, dm.task_spec).images
    assert torch.equal(x, data["images"][:6].float() / 255)


def test_cache_is_reused(tmp_path, omni_arrays, monkeypatch):
    """(How long a later load takes: benchmarks/cache_build.py, docs/RESULTS.md "Dataset caches".)"""
    import lit_meta.data.omniglot as omniglot_module

    root = write_omniglot_npz(tmp_path, omni_arrays)
    first = omniglot(root).load_all()
    assert (tmp_path / "cache" / "omniglot_21px.pt").is_file()
    monkeypatch.setattr(omniglot_module, "read_npz", lambda *a: pytest.fail("sources re-read despite the cache"))
    again = omniglot(root).load_all()
    assert torch.equal(first["images"], again["images"])


def test_a_file_changed_deep_inside_a_folder_rebuilds_the_cache(tmp_path, omni_arrays):
    """The half's own mtime changes only when its alphabets do: every PNG is in the key."""
    import os

    from PIL import Image

    root = write_omniglot_folders(tmp_path / "folder", omni_arrays)
    first = omniglot(root).load_all()
    half = root / "images_evaluation"
    stamp = half.stat().st_mtime_ns
    png = sorted(half.glob("*/*/*.png"))[5]
    Image.fromarray(~np.asarray(Image.open(png))).save(png)  # the same name, another drawing
    os.utime(png, ns=(png.stat().st_atime_ns, png.stat().st_mtime_ns + 10**9))
    assert half.stat().st_mtime_ns == stamp
    again = omniglot(root).load_all()
    fresh = omniglot(root, cache_dir=str(tmp_path / "fresh")).load_all()
    assert not torch.equal(first["images"], again["images"]) and torch.equal(again["images"], fresh["images"])


def test_cache_goes_under_root_or_elsewhere_when_root_is_read_only(tmp_path, omni_arrays, monkeypatch):
    root = write_omniglot_npz(tmp_path / "data", omni_arrays)
    OmniglotDataModule(root=str(root), image_size=8).load_all()
    assert (root / "omniglot_8px.pt").is_file()
    (root / "omniglot_8px.pt").unlink()
    monkeypatch.setenv("LIT_META_CACHE", str(tmp_path / "elsewhere"))
    root.chmod(0o555)
    try:
        OmniglotDataModule(root=str(root), image_size=8).load_all()
    finally:
        root.chmod(0o755)
    assert not (root / "omniglot_8px.pt").exists()
    assert len(list((tmp_path / "elsewhere").glob("omniglot_8px-*.pt"))) == 1


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "cache.pt"

    def broken_save(obj, f):  # the cache's writer (lit_meta.checkpoint) streams into a temporary file
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(WriteError, match=f"cannot write {target}: disk full"):  # one line naming the cache
        atomic_torch_save({"x": torch.zeros(3)}, target)
    assert list(tmp_path.iterdir()) == []


def test_damaged_cache_is_rebuilt(tmp_path, omni_npz):
    dm = omniglot(omni_npz, cache_dir=str(tmp_path))
    good = dm.load_all()["images"].clone()
    (tmp_path / "omniglot_21px.pt").write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable cache"):
        assert torch.equal(dm.load_all()["images"], good)


# ---------------------------------------------------------------------------- splits
def test_omniglot_finn_split_is_seeded_and_disjoint(tmp_path, omni_npz):
    dm = omniglot(omni_npz, split="finn", cache_dir=str(tmp_path))
    dm.setup()
    names = {s: set(p.names) for s, p in dm.pools.items()}
    assert [len(names[s]) for s in ("train", "val", "test")] == [43, 4, 17]  # 1100/100/423 of 64, rounded
    assert not names["train"] & names["val"] and not names["train"] & names["test"] and not names["val"] & names["test"]
    assert len(set.union(*names.values())) == 64
    evaluation = {n for n in names["test"] if n.startswith("images_evaluation")}
    assert evaluation and evaluation != names["test"]  # finn mixes the halves
    again = omniglot(omni_npz, split="finn", cache_dir=str(tmp_path))
    again.setup()
    assert again.pools["test"].names == dm.pools["test"].names
    other = omniglot(omni_npz, split="finn", split_seed=1, cache_dir=str(tmp_path))
    other.setup()
    assert other.pools["test"].names != dm.pools["test"].names


def test_omniglot_lake_split_tests_on_the_evaluation_alphabets(tmp_path, omni_npz):
    dm = omniglot(omni_npz, split="lake", cache_dir=str(tmp_path))
    dm.setup()
    names = {s: set(p.names) for s, p in dm.pools.items()}
    assert names["test"] == {f"images_evaluation/{c}" for c in range(24)}
    assert names["train"] | names["val"] == {f"images_background/{c}" for c in range(40)}
    assert not names["train"] & names["val"]
    assert len(names["val"]) == 4  # 100 of 964, scaled to 40
    assert dm.pools["train"].num_classes == 4 * len(names["train"])  # rotations, train only
    assert dm.pools["val"].num_classes == len(names["val"])


def test_user_folder_split_styles_agree_and_are_disjoint(tmp_path):
    classes = coded_classes(n_classes=10, per_class=4)
    flat = ImageFolderDataModule(root=str(write_user_folder(tmp_path / "flat", classes)), channels=1,
                                 image_size=8, ways=2, queries=2, val_fraction=0.2, test_fraction=0.3)
    flat.setup()
    names = {s: flat.pools[s].names for s in ("train", "val", "test")}
    assert [len(names[s]) for s in ("train", "val", "test")] == [5, 2, 3]
    assert len(set(sum(names.values(), []))) == 10
    for split, members in names.items():
        write_user_folder(tmp_path / "split" / split, {n: classes[n] for n in members})
    folders = ImageFolderDataModule(root=str(tmp_path / "split"), channels=1, image_size=8, ways=2, queries=2)
    assert folders.split_mode() == "folders"
    folders.setup()
    for split in names:
        assert folders.pools[split].names == names[split]
        assert torch.equal(folders.pools[split].images, flat.pools[split].images)
        assert torch.equal(folders.pools[split].counts, flat.pools[split].counts)


def test_user_folder_png_and_jpg_and_resize(tmp_path):
    classes = coded_classes(n_classes=6, per_class=3, size=16, channels=3)
    root = write_user_folder(tmp_path, dict(list(classes.items())[:3]), ext=".png")
    write_user_folder(root, dict(list(classes.items())[3:]), ext=".jpg")
    dm = ImageFolderDataModule(root=str(root), image_size=8, ways=1, shots=1, queries=1,
                               val_fraction=0.2, test_fraction=0.2, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    dm.setup()
    assert sum(len(p.counts) for p in dm.pools.values()) == 6
    assert dm.pools["train"].images.shape[1:] == (3, 8, 8)
    spec = dm.task_spec
    assert spec["input_shape"] == [3, 8, 8] and spec["mean"] == [0.5] * 3 and spec["std"] == [0.25] * 3
    batch = dm.sample_tasks("train", torch.Generator().manual_seed(0), 2)
    levels = batch.support_x * 0.25 + 0.5  # flat images: every pixel is the class/item code
    assert torch.allclose(levels, levels[..., :1, :1, :1].expand_as(levels), atol=0.03)


# ---------------------------------------------------------------------------- miniImageNet
@pytest.mark.parametrize("image_size", [12, 6])
def test_miniimagenet_pickle_and_csv_parse_to_the_same_tensors(tmp_path, image_size):
    arrays = mini_arrays()
    from_pickle = MiniImageNetDataModule(root=str(write_mini_pickles(tmp_path / "pkl", arrays)),
                                         image_size=image_size, ways=5, shots=1, queries=2)
    from_csv = MiniImageNetDataModule(root=str(write_mini_csv(tmp_path / "csv", arrays)),
                                      image_size=image_size, ways=5, shots=1, queries=2)
    a, b = from_pickle.build_pools(), from_csv.build_pools()
    assert (tmp_path / "pkl" / f"miniimagenet_{image_size}px.pt").is_file()
    for split in ("train", "val", "test"):
        assert a[split].names == b[split].names == sorted(arrays[split])
        assert torch.equal(a[split].images, b[split].images)
        assert torch.equal(a[split].counts, b[split].counts)
    if image_size == 12:
        expected = np.concatenate([arrays["train"][n] for n in sorted(arrays["train"])]).transpose(0, 3, 1, 2)
        assert torch.equal(a["train"].images, torch.from_numpy(np.ascontiguousarray(expected)))


def test_miniimagenet_normalizes_per_channel(tmp_path):
    arrays = mini_arrays(classes={"train": 5, "val": 5, "test": 5}, per_class=3)
    dm = MiniImageNetDataModule(root=str(write_mini_pickles(tmp_path, arrays)), image_size=12, ways=5, shots=1,
                                queries=2)
    dm.setup()
    batch = dm.sample_tasks("test", torch.Generator().manual_seed(3), 4)
    assert batch.support_x.shape == (4, 5, 3, 12, 12) and batch.query_x.shape == (4, 10, 3, 12, 12)
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    raw = (batch.support_x * std + mean) * 255
    assert torch.allclose(raw, raw.round(), atol=1e-3)  # exactly the uint8 pixels, normalized
    pool = {tuple(img.flatten().tolist()) for img in dm.pools["test"].images[:, :, :2, :2]}
    assert all(tuple(img.flatten().round().long().tolist()) in pool for img in raw[0, :, :, :2, :2])


# ---------------------------------------------------------------------------- episodes
def decode(batch_x: torch.Tensor) -> torch.Tensor:
    """Gray-level code of each flat image in ``[..., 1, H, W]`` -> ``(class, item)`` as ``class*20 + item``."""
    return (batch_x[..., 0, 0, 0] * 255).round().long() - 1


def test_episode_shapes_and_labels(tmp_path):
    root = write_user_folder(tmp_path, coded_classes(n_classes=10, per_class=8))
    dm = ImageFolderDataModule(root=str(root), channels=1, image_size=8, val_fraction=0.2, test_fraction=0.2,
                               ways=4, shots=2, queries=3, eval_ways=2, eval_shots=1, eval_queries=5)
    dm.setup()
    batch = dm.sample_tasks("train", torch.Generator().manual_seed(0), 16)
    assert batch.support_x.shape == (16, 8, 1, 8, 8) and batch.query_x.shape == (16, 12, 1, 8, 8)
    assert batch.support_x.dtype == torch.float32 and batch.support_y.dtype == torch.int64
    assert batch.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert batch.query_y[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    support, query = decode(batch.support_x), decode(batch.query_x)
    train_classes = {int(n[-2:]) for n in dm.pools["train"].names}
    for t in range(16):
        s_cls, q_cls = support[t] // 20, query[t] // 20
        for label in range(4):
            members = torch.cat([s_cls[batch.support_y[t] == label], q_cls[batch.query_y[t] == label]])
            assert len(set(members.tolist())) == 1  # one class per label
            assert members[0].item() in train_classes
        assert len(set(s_cls.tolist())) == 4  # distinct classes per task
        items = torch.cat([support[t], query[t]])
        assert len(set(items.tolist())) == 20  # no image drawn twice in a task
    assert len({tuple(c.tolist()) for c in support // 20}) > 1  # tasks differ
    evaluation = dm.sample_tasks("test", torch.Generator().manual_seed(0), 3)
    assert evaluation.support_x.shape == (3, 2, 1, 8, 8) and evaluation.query_x.shape == (3, 10, 1, 8, 8)
    assert evaluation.query_y[0].tolist() == [0] * 5 + [1] * 5
    assert dm.task_spec["ways"] == 4


def test_rotated_classes_are_new_classes():
    # Class k, item i: zeros except pixel (0, 0) = k + 1 and (0, 1) = 100 + i, so quarter turns are tellable.
    images = torch.zeros(3, 5, 1, 6, 6, dtype=torch.uint8)
    for k in range(3):
        for i in range(5):
            images[k, i, 0, 0, 0], images[k, i, 0, 0, 1] = k + 1, 100 + i
    pool = ClassPool(images.reshape(15, 1, 6, 6), torch.full((3,), 5), ["a", "b", "c"], rotations=True)
    assert pool.num_classes == 12
    batch = sample_episodes(pool, torch.Generator().manual_seed(0), 200, 4, 2, 1, [0.0], [1.0])
    x = (torch.cat([batch.support_x, batch.query_x], 1) * 255).round().long()
    y = torch.cat([batch.support_y, batch.query_y], 1)
    seen = set()
    for t in range(200):
        found = []
        for img in x[t, :, 0]:
            turns = next(r for r in range(4) if torch.rot90(img, -r)[0, 0] > 0)
            upright = torch.rot90(img, -turns)
            found.append((int(upright[0, 0]) - 1, turns, int(upright[0, 1]) - 100))
        for label in range(4):
            group = [f for f, lab in zip(found, y[t].tolist()) if lab == label]
            assert len({(c, r) for c, r, _ in group}) == 1
            assert len({i for _, _, i in group}) == len(group)
        assert len({(c, r) for c, r, _ in found}) == 4
        seen |= {(c, r) for c, r, _ in found}
    assert seen == {(c, r) for c in range(3) for r in range(4)}


def test_eval_episodes_are_fixed_and_train_follows_the_step(tmp_path, omni_npz):
    def fresh():
        dm = omniglot(omni_npz, cache_dir=str(tmp_path), eval_batch_size=4, val_tasks=8, test_tasks=12)
        dm.setup()
        return dm

    a, b = fresh(), fresh()
    assert a.eval_chunks("test") == [4, 4, 4]
    for split in ("val", "test"):
        for chunk in range(len(a.eval_chunks(split))):
            x, y = a.eval_batch(split, chunk), b.eval_batch(split, chunk)
            assert torch.equal(x.support_x, y.support_x) and torch.equal(x.query_x, y.query_x)
    assert not torch.equal(a.eval_batch("test", 0).support_x, a.eval_batch("test", 1).support_x)
    assert not torch.equal(a.eval_batch("val", 0).support_x, a.eval_batch("test", 0).support_x)
    assert torch.equal(a.train_batch(7).query_x, b.train_batch(7).query_x)
    assert not torch.equal(a.train_batch(7).query_x, a.train_batch(8).query_x)


def test_task_spec_carries_the_input_pipeline(tmp_path, omni_npz):
    spec = omniglot(omni_npz, ways=5, eval_ways=20, image_size=28).task_spec
    assert spec == {"dataset": "omniglot", "kind": "classification", "input_shape": [1, 28, 28], "ways": 20,
                    "image_size": 28, "channels": 1, "invert": True, "mean": [0.0], "std": [1.0],
                    "resize": "bilinear-antialias", "split": "finn", "rotations": True}
    mini = MiniImageNetDataModule(root=str(tmp_path)).task_spec
    assert mini["input_shape"] == [3, 84, 84] and mini["invert"] is False and len(mini["mean"]) == 3


# ---------------------------------------------------------------------------- bad input
def one_line_error(call, *fragments: str) -> str:
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    message = one_line_error(lambda: omniglot(missing).setup(), str(missing))
    assert "images_background.zip" in message and "images_background.npz" in message and "<alphabet>" in message
    one_line_error(lambda: MiniImageNetDataModule(root=str(missing)).setup(), str(missing))
    one_line_error(lambda: ImageFolderDataModule(root=str(missing)).setup(), str(missing))


def test_omniglot_offline_with_nothing_found_lists_the_layouts(tmp_path):
    (tmp_path / "images_background.npz").write_bytes(b"")  # half of a pack is not enough
    message = one_line_error(lambda: omniglot(tmp_path).setup(), str(tmp_path), "images_evaluation",
                             "--data.download true")
    assert message.count("images_background") >= 3  # folder, zip and npz layouts all named


def test_corrupt_image_names_the_file(tmp_path, omni_arrays):
    classes = coded_classes(n_classes=5, per_class=3)
    root = write_user_folder(tmp_path / "user", classes)
    bad = root / "class_02" / "img_001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    one_line_error(lambda: ImageFolderDataModule(root=str(root)).setup(), str(bad))
    omni = write_omniglot_folders(tmp_path / "omni", omni_arrays)
    bad = sorted((omni / "images_evaluation").glob("*/*/*.png"))[3]
    bad.write_bytes(b"not a png at all")
    one_line_error(lambda: omniglot(omni).setup(), str(bad))
    zips = write_omniglot_zips(tmp_path / "zips", omni_arrays)
    with zipfile.ZipFile(zips / "images_background.zip", "a") as archive:
        archive.writestr("images_background/Alphabet_00/character01/0001_07.png", b"broken")
    one_line_error(lambda: omniglot(zips).setup(), "images_background.zip:images_background/Alphabet_00/"
                   "character01/0001_07.png")
    broken_npz = tmp_path / "npz"
    write_omniglot_npz(broken_npz, omni_arrays)
    (broken_npz / "images_evaluation.npz").write_bytes(b"PK\x03\x04 truncated")
    one_line_error(lambda: omniglot(broken_npz).setup(), str(broken_npz / "images_evaluation.npz"))


def test_npz_without_images_key(tmp_path, omni_arrays):
    write_omniglot_npz(tmp_path, omni_arrays)
    np.savez(tmp_path / "images_background.npz", pictures=np.zeros((2, 2, 3, 3), dtype=bool))
    one_line_error(lambda: omniglot(tmp_path).setup(), str(tmp_path / "images_background.npz"), "'images'")


def test_empty_class_folder(tmp_path, omni_arrays):
    root = write_user_folder(tmp_path / "user", coded_classes(n_classes=5, per_class=3))
    (root / "class_05").mkdir()
    (root / "class_05" / "notes.txt").write_text("no images here")
    one_line_error(lambda: ImageFolderDataModule(root=str(root)).setup(), "class folder has no images",
                   str(root / "class_05"))
    omni = write_omniglot_folders(tmp_path / "omni", omni_arrays)
    empty = omni / "images_background" / "Alphabet_01" / "character99"
    empty.mkdir()
    one_line_error(lambda: omniglot(omni).setup(), "class folder has no images", str(empty))


def test_more_ways_than_classes_says_both_numbers(tmp_path, omni_npz):
    one_line_error(lambda: omniglot(omni_npz, eval_ways=5, cache_dir=str(tmp_path)).setup(),
                   "eval_ways=5", "the 4 classes of the val split", str(omni_npz))
    one_line_error(lambda: omniglot(omni_npz, ways=200, eval_ways=2, cache_dir=str(tmp_path)).setup(),
                   "ways=200", "the 172 classes of the train split")  # 43 characters x 4 rotations


def test_more_shots_and_queries_than_images(tmp_path, omni_npz):
    one_line_error(lambda: omniglot(omni_npz, ways=2, shots=3, queries=4, cache_dir=str(tmp_path)).setup(),
                   "shots + queries = 3 + 4", "the 6 images of class", "train split")
    one_line_error(lambda: omniglot(omni_npz, ways=2, eval_queries=6, cache_dir=str(tmp_path)).setup(),
                   "eval_shots + eval_queries = 1 + 6", "the 6 images")


def test_pickle_without_image_data(tmp_path):
    root = write_mini_pickles(tmp_path, mini_arrays(classes={"train": 5, "val": 5, "test": 5}, per_class=3))
    path = root / "mini-imagenet-cache-val.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"class_dict": {"n1": [0]}}, handle)
    one_line_error(lambda: MiniImageNetDataModule(root=str(root)).setup(), str(path), "'image_data'")


def test_csv_row_naming_a_missing_file(tmp_path):
    root = write_mini_csv(tmp_path, mini_arrays(classes={"train": 5, "val": 5, "test": 5}, per_class=3))
    lines = (root / "test.csv").read_text().splitlines()
    lines.insert(3, "n99999999.jpg,n00001021")
    (root / "test.csv").write_text("\n".join(lines) + "\n")
    one_line_error(lambda: MiniImageNetDataModule(root=str(root)).setup(), f"{root / 'test.csv'}:4",
                   str(root / "images" / "n99999999.jpg"))


# ---------------------------------------------------------------------------- partial downloads
def official_named(root: Path, arrays, layout: str = "folder") -> Path:
    """A miniature whose first background alphabet carries an official name (Korean): so it
    claims to be the official release, but holds a few characters of 6 drawers."""
    import shutil

    folder = write_omniglot_folders(root / "src", arrays)
    (folder / "images_background" / "Alphabet_00").rename(folder / "images_background" / "Korean")
    if layout == "folder":
        return folder
    out = root / "zips"
    out.mkdir()
    for half in HALVES:
        shutil.make_archive(str(out / half), "zip", folder, half)
    return out


def test_official_counts_are_the_release():
    from lit_meta.data.omniglot import DRAWERS, OFFICIAL, check_complete

    assert [sum(OFFICIAL[h].values()) for h in HALVES] == [964, 659]
    assert [len(OFFICIAL[h]) for h in HALVES] == [30, 20] and DRAWERS == 20
    full = {f"{a}/character{c + 1:02d}": [f"{k}.png" for k in range(20)]
            for a, n in OFFICIAL["images_background"].items() for c in range(n)}
    check_complete("images_background", full, "images_background")  # the complete release passes
    del full["Tagalog/character17"]
    full["Greek/character03"] = full["Greek/character03"][:13]
    one_line_error(lambda: check_complete("images_background", full, "images_background"),
                   "963 of 964 characters", "Tagalog has 16 of 17 characters", "Greek/character03 has 13 of 20 drawers")


@pytest.mark.parametrize("layout", ["folder", "zip"])
def test_an_interrupted_download_of_omniglot_is_named(tmp_path, omni_arrays, layout):
    root = official_named(tmp_path, omni_arrays, layout)
    where = root / ("images_background" if layout == "folder" else "images_background.zip")
    one_line_error(lambda: omniglot(root).setup(), f"Omniglot {where} is incomplete: 40 of 964 characters",
                   "missing alphabets Alphabet_of_the_Magi, Anglo-Saxon_Futhorc, Arcadian and 26 more",
                   "Korean has 14 of 40 characters", "has 6 of 20 drawers", "interrupted download or extraction",
                   "download it again")
    omniglot(write_omniglot_folders(tmp_path / "mini", omni_arrays)).setup()  # other names: read as they are


def test_a_truncated_omniglot_zip_hints_at_the_download(tmp_path, omni_arrays):
    root = write_omniglot_zips(tmp_path, omni_arrays)
    data = (root / "images_background.zip").read_bytes()
    (root / "images_background.zip").write_bytes(data[: len(data) // 2])
    one_line_error(lambda: omniglot(root).setup(), str(root / "images_background.zip"), "interrupted download")


@pytest.mark.parametrize("layout", ["pickle", "csv"])
def test_a_miniimagenet_source_missing_one_split_names_the_file(tmp_path, layout):
    arrays = mini_arrays(classes={"train": 5, "val": 5, "test": 5}, per_class=3)
    root = (write_mini_pickles if layout == "pickle" else write_mini_csv)(tmp_path, arrays)
    missing = root / ("mini-imagenet-cache-test.pkl" if layout == "pickle" else "test.csv")
    missing.unlink()
    one_line_error(lambda: MiniImageNetDataModule(root=str(root)).setup(), f"lacks {missing}")


def test_partial_datasets_through_train_py(run_cli, capsys, tmp_path, omni_arrays):
    from tests.conftest import REPO

    root = official_named(tmp_path, omni_arrays)
    for config, args, fragment in [
        ("omniglot/maml_5w1s.yaml", ["--data.root", str(root)], f"Omniglot {root / 'images_background'} is incomplete"),
        ("miniimagenet/maml_5w1s.yaml", ["--data.root", str(tmp_path / "mini")],
         f"lacks {tmp_path / 'mini' / 'mini-imagenet-cache-val.pkl'}"),
    ]:
        if config.startswith("mini"):
            write_mini_pickles(tmp_path / "mini", mini_arrays(classes={"train": 5, "val": 5, "test": 5}, per_class=3))
            (tmp_path / "mini" / "mini-imagenet-cache-val.pkl").unlink()
        with pytest.raises(SystemExit) as exc:
            run_cli("fit", "--config", str(REPO / "configs" / config), *args, "--trainer.max_steps", "1")
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("error: ") and fragment in err.strip().splitlines()[-1]


def test_bad_options(tmp_path):
    one_line_error(lambda: OmniglotDataModule(root=str(tmp_path), split="vinyals"), "split", "vinyals")
    one_line_error(lambda: OmniglotDataModule(root=str(tmp_path), eval_shots=0), "eval_shots")
    one_line_error(lambda: ImageFolderDataModule(root=str(tmp_path), channels=2), "channels")
    one_line_error(lambda: ImageFolderDataModule(root=str(tmp_path), mean=[0.5]), "mean and std")
    one_line_error(lambda: ImageFolderDataModule(root=str(tmp_path), val_fraction=0.6, test_fraction=0.5),
                   "val_fraction + test_fraction")
    (tmp_path / "train").mkdir()
    one_line_error(lambda: ImageFolderDataModule(root=str(tmp_path), split="folders").setup(), "val/")


def test_preprocess_rounds_and_inverts():
    white = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    assert torch.equal(preprocess(white, 4, invert=True), torch.zeros_like(white))
    # The resize is PIL's antialiased BILINEAR up to rounding (<= 1 gray level).
    from PIL import Image

    image = np.random.default_rng(0).integers(0, 256, (40, 60), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(image).resize((28, 28), Image.BILINEAR)).astype(int)
    ours = preprocess(torch.from_numpy(image)[None, None], 28)[0, 0].numpy().astype(int)
    assert np.abs(pil - ours).max() <= 1


# ---------------------------------------------------------------------------- the real pack
real = pytest.mark.skipif(not (REAL_OMNIGLOT / "images_background.npz").is_file(),
                          reason=f"real Omniglot pack not found at {REAL_OMNIGLOT.resolve()}")


@real
@pytest.mark.slow
def test_real_omniglot_pack_and_a_short_fomaml_run(tmp_path):
    dm = real_omniglot()
    data = dm.load_all()
    assert len(data["counts"]) == 1623 and data["background"] == 964
    assert bool((data["counts"] == 20).all())
    dm.setup()
    assert [len(dm.pools[s].counts) for s in ("train", "val", "test")] == [1100, 100, 423]
    assert 0.02 < data["images"][:1000].float().mean() / 255 < 0.3  # ink = 1 is the minority
    check_real_fomaml(measure_real_fomaml(dm, tmp_path))


def real_omniglot(seed: int = 0) -> OmniglotDataModule:
    return OmniglotDataModule(root=str(REAL_OMNIGLOT), ways=5, shots=1, queries=5, eval_queries=15,
                              meta_batch_size=16, val_tasks=16, test_tasks=200, eval_batch_size=50,
                              steps_per_epoch=100, seed=seed)


def measure_real_fomaml(dm: OmniglotDataModule, folder: Path, seed: int = 0) -> dict[str, float]:
    """Test accuracy (200 tasks, 5-way 1-shot) of 200 FOMAML meta-steps on the real pack."""
    import pytorch_lightning as pl

    from lit_meta.algorithms import MAML

    pl.seed_everything(seed)
    model = MAML(dm.task_spec, inner_lr=0.4, inner_steps=1, eval_inner_steps=3, first_order=True,
                 meta_batch_size=16, meta_lr=0.003)
    trainer = pl.Trainer(max_steps=200, inference_mode=False, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, default_root_dir=str(folder))
    trainer.fit(model, datamodule=dm)
    return trainer.test(model, datamodule=dm, verbose=False)[0]


def check_real_fomaml(m: dict[str, float]) -> None:
    # chance is 0.2. Measured at seeds 0-2 (tests/learning_margins.py, docs/RESULTS.md): see there.
    assert m["test/acc"] > 0.6, m


# ---------------------------------------------------------------------------- device placement
def test_pools_and_episodes_live_on_the_data_device(tmp_path, omni_npz, monkeypatch):
    """Pools move to ``data_device()`` in setup and episodes are built there; the "meta"
    device stands in for a GPU (any host sync or CPU-only op in the sampler would fail)."""
    dm = omniglot(omni_npz, cache_dir=str(tmp_path))
    dm.sample_tasks("train", torch.Generator().manual_seed(0), 1)  # loads on the CPU, no Trainer yet
    assert dm.pools["train"].images.device.type == "cpu"
    monkeypatch.setattr(dm, "data_device", lambda: torch.device("meta"))
    dm.setup()  # as Lightning calls it: the pools follow the training device
    assert all(p.images.device.type == "meta" for p in dm.pools.values())
    for split in ("train", "test"):
        batch = dm.sample_tasks(split, torch.Generator().manual_seed(0), 4)
        assert {t.device.type for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)} == {"meta"}
        assert batch.query_x.shape == (4, 6, 1, 21, 21)


@pytest.mark.gpu
def test_episodes_on_gpu_match_the_cpu(tmp_path, omni_npz, monkeypatch):
    cpu = omniglot(omni_npz, cache_dir=str(tmp_path))
    cpu.setup()
    gpu = omniglot(omni_npz, cache_dir=str(tmp_path))
    monkeypatch.setattr(gpu, "data_device", lambda: torch.device("cuda"))
    gpu.setup()
    a, b = cpu.train_batch(3), gpu.train_batch(3)
    assert b.support_x.is_cuda and torch.equal(a.support_x, b.support_x.cpu()) and torch.equal(a.query_y, b.query_y.cpu())
