"""Every DataModule's options reach LightningCLI with their defaults.

The shared options are keyword-only arguments of the base classes, reached from each
dataset's ``__init__`` through ``**kwargs``; jsonargparse finds them by reading the
source. These tests pin the full option set of each DataModule (its own options, the
shared ones, and its per-dataset defaults) as the command line and config files see it,
and that every shared image option (``ImageEpisodicDataModule``'s) reaches every image
DataModule without being restated.
"""
from __future__ import annotations

import pytest
from jsonargparse import ArgumentParser

import inspect

import lit_meta.data as data
from lit_meta.data import EpisodicDataModule, cifar, cub, miniimagenet, tieredimagenet
from lit_meta.data.image_datamodule import ImageEpisodicDataModule
from lit_meta.data.preprocessing import RESIZE
from tests.conftest import REPO

STREAM = {"eval_batch_size": None, "val_tasks": 100, "test_tasks": 600, "steps_per_epoch": 500, "seed": 0,
          "loader_workers": 0}
EPISODES = {"ways": 5, "shots": 1, "queries": 15, "eval_ways": None, "eval_shots": None, "eval_queries": None}
IMAGES = {"image_size": 84, "rotations": False, "cache_dir": None}
IMAGE_PROTOCOL = {"eval_rotations": False, "global_labels": False}  # every image DataModule's
# mean / std null: the dataset's own statistics (test_mean_and_std_default_to_the_datasets_statistics)
NORMALISE = {"interpolation": RESIZE, "mean": None, "std": None}

EXPECTED = {
    "lit_meta.data.OmniglotDataModule": {
        "root": "data/omniglot", "split": "finn", "split_seed": 0, "download": False, **EPISODES, **IMAGES,
        "image_size": 28, "rotations": True, **NORMALISE, **STREAM, **IMAGE_PROTOCOL, "meta_batch_size": 32},
    "lit_meta.data.MiniImageNetDataModule": {
        "root": "data/miniimagenet", "imagenet_root": None, "split_dir": None, **EPISODES, **IMAGES,
        **NORMALISE, "on_bad_image": "stop", **STREAM, **IMAGE_PROTOCOL, "meta_batch_size": 4},
    "lit_meta.data.CIFARFSDataModule": {
        "root": "data/cifar100", "split_dir": None, "download": False, **EPISODES, "image_size": 32,
        **NORMALISE, "cache_dir": None, **STREAM, **IMAGE_PROTOCOL, "meta_batch_size": 4},
    "lit_meta.data.FC100DataModule": {
        "root": "data/cifar100", "split_dir": None, "download": False, **EPISODES, "image_size": 32,
        **NORMALISE, "cache_dir": None, **STREAM, **IMAGE_PROTOCOL, "meta_batch_size": 4},
    "lit_meta.data.CUBDataModule": {
        "root": "data/cub", "split_dir": None, **EPISODES, "image_size": 84, "resize_size": None,
        **NORMALISE, "on_bad_image": "stop", "cache_dir": None, **STREAM, **IMAGE_PROTOCOL, "meta_batch_size": 4},
    "lit_meta.data.TieredImageNetDataModule": {
        "root": "data/tieredimagenet", "imagenet_root": None, "labels": "fine", "split_dir": None, **EPISODES,
        "image_size": 84, **NORMALISE, "on_bad_image": "stop", "pool_device": "auto", "build_workers": 0, "cache_dir": None,
        **STREAM, **IMAGE_PROTOCOL, "meta_batch_size": 4},
    "lit_meta.data.ImageFolderDataModule": {
        "root": "data/folder", "split": "auto", "val_fraction": 0.2, "test_fraction": 0.2, "split_seed": 0,
        **EPISODES, **IMAGES, "channels": 3, "invert": False, **NORMALISE,
        **STREAM, **IMAGE_PROTOCOL, "meta_batch_size": 4},
    "lit_meta.data.SineDataModule": {
        "shots": 10, "queries": None, **STREAM, "meta_batch_size": 25, "eval_batch_size": 100},
    "lit_meta.data.OptimizeeDataModule": {
        "family": None, **STREAM, "meta_batch_size": 128, "val_tasks": 128, "test_tasks": 512},
    "lit_meta.data.learn2learn.Learn2LearnDataModule": {
        "tasksets": None, "train": None, "validation": None, "test": None, "input_shape": None,
        "dataset": "learn2learn", **EPISODES, "queries": 1, **STREAM, "meta_batch_size": 32},
}


