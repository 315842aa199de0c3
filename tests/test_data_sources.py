"""CIFAR-FS, FC100, CUB, tieredImageNet and miniImageNet read from their original sources.

Miniature sources in the exact original on-disk formats (tests/source_fixtures.py); checked
against the shipped split files, the index rule, the input pipeline, episodes, resumption
of the memory-mapped build, and every bad input's one line.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lit_meta.data import (
    CIFARFSDataModule,
    CUBDataModule,
    FC100DataModule,
    MiniImageNetDataModule,
    TieredImageNetDataModule,
)
from lit_meta.data import image_cache
from lit_meta.data.imagenet_train import ImageNetTrain, numeric_order
from lit_meta.data.tieredimagenet import tiered_split
from lit_meta.data.decoding import decode_image
from lit_meta.data.preprocessing import images_from_files, preprocess
from lit_meta.data.splits import SHIPPED, read_class_list, read_fc100, read_ravi, read_tiered, split_files
from tests.test_data_images import one_line_error
from tests.source_fixtures import (
    cifar_image,
    cifar_names,
    imagenet_image,
    jpeg_bytes,
    synset_numbers,
    write_cifar100,
    write_all_sources,
    write_cub,
    write_imagenet,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
SPLITS = ("train", "val", "test")
SMALL = {"ways": 5, "shots": 1, "queries": 1, "image_size": 16}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    return write_all_sources(tmp_path_factory.mktemp("sources"))


def from_files(files: list, spec: dict) -> torch.Tensor:
    """Image files through a checkpoint's input pipeline (``task_spec``), as ``train.py adapt`` reads them."""
    out = images_from_files(files, spec)
    return getattr(out, "images", out)  # a tensor, or (after core's adapt restructuring) ImageFiles.images


def raw_from_files(files: list, spec: dict) -> torch.Tensor:
    """:func:`from_files` before normalisation: uint8, comparable with the cached pools."""
    x = from_files(files, {**spec, "mean": [0.0] * spec["channels"], "std": [1.0] * spec["channels"]})
    return (x * 255).round().to(torch.uint8)


def cached_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.exists() else []


# ---------------------------------------------------------------------------- the shipped splits
def git_blob(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_shipped_split_files_are_the_published_ones():
    """Verbatim copies keep their source blob ids (README.md beside them); the counts are the papers'."""
    readme = (SHIPPED["cifar_fs"].parent / "README.md").read_text()
    for dataset in ("miniimagenet", "tieredimagenet", "cifar_fs"):
        for split, path in split_files(dataset).items():
            assert re.search(rf"{split} `{git_blob(path)}`", readme), (dataset, split)
    ravi = {s: read_ravi(p) for s, p in split_files("miniimagenet").items()}
    assert [len(ravi[s]) for s in SPLITS] == [64, 16, 20]
    assert all(len(v) == 600 for s in SPLITS for v in ravi[s].values())
    tiered = {s: read_tiered(p) for s, p in split_files("tieredimagenet").items()}
    assert [len(tiered[s]) for s in SPLITS] == [351, 97, 160]
    assert [len({c for _, c in tiered[s]}) for s in SPLITS] == [20, 6, 8]
    cifar_fs = {s: read_class_list(p) for s, p in split_files("cifar_fs").items()}
    assert [len(cifar_fs[s]) for s in SPLITS] == [64, 16, 20]
    fc100 = {s: read_fc100(p) for s, p in split_files("fc100").items()}
    assert [len(fc100[s]) for s in SPLITS] == [60, 20, 20]
    assert [sorted({r[0] for r in fc100[s]}) for s in SPLITS] == [[1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19],
                                                                [8, 11, 13, 16], [0, 7, 12, 14]]
    assert set(sum(cifar_fs.values(), [])) == {r[3] for s in SPLITS for r in fc100[s]}  # the same 100 names
    cub = {s: read_class_list(p) for s, p in split_files("cub").items()}
    everything = sorted(sum(cub.values(), []))
    assert len(everything) == 200
    assert cub == {"train": everything[0::2], "val": everything[1::4], "test": everything[3::4]}  # CloserLook's rule


def test_split_files_are_package_data():
    """Every shipped split file (and the provenance README) is matched by pyproject's package-data globs."""
    import fnmatch
    import tomllib

    from tests.conftest import REPO

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = config["lit_meta.data.splits"]
    folder = SHIPPED["cifar_fs"].parent
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.suffix != ".py"
             and "__pycache__" not in p.parts]
    assert len(files) == 16
    assert all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), files


# ---------------------------------------------------------------------------- CIFAR-FS / FC100
def cifar_dm(root: Path, cls=CIFARFSDataModule, **kwargs):
    return cls(root=str(root), **{**SMALL, "image_size": 32, **kwargs})


def test_cifar_folder_and_archive_give_all_images_in_order(sources):
    folder, archive = cifar_dm(sources["cifar"]), cifar_dm(sources["cifar_tgz"])
    a, b = folder.build_pools(), archive.build_pools()
    for split in SPLITS:
        assert a[split].names == b[split].names
        assert torch.equal(a[split].images, b[split].images)
    fine_names, _, _ = cifar_names()
    pool = a["test"]
    first = fine_names.index(pool.names[0])
    in_files = []  # (fine, index, part) of the class's images, in file order, train file first
    for part, name in enumerate(("train", "test")):
        with open(sources["cifar"] / "cifar-100-python" / name, "rb") as handle:
            rows = pickle.load(handle, encoding="latin1")
        in_files += [(f, int(n.split("_")[2].split(".")[0]), part)
                     for f, n in zip(rows["fine_labels"], rows["filenames"]) if f == first]
    expected = np.stack([cifar_image(*code) for code in in_files])
    assert len(in_files) == 4 and torch.equal(pool.images[:4], torch.from_numpy(expected))  # 32x32 as is
    assert bool((pool.counts == 4).all())
    assert (sources["cifar"] / "cifar100_32px.pt").is_file() and (sources["cifar_tgz"] / "cifar100_32px.pt").is_file()


def test_cifar_cache_is_rebuilt_when_the_source_changes(tmp_path):
    root = write_cifar100(tmp_path)
    before = cifar_dm(root).build_pools()["train"].images.clone()
    path = root / "cifar-100-python" / "test"
    with open(path, "rb") as handle:
        part = pickle.load(handle, encoding="latin1")
    part["data"] = 255 - part["data"]
    path.write_bytes(pickle.dumps(part, protocol=2))
    after = cifar_dm(root).build_pools()["train"].images
    assert torch.equal(after[:3], before[:3]) and torch.equal(after[3], 255 - before[3])  # 3 train, then 1 test


def test_cifar_fs_and_fc100_splits_are_the_shipped_ones(sources):
    fine_names, coarse_names, coarse_of_fine = cifar_names()
    cifar_fs, fc100 = cifar_dm(sources["cifar"]).build_pools(), cifar_dm(sources["cifar"], FC100DataModule).build_pools()
    for split, path in split_files("cifar_fs").items():
        assert cifar_fs[split].names == sorted(read_class_list(path))
    for split, path in split_files("fc100").items():
        rows = read_fc100(path)
        assert fc100[split].names == sorted(r[3] for r in rows)
        for coarse_id, coarse_name, fine_id, fine_name in rows:  # the source's superclass of every fine class
            assert coarse_of_fine[fine_names.index(fine_name)] == coarse_id and coarse_names[coarse_id] == coarse_name


def test_cifar_episodes_come_from_their_split(sources):
    fine_names, _, _ = cifar_names()
    dm = cifar_dm(sources["cifar"], FC100DataModule, ways=5, shots=2, queries=2, mean=[0.0] * 3, std=[1.0] * 3)
    dm.setup()
    batch = dm.sample_tasks("val", torch.Generator().manual_seed(0), 6)
    assert batch.support_x.shape == (6, 10, 3, 32, 32) and batch.query_x.shape == (6, 10, 3, 32, 32)
    assert batch.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    val = {fine_names.index(n) for n in dm.pools["val"].names}
    codes = (torch.cat([batch.support_x, batch.query_x], 1)[:, :, :, 0, 0] * 255).round().long()  # (fine, i, part)
    labels = torch.cat([batch.support_y, batch.query_y], 1)
    for t in range(6):
        for label in range(5):
            classes = set(codes[t][labels[t] == label, 0].tolist())
            assert len(classes) == 1 and classes <= val
        assert len(set(codes[t, :, 0].tolist())) == 5
        assert len({tuple(c) for c in codes[t].tolist()}) == 20  # no image twice


def test_cifar_image_files_reproduce_the_training_tensors(sources, tmp_path):
    """``train.py adapt`` reads files through the task_spec pipeline: a CIFAR image saved as PNG gives
    exactly the tensor episodes are made of (also when resized)."""
    native = cifar_dm(sources["cifar"]).build_pools()["train"].images[0]
    code = native[:, 0, 0].tolist()  # (fine, index, part) of the pool's first image
    Image.fromarray(cifar_image(*code).transpose(1, 2, 0)).save(tmp_path / "x.png")
    for size in (32, 20):
        dm = cifar_dm(sources["cifar"], image_size=size)
        dm.setup()
        x = from_files([tmp_path / "x.png"], dm.task_spec)
        mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
        assert torch.allclose(x[0], (dm.pools["train"].images[0].float() / 255 - mean) / std, atol=1e-6)