def parser() -> ArgumentParser:
    """The data part of ``train.py``'s parser (LightningCLI adds the DataModule this way)."""
    p = ArgumentParser(exit_on_error=False)
    p.add_subclass_arguments(EpisodicDataModule, "data")
    return p


@pytest.mark.parametrize("class_path", sorted(EXPECTED))
def test_each_datamodule_shows_all_its_options_with_their_defaults(class_path):
    init_args = parser().parse_args(["--data", class_path]).data.init_args
    assert dict(init_args) == EXPECTED[class_path]


@pytest.mark.parametrize("class_path", sorted(set(EXPECTED) - {"lit_meta.data.learn2learn.Learn2LearnDataModule"}))
def test_shared_options_given_on_the_command_line_reach_the_datamodule(class_path, tmp_path):
    p = parser()
    args = ["--data", class_path, "--data.init_args.test_tasks", "7", "--data.init_args.seed", "3",
            "--data.init_args.steps_per_epoch", "11"]
    if "root" in EXPECTED[class_path]:
        args += ["--data.init_args.root", str(tmp_path), "--data.init_args.eval_queries", "4"]
    dm = p.instantiate_classes(p.parse_args(args)).data
    assert (dm.test_tasks, dm.seed, dm.steps_per_epoch) == (7, 3, 11)
    assert dm.meta_batch_size == EXPECTED[class_path]["meta_batch_size"]
    if "root" in EXPECTED[class_path]:
        assert dm.episode("test") == (5, 1, 4) and dm.episode("train") == (5, 1, 15)
        assert dm.image_size == EXPECTED[class_path]["image_size"]


def test_a_config_file_sets_shared_and_own_options(tmp_path):
    from lit_meta.cli import MetaCLI

    cli = MetaCLI(args=["--config", str(REPO / "configs" / "omniglot" / "maml_5w1s.yaml"),
                        "--data.root", str(tmp_path), "--data.test_tasks", "9"], run=False)
    dm = cli.datamodule
    # from the file (queries, eval_queries: cbfinn/maml's K per class, steps_per_epoch), the command
    # line, and the model's link
    assert (dm.queries, dm.eval_queries, dm.steps_per_epoch, dm.test_tasks) == (1, 1, 1000, 9)
    assert dm.eval_rotations
    assert dm.meta_batch_size == cli.model.meta_batch_size == 32
    assert (dm.channels, dm.invert, dm.split) == (1, True, "finn")


def test_shared_options_are_keyword_only():
    from lit_meta.data import SineDataModule

    with pytest.raises(TypeError):
        SineDataModule(10, None, 25, 100, 100)  # val_tasks positionally


STATISTICS = {"lit_meta.data.MiniImageNetDataModule": miniimagenet, "lit_meta.data.CIFARFSDataModule": cifar,
              "lit_meta.data.FC100DataModule": cifar, "lit_meta.data.CUBDataModule": cub,
              "lit_meta.data.TieredImageNetDataModule": tieredimagenet}


@pytest.mark.parametrize("class_path", sorted(STATISTICS))
def test_mean_and_std_default_to_the_datasets_statistics(class_path, tmp_path):
    """``mean`` / ``std`` are stated once, on the image base, with null for "the dataset's own":
    each dataset normalises with its statistics unless told otherwise (0 / 1 where it has none)."""
    p = parser()
    dm = p.instantiate_classes(p.parse_args(["--data", class_path, "--data.init_args.root", str(tmp_path)])).data
    module = STATISTICS[class_path]
    assert (dm.mean, dm.std) == (list(module.MEAN), list(module.STD))
    assert (dm.task_spec["mean"], dm.task_spec["std"]) == (list(module.MEAN), list(module.STD))


def test_mean_and_std_default_to_no_normalisation_without_statistics(tmp_path):
    p = parser()
    for path in ("lit_meta.data.ImageFolderDataModule", "lit_meta.data.OmniglotDataModule"):
        dm = p.instantiate_classes(p.parse_args(["--data", path, "--data.init_args.root", str(tmp_path)])).data
        assert (dm.mean, dm.std) == ([0.0] * dm.channels, [1.0] * dm.channels)