def test_cifar_download_uses_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def fake(root, train=True, download=False):
        calls.append((root, download))
        write_cifar100(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake)
    dm = cifar_dm(tmp_path / "new", download=True)
    assert len(dm.build_pools()["train"].names) == 64
    assert calls == [(str(tmp_path / "new"), True)]


# ---------------------------------------------------------------------------- CUB
def cub_dm(root: Path, **kwargs) -> CUBDataModule:
    return CUBDataModule(root=str(root), **{**SMALL, **kwargs})


def test_cub_folder_and_archive_agree_and_follow_the_split(sources):
    a, b = cub_dm(sources["cub"]).build_pools(), cub_dm(sources["cub_tgz"]).build_pools()
    for split, path in split_files("cub").items():
        assert a[split].names == b[split].names == read_class_list(path)
        assert torch.equal(a[split].images, b[split].images)
        assert bool((a[split].counts == 2).all())
    files = sorted((sources["cub"] / "CUB_200_2011" / "images" / a["val"].names[3]).glob("*.jpg"))
    spec = cub_dm(sources["cub"]).task_spec
    assert spec["resize_size"] == 18 and spec["input_shape"] == [3, 16, 16]  # int(16 * 1.15), then crop 16
    assert torch.equal(raw_from_files(files, spec), a["val"].images[6:8])  # full image, resized, cropped


def test_cub_transform_is_closerlooks(tmp_path):
    """Resize to int(1.15 * 84) = 96 square, centre crop 84, as CloserLookFewShot's torchvision
    transform (PIL bilinear): within one gray level, on a full-size, non-square image."""
    from torchvision import transforms

    rng = np.random.default_rng(0)
    image = (rng.random((3, 1, 1)) * 255 * np.ones((3, 375, 500)) + rng.normal(0, 40, (3, 375, 500)))
    Image.fromarray(image.clip(0, 255).astype(np.uint8).transpose(1, 2, 0)).save(tmp_path / "bird.png")
    spec = CUBDataModule(root=str(tmp_path)).task_spec
    ours = raw_from_files([tmp_path / "bird.png"], spec)[0].float() / 255
    theirs = transforms.Compose([transforms.Resize([96, 96]), transforms.CenterCrop(84), transforms.ToTensor()])(
        Image.open(tmp_path / "bird.png").convert("RGB"))
    assert ours.shape == theirs.shape == (3, 84, 84)
    assert (ours - theirs).abs().max() <= 1.01 / 255


# ---------------------------------------------------------------------------- ImageNet: the index rule
def test_numeric_order_is_not_lexicographic():
    names = ["n01_x.JPEG", "n01234567_10.JPEG", "n01234567_9.JPEG", "n01234567_100.JPEG", "n01234567_2.jpeg",
             "n07654321_1.JPEG", ".DS_Store"]
    assert [n for _, n in numeric_order("n01234567", names)] == [
        "n01234567_2.jpeg", "n01234567_9.JPEG", "n01234567_10.JPEG", "n01234567_100.JPEG"]


@pytest.mark.parametrize("tars", [False, True])
def test_ravi_positions_pick_the_numerically_sorted_files(tmp_path, tars):
    """A hand-built synset where lexicographic order picks other files: positions 1..3 are _2, _9, _10
    (lexicographic: _10, _100, _1000)."""
    wnids = {"train": "n00000001", "val": "n00000002", "test": "n00000003"}
    numbers = [1000, 10, 2, 100, 9]  # written in this order
    imagenet = tmp_path / "train"
    imagenet.mkdir()
    for wnid in wnids.values():
        members = {f"{wnid}_{n}.JPEG": jpeg_bytes(imagenet_image(wnid, n, (12, 9))) for n in numbers}
        if tars:
            with tarfile.open(imagenet / f"{wnid}.tar", "w") as tar:
                for name, blob in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
        else:
            (imagenet / wnid).mkdir()
            for name, blob in members.items():
                (imagenet / wnid / name).write_bytes(blob)
    ravi = tmp_path / "ravi"
    ravi.mkdir()
    for split, wnid in wnids.items():
        (ravi / f"{split}.csv").write_text(f"filename,label\n{wnid}00000001.jpg,{wnid}\n{wnid}00000002.jpg,{wnid}\n"
                                           f"{wnid}00000003.jpg,{wnid}\n")
    dm = MiniImageNetDataModule(root=str(tmp_path / "cache"), imagenet_root=str(imagenet), split_dir=str(ravi),
                                ways=1, shots=1, queries=1, image_size=12)
    pools = dm.build_pools()

    def expected(wnid: str, picked: list[int]) -> torch.Tensor:
        return torch.stack([torch.tensor(decode_image(jpeg_bytes(imagenet_image(wnid, n, (12, 9))), 3))
                            for n in picked])

    for split, wnid in wnids.items():
        assert pools[split].names == [wnid]
        images = pools[split].images
        assert torch.equal(images, preprocess(expected(wnid, [2, 9, 10]), 12))
        assert not torch.equal(images, preprocess(expected(wnid, [10, 100, 1000]), 12))  # lexicographic


def test_miniimagenet_from_imagenet_folder_and_tars(sources, tmp_path):
    """The shipped Ravi classes (reduced CSVs: 3 rows of each class, the real positions), folders and
    tars giving the same tensors, each image the file at its numerical position."""
    kwargs = {**SMALL, "split_dir": str(sources["ravi"])}
    folder = MiniImageNetDataModule(root=str(tmp_path / "a"), imagenet_root=str(sources["imagenet"]), **kwargs)
    tars = MiniImageNetDataModule(root=str(tmp_path / "b"), imagenet_root=str(sources["imagenet_tars"]), **kwargs)
    a, b = folder.build_pools(), tars.build_pools()
    assert (tmp_path / "a" / "miniimagenet_imagenet_16px.pt").is_file()
    for split, path in split_files("miniimagenet").items():
        assert a[split].names == b[split].names == sorted(read_ravi(path))  # every shipped class
        assert torch.equal(a[split].images, b[split].images)
    rows = read_ravi(sources["ravi"] / "test.csv")
    wnid = a["test"].names[1]
    files = [sources["imagenet"] / wnid / f"{wnid}_{n}.JPEG" for n in sorted(synset_numbers(wnid, rows[wnid][-1] + 2))]
    picked = [files[p - 1] for p in rows[wnid]]
    assert torch.equal(raw_from_files(picked, folder.task_spec), a["test"].images[3:6])


# ---------------------------------------------------------------------------- tieredImageNet
def tiered_dm(sources, root: Path, **kwargs) -> TieredImageNetDataModule:
    return TieredImageNetDataModule(root=str(root), imagenet_root=str(sources["imagenet"]), **{**SMALL, **kwargs})


def test_tieredimagenet_has_every_image_of_the_shipped_synsets(sources, tmp_path):
    dm = tiered_dm(sources, tmp_path / "a")
    pools = dm.build_pools()
    data = dm.load()
    source = ImageNetTrain(sources["imagenet"])
    for split, path in split_files("tieredimagenet").items():
        rows = read_tiered(path)
        assert sorted(pools[split].names) == sorted(w for w, _ in rows)
        assert pools[split].names == [w for _, w in sorted((c, w) for w, c in rows)]  # by (category, synset)
        assert pools[split].counts.tolist() == [len(source.files(w).sources) for w in pools[split].names]
    first = pools["val"].names[0]
    files = source.files(first).names
    assert torch.equal(raw_from_files(files, dm.task_spec), pools["val"].images[:len(files)])
    categories = tiered_dm(sources, tmp_path / "a", labels="category").build_pools()
    assert [len(categories[s].names) for s in SPLITS] == [20, 6, 8]
    for split in SPLITS:
        assert categories[split].images.shape == pools[split].images.shape
        assert int(categories[split].counts.sum()) == int(pools[split].counts.sum())
    assert data["categories"][:2] == ["n01524359", "n01524359"]  # passerine first
    tars = tiered_dm({"imagenet": sources["imagenet_tars"]}, tmp_path / "b").build_pools()
    assert all(torch.equal(tars[s].images, pools[s].images) for s in SPLITS)


def test_tieredimagenet_pool_is_memory_mapped(sources, tmp_path):
    """The pool is a view of the cache file's mapping (not a copy in memory); episodes gather from it.
    The cache goes to a --data.cache_dir that does not exist yet."""
    cache = tmp_path / "not" / "yet"
    dm = tiered_dm(sources, tmp_path, labels="category", ways=5, shots=2, queries=1, cache_dir=str(cache))
    dm.setup()
    images = dm.pools["train"].images
    array = cache / "tieredimagenet_16px.u8"
    assert array.stat().st_size == int(dm.load()["counts"].sum()) * 3 * 16 * 16
    address = images.data_ptr()
    with open("/proc/self/maps") as maps:
        regions = [line.split() for line in maps]
    mapped = [r[5] for r in regions if len(r) > 5 and int(r[0].split("-")[0], 16) <= address < int(r[0].split("-")[1], 16)]
    assert mapped == [str(array)]
    batch = dm.sample_tasks("train", torch.Generator().manual_seed(0), 3)
    assert batch.support_x.shape == (3, 10, 3, 16, 16) and batch.query_y[0].tolist() == [0, 1, 2, 3, 4]