# ---------------------------------------------------------------------------- shared image options, stated once
# A value other than the default for each of ImageEpisodicDataModule's options.
SHARED_IMAGE_VALUES = {
    "root": "ROOT", "image_size": 20, "channels": 1, "invert": True, "mean": 0.5, "std": 0.25,
    "interpolation": "area", "split_dir": "SPLITS", "on_bad_image": "skip", "rotations": True,
    "eval_rotations": True, "global_labels": True, "cache_dir": "CACHE"}
# What each image DataModule fixes in its super().__init__ call (so it is not an option of it), and why.
FIXED = {
    data.OmniglotDataModule: {"channels": 1, "invert": True,  # gray, ink = 1
                              "split_dir": None, "on_bad_image": "stop"},  # seeded splits; one-line PNG errors
    data.ImageFolderDataModule: {"split_dir": None, "on_bad_image": "stop"},  # split by folders or seed
    data.MiniImageNetDataModule: {"channels": 3, "invert": False},
    data.CIFARFSDataModule: {"channels": 3, "invert": False, "rotations": False,
                             "on_bad_image": "stop"},  # pickled arrays: no image files to skip
    data.FC100DataModule: {"channels": 3, "invert": False, "rotations": False, "on_bad_image": "stop"},
    data.CUBDataModule: {"channels": 3, "invert": False, "rotations": False},
    data.TieredImageNetDataModule: {"channels": 3, "invert": False, "rotations": False},
}


def shared_image_options() -> dict[str, inspect.Parameter]:
    parameters = inspect.signature(ImageEpisodicDataModule.__init__).parameters
    return {n: p for n, p in parameters.items() if n not in ("self", "kwargs")}


def test_the_shared_image_options_are_listed_here_and_every_image_datamodule_is():
    assert set(SHARED_IMAGE_VALUES) == set(shared_image_options())  # a new shared option must be added here
    exported = {getattr(data, n) for n in data.__all__}
    assert {c for c in exported if isinstance(c, type) and issubclass(c, ImageEpisodicDataModule)} == set(FIXED)


@pytest.mark.parametrize("cls", sorted(FIXED, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_every_image_datamodule_takes_every_shared_image_option_without_restating_it(cls, tmp_path):
    """Each shared image option reaches the DataModule through LightningCLI's parser (jsonargparse
    following ``**kwargs`` into ``ImageEpisodicDataModule``), with a value that lands on the
    instance; it is restated in the dataset's signature only to change its default, and only
    the options the dataset fixes (``FIXED``) are not options of it."""
    shared, fixed = shared_image_options(), FIXED[cls]
    own = inspect.signature(cls.__init__).parameters
    restated = set(own) & set(shared)
    assert all(own[n].default != shared[n].default for n in restated), (cls.__name__, restated)
    class_path = f"{cls.__module__}.{cls.__name__}"
    p = parser()
    options = dict(p.parse_args(["--data", class_path]).data.init_args)
    assert not set(fixed) & set(options), f"{cls.__name__} fixes {sorted(fixed)} but takes {sorted(set(fixed) & set(options))}"
    missing = sorted(set(shared) - set(fixed) - set(options))
    assert not missing, f"{cls.__name__} does not take the shared image option(s) {missing}"
    channels = fixed.get("channels", SHARED_IMAGE_VALUES["channels"])
    paths = {"ROOT": str(tmp_path / "root"), "SPLITS": str(tmp_path / "splits"), "CACHE": str(tmp_path / "cache")}
    values = {n: paths.get(v, v) if isinstance(v, str) else v for n, v in SHARED_IMAGE_VALUES.items()}
    values["mean"], values["std"] = [values["mean"]] * channels, [values["std"]] * channels
    args = ["--data", class_path]
    for name in sorted(set(shared) - set(fixed)):
        args += [f"--data.init_args.{name}", str(values[name]).lower() if isinstance(values[name], bool)
                 else str(values[name])]
    dm = p.instantiate_classes(p.parse_args(args)).data
    for name in shared:
        expected = fixed.get(name, values[name])
        got = getattr(dm, name)
        assert (str(got) if name == "root" else got) == expected, (cls.__name__, name, got, expected)