def test_tieredimagenet_host_pools_send_episodes_to_the_device(sources, tmp_path, monkeypatch):
    """``pool_device: host`` keeps the memory map on the CPU and copies each uint8 episode to the
    training device, ``data_device()`` as for every DataModule ("meta" stands in for a GPU);
    ``device`` moves the pools there."""
    for mode, pools_on in (("host", "cpu"), ("device", "meta")):
        dm = tiered_dm(sources, tmp_path, pool_device=mode)
        monkeypatch.setattr(dm, "data_device", lambda: torch.device("meta"))
        dm.setup()
        assert {p.images.device.type for p in dm.pools.values()} == {pools_on}
        batch = dm.sample_tasks("train", torch.Generator().manual_seed(0), 2)
        assert batch.support_x.device.type == batch.query_y.device.type == "meta"
        assert batch.support_x.shape == (2, 5, 3, 16, 16)



def test_data_device_means_the_training_device_for_every_datamodule():
    """``data_device()`` is where a DataModule's batches are made, the base class's one meaning:
    no DataModule redefines it (tieredImageNet's host pools have their own hook, ``pool_location``)."""
    import lit_meta.data as data
    from lit_meta.data import EpisodicDataModule

    classes = [getattr(data, n) for n in data.__all__ if isinstance(getattr(data, n), type)
               and issubclass(getattr(data, n), EpisodicDataModule)]
    assert data.TieredImageNetDataModule in classes
    assert all(cls.data_device is EpisodicDataModule.data_device for cls in classes), classes

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tieredimagenet_host_pools_on_a_gpu_give_the_cpu_episodes(sources, tmp_path, monkeypatch):
    """Pinned uint8 episodes copied from the memory map equal the CPU run's, for both pool placements."""
    cpu = tiered_dm(sources, tmp_path)
    cpu.setup()
    for mode in ("host", "device"):
        gpu = tiered_dm(sources, tmp_path, pool_device=mode)
        monkeypatch.setattr(gpu, "data_device", lambda: torch.device("cuda"))
        gpu.setup()
        a, b = cpu.train_batch(3), gpu.train_batch(3)
        assert b.support_x.is_cuda and torch.equal(a.support_x, b.support_x.cpu())
        assert torch.equal(a.query_x, b.query_x.cpu()) and torch.equal(a.query_y, b.query_y.cpu())


def test_tieredimagenet_build_resumes_after_an_interruption(sources, tmp_path, monkeypatch, capsys):
    """A build stopped part-way (an unreadable image) resumes where its last saved chunk ended once the
    image is fixed, decodes only the rest, says so, and gives exactly the array of a clean build."""
    imagenet = tmp_path / "train"
    rows, _ = tiered_split(None)
    order = [w for s in SPLITS for w, _ in rows[s]]  # the build's order
    synsets = {w: 3 for w in order}
    write_imagenet(imagenet, synsets)
    monkeypatch.setattr(image_cache, "CHUNK_IMAGES", 100)
    monkeypatch.setattr(image_cache, "QUIET_BELOW", 0)  # progress lines (not a terminal) for this small build
    # images 1050..1052; the second is image 1051: the build stops in its 11th chunk of 100
    victim = Path(ImageNetTrain(imagenet).files(order[350]).names[1])
    good = victim.read_bytes()
    victim.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    cache = tmp_path / "cache"
    dm = TieredImageNetDataModule(root=str(cache), imagenet_root=str(imagenet), **SMALL)
    one_line_error(dm.build_pools, str(victim), "on_bad_image skip")
    assert cached_files(cache) == ["tieredimagenet_16px.u8.partial", "tieredimagenet_16px.u8.progress.json"]
    assert json.loads((cache / "tieredimagenet_16px.u8.progress.json").read_text())["next"] == 1000
    victim.write_bytes(good)
    calls = []
    real = image_cache.load_image
    monkeypatch.setattr(image_cache, "load_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    capsys.readouterr()
    resumed = TieredImageNetDataModule(root=str(cache), imagenet_root=str(imagenet), **SMALL).build_pools()
    total = sum(synsets.values())
    progress = capsys.readouterr().err.splitlines()
    assert progress[0].endswith(f"tieredimagenet_16px.u8: resumed, 1000/{total} images (54.8%)")
    assert progress[-1].startswith(f"building the tieredImageNet cache tieredimagenet_16px.u8: done, {total}/{total}")
    assert len(calls) == total - 1000  # resumed, not restarted
    assert cached_files(cache) == ["tieredimagenet_16px.pt", "tieredimagenet_16px.u8"]
    clean = TieredImageNetDataModule(root=str(tmp_path / "clean"), imagenet_root=str(imagenet), **SMALL).build_pools()
    assert len(calls) == 2 * total - 1000
    for split in SPLITS:
        assert torch.equal(resumed[split].images, clean[split].images)
        assert resumed[split].names == clean[split].names


@pytest.mark.slow  # process start-up (10 s); the one-process build is checked against the source above
def test_tieredimagenet_build_workers_give_the_same_array(sources, tmp_path, monkeypatch):
    """``build_workers: 2`` decodes each chunk in two processes, in order: the same array as one process."""
    monkeypatch.setattr(image_cache, "CHUNK_IMAGES", 7)  # several chunks, split unevenly between the workers
    split = tmp_path / "split"
    split.mkdir()
    for name, path in split_files("tieredimagenet").items():
        (split / f"{name}.csv").write_text("".join(f"{w},{c}\n" for w, c in read_tiered(path)[:3]))
    serial = tiered_dm(sources, tmp_path / "serial", split_dir=str(split), ways=3).build_pools()
    parallel = tiered_dm(sources, tmp_path / "parallel", split_dir=str(split), ways=3, build_workers=2).build_pools()
    for name in SPLITS:
        assert torch.equal(serial[name].images, parallel[name].images) and serial[name].names == parallel[name].names


def test_tieredimagenet_cache_is_rebuilt_when_a_source_changes_and_used_without_the_source(sources, tmp_path):
    imagenet = tmp_path / "train"
    synsets = {w: 2 for w, _ in sum((read_tiered(p) for p in split_files("tieredimagenet").values()), [])}
    write_imagenet(imagenet, synsets)
    pools = TieredImageNetDataModule(root=str(tmp_path), imagenet_root=str(imagenet), **SMALL).build_pools()
    before = pools["test"].images.clone()
    first = ImageNetTrain(imagenet).files(pools["test"].names[0]).sources[0]
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(first, format="JPEG")
    after = TieredImageNetDataModule(root=str(tmp_path), imagenet_root=str(imagenet), **SMALL).build_pools()["test"]
    assert bool((after.images[0] == 0).all()) and not torch.equal(after.images[0], before[0])
    assert torch.equal(after.images[1:], before[1:])
    # on a machine without ImageNet the cache is used as it is, if built with the same options
    cached = TieredImageNetDataModule(root=str(tmp_path), **SMALL).build_pools()["test"]
    assert torch.equal(cached.images, after.images)
    one_line_error(lambda: TieredImageNetDataModule(root=str(tmp_path), **{**SMALL, "interpolation": "area"}).setup(),
                   "other options", "--data.imagenet_root")
    one_line_error(lambda: TieredImageNetDataModule(root=str(tmp_path / "none"), **SMALL).setup(),
                   "no tieredImageNet cache", "--data.imagenet_root")


# ---------------------------------------------------------------------------- seeded task stream
@pytest.mark.parametrize("dataset", ["cifar_fs", "fc100", "cub", "tieredimagenet", "miniimagenet"])
def test_a_fresh_datamodule_draws_the_same_tasks(sources, tmp_path, dataset):
    """The task stream is the step's seed: a DataModule built from the cache later (a resumed run)
    draws the same training and evaluation tasks as the one that built it."""
    def make(root: Path):
        if dataset in ("cifar_fs", "fc100"):
            return cifar_dm(sources["cifar"], CIFARFSDataModule if dataset == "cifar_fs" else FC100DataModule,
                            cache_dir=str(root))
        if dataset == "cub":
            return cub_dm(sources["cub"], cache_dir=str(root))
        if dataset == "tieredimagenet":
            return tiered_dm(sources, root)
        return MiniImageNetDataModule(root=str(root), imagenet_root=str(sources["imagenet"]),
                                      split_dir=str(sources["ravi"]), **SMALL)

    first = make(tmp_path)
    first.setup()
    again = make(tmp_path)
    again.setup()
    assert first.task_spec["dataset"] == dataset
    for step in (0, 7):
        a, b = first.train_batch(step), again.train_batch(step)
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)
    assert not torch.equal(first.train_batch(0).support_x, first.train_batch(1).support_x)
    assert torch.equal(first.eval_batch("test", 0).query_x, again.eval_batch("test", 0).query_x)


# ---------------------------------------------------------------------------- bad input
def test_missing_sources(tmp_path):
    missing = tmp_path / "nowhere"
    one_line_error(lambda: cifar_dm(missing).setup(), str(missing), "cifar-100-python", "--data.download true")
    one_line_error(lambda: cub_dm(missing).setup(), str(missing), "CUB_200_2011/images", "CUB_200_2011.tgz")
    one_line_error(lambda: TieredImageNetDataModule(root=str(tmp_path), imagenet_root=str(missing)).setup(),
                   f"ImageNet train folder not found: {missing}")
    one_line_error(lambda: MiniImageNetDataModule(root=str(tmp_path), imagenet_root=str(missing)).setup(),
                   str(missing), "n01440764")
    (tmp_path / "cifar-100-python").mkdir()
    one_line_error(lambda: cifar_dm(tmp_path).setup(), "has no train, test, meta")


def test_sources_missing_classes_name_the_first_and_count(tmp_path, sources):
    test = read_class_list(split_files("cifar_fs")["test"])
    root = write_cifar100(tmp_path / "cifar", skip=tuple(test[-3:]))
    one_line_error(lambda: cifar_dm(root).setup(), "no images of 3 of the 20 classes", "cifar_fs test split",
                   repr(test[-3]))
    # test, test, val classes: the val one is needed first (train, val, test order)
    cub = write_cub(tmp_path / "cub", skip=("004.Groove_billed_Ani", "200.Common_Yellowthroat", "010.Red_winged_Blackbird"))
    one_line_error(lambda: cub_dm(cub).setup(), "lacks 3 of the 200 classes", "first '010.Red_winged_Blackbird'")
    assert cached_files(cub) == []
    imagenet = tmp_path / "inet"
    write_imagenet(imagenet, {w: 2 for w in sorted(read_ravi(split_files("miniimagenet")["val"]))[2:]})
    message = one_line_error(lambda: MiniImageNetDataModule(root=str(tmp_path / "m"), imagenet_root=str(imagenet))
                             .setup(), "lacks 86 of the 100 synsets miniImageNet needs")
    assert re.search(r"first (n\d{8})", message).group(1) == sorted(
        set(read_ravi(split_files("miniimagenet")["train"])) | set(read_ravi(split_files("miniimagenet")["test"]))
        | set(sorted(read_ravi(split_files("miniimagenet")["val"]))[:2]))[0]
    one_line_error(lambda: tiered_dm({"imagenet": imagenet}, tmp_path / "t").setup(),
                   "synsets tieredImageNet needs", "first n01530575")


def test_split_file_class_the_source_lacks(tmp_path, sources):
    custom = tmp_path / "split"
    custom.mkdir()
    for split, path in split_files("cifar_fs").items():
        (custom / f"{split}.txt").write_text(path.read_text())
    (custom / "val.txt").write_text((custom / "val.txt").read_text() + "unicorn\n")
    one_line_error(lambda: cifar_dm(sources["cifar"], split_dir=str(custom)).setup(),
                   str(custom / "val.txt"), "'unicorn' is not a CIFAR-100 fine class")
    for split, path in split_files("fc100").items():
        (custom / f"{split}.txt").write_text(path.read_text().replace("4 beaver", "5 beaver"))
    one_line_error(lambda: cifar_dm(sources["cifar"], FC100DataModule, split_dir=str(custom)).setup(),
                   str(custom / "test.txt"), "fine class 5 'beaver' is not in the source")
    for split, path in split_files("cub").items():
        (custom / f"{split}.txt").write_text(path.read_text())
    (custom / "test.txt").write_text((custom / "test.txt").read_text() + "201.Dodo\n")
    one_line_error(lambda: cub_dm(sources["cub"], split_dir=str(custom)).setup(), "lacks 1 of the 201 classes",
                   "'201.Dodo'")
    for split, path in split_files("tieredimagenet").items():
        (custom / f"{split}.csv").write_text(path.read_text())
    (custom / "val.csv").write_text((custom / "val.csv").read_text() + "n99999999,n03257877\n")
    one_line_error(lambda: tiered_dm(sources, tmp_path / "t", split_dir=str(custom)).setup(),
                   "lacks 1 of the 609 synsets", "first n99999999")
    (custom / "val.csv").write_text("n02099267;n02098550\n")
    one_line_error(lambda: tiered_dm(sources, tmp_path / "t", split_dir=str(custom)).setup(),
                   f"{custom / 'val.csv'}:1", "'<synset>,<category synset>'")
    one_line_error(lambda: cub_dm(sources["cub"], split_dir=str(tmp_path / "nope")).setup(), "split_dir not found")
    ravi = tmp_path / "ravi"
    ravi.mkdir()
    for split in SPLITS:
        (ravi / f"{split}.csv").write_text((sources["ravi"] / f"{split}.csv").read_text())
    (ravi / "test.csv").write_text((ravi / "test.csv").read_text() + "n0193011200001290.jpg,n01930112\n")
    one_line_error(lambda: MiniImageNetDataModule(root=str(tmp_path / "m"), imagenet_root=str(sources["imagenet"]),
                                                  split_dir=str(ravi)).setup(),
                   str(ravi / "test.csv"), "n01930112 position 1290 is past the")


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_truncated_archives_and_pickles(tmp_path):
    cifar = write_cifar100(tmp_path / "cifar_tgz", archive=True)
    truncate(cifar / "cifar-100-python.tar.gz", 0.6)
    one_line_error(lambda: cifar_dm(cifar).setup(), str(cifar / "cifar-100-python.tar.gz"), "truncated or damaged")
    folder = write_cifar100(tmp_path / "cifar")
    truncate(folder / "cifar-100-python" / "train", 0.5)
    one_line_error(lambda: cifar_dm(folder).setup(), str(folder / "cifar-100-python" / "train"), "truncated or damaged")
    cub = write_cub(tmp_path / "cub", archive=True)
    truncate(cub / "CUB_200_2011.tgz", 0.7)
    one_line_error(lambda: cub_dm(cub).setup(), str(cub / "CUB_200_2011.tgz"), "truncated or damaged")
    for keep in ("mid-member", "at a member boundary"):
        imagenet = write_imagenet(tmp_path / keep / "train", {w: 5 for s in SPLITS for w in
                                                              read_ravi(split_files("miniimagenet")[s])}, tars=True)
        victim = sorted(imagenet.iterdir())[7]
        with tarfile.open(victim) as tar:
            members = tar.getmembers()
        cut = members[3].offset_data + 100 if keep == "mid-member" else members[3].offset
        victim.write_bytes(victim.read_bytes()[:cut])
        one_line_error(lambda: MiniImageNetDataModule(root=str(tmp_path / keep), imagenet_root=str(imagenet)).setup(),
                       str(victim), "truncated")
    for path in (cifar, folder, cub):
        assert not any(p.suffix == ".pt" for p in path.iterdir())  # nothing half-written


def test_unreadable_image_stops_or_is_skipped_never_silently(tmp_path):
    root = write_cub(tmp_path / "cub")
    classes = read_class_list(split_files("cub")["test"])
    bad = sorted((root / "CUB_200_2011" / "images" / classes[0]).glob("*.jpg"))[1]
    bad.write_bytes(b"\xff\xd8\xff garbage")
    one_line_error(lambda: cub_dm(root).setup(), f"cannot read image {bad}", "--data.on_bad_image skip")
    assert cached_files(root) == []  # nothing half-written
    with pytest.warns(UserWarning, match=re.escape(f"skipped unreadable image: cannot read image {bad}")):
        pools = cub_dm(root, on_bad_image="skip").build_pools()
    assert pools["test"].counts[0] == 1 and bool((pools["test"].counts[1:] == 2).all())
    assert cached_files(root) == ["cub_16px.pt"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(cub_dm(root, on_bad_image="skip").build_pools()["test"].images, pools["test"].images)
    # a cache built by skipping is not used by a run that stops on bad images: it names the image again
    one_line_error(lambda: cub_dm(root).setup(), f"cannot read image {bad}")


def test_bad_options():
    one_line_error(lambda: CUBDataModule(interpolation="nearest"), "interpolation must be one of", "'nearest'")
    one_line_error(lambda: CUBDataModule(image_size=84, resize_size=80), "resize_size", "80")
    one_line_error(lambda: CUBDataModule(on_bad_image="ignore"), "on_bad_image", "stop, skip")
    one_line_error(lambda: TieredImageNetDataModule(labels="coarse"), "labels must be one of fine, category")
    one_line_error(lambda: TieredImageNetDataModule(pool_device="gpu"), "pool_device")
    one_line_error(lambda: TieredImageNetDataModule(build_workers=-1), "build_workers")
    one_line_error(lambda: CIFARFSDataModule(interpolation="lanczos"), "interpolation")
