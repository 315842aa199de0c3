"""Every DataModule's options reach LightningCLI with their defaults.

The shared options are keyword-only arguments of the base classes, reached from each
dataset's ``__init__`` through ``**kwargs``; jsonargparse finds them by reading the
source. These tests pin the full option set of each DataModule (its own options, the
shared ones, and its per-dataset defaults) as the command line and config files see it.
"""
from __future__ import annotations

import pytest
from jsonargparse import ArgumentParser

from lit_meta.data import EpisodicDataModule, cifar, cub, tieredimagenet
from lit_meta.data.preprocessing import RESIZE
from lit_meta.data.miniimagenet import MEAN, STD
from tests.conftest import REPO

STREAM = {"eval_batch_size": None, "val_tasks": 100, "test_tasks": 600, "steps_per_epoch": 500, "seed": 0,
          "loader_workers": 0}
EPISODES = {"ways": 5, "shots": 1, "queries": 15, "eval_ways": None, "eval_shots": None, "eval_queries": None}
IMAGES = {"image_size": 84, "rotations": False, "cache_dir": None}
IMAGE_PROTOCOL = {"eval_rotations": False, "global_labels": False}  # every image DataModule's

EXPECTED = {
    "lit_meta.data.OmniglotDataModule": {
        "root": "data/omniglot", "split": "finn", "split_seed": 0, "download": False, **EPISODES, **IMAGES,
        "image_size": 28, "rotations": True, **STREAM, **IMAGE_PROTOCOL, "meta_batch_size": 32},
    "lit_meta.data.MiniImageNetDataModule": {
        "root": "data/miniimagenet", "imagenet_root": None, "split_dir": None, **EPISODES, **IMAGES,
        "interpolation": RESIZE, "mean": list(MEAN), "std": list(STD), "on_bad_image": "stop",
        **STREAM, **IMAGE_PROTOCOL, "meta_batch_size": 4},
    "lit_meta.data.CIFARFSDataModule": {
        "root": "data/cifar100", "split_dir": None, "download": False, **EPISODES, "image_size": 32,
        "interpolation": RESIZE, "mean": list(cifar.MEAN), "std": list(cifar.STD), "cache_dir": None,
        **STREAM, **IMAGE_PROTOCOL, "meta_batch_size": 4},
    "lit_meta.data.FC100DataModule": {
        "root": "data/cifar100", "split_dir": None, "download": False, **EPISODES, "image_size": 32,
        "interpolation": RESIZE, "mean": list(cifar.MEAN), "std": list(cifar.STD), "cache_dir": None,
        **STREAM, **IMAGE_PROTOCOL, "meta_batch_size": 4},
    "lit_meta.data.CUBDataModule": {
        "root": "data/cub", "split_dir": None, **EPISODES, "image_size": 84, "resize_size": None,
        "interpolation": RESIZE, "mean": list(cub.MEAN), "std": list(cub.STD), "on_bad_image": "stop",
        "cache_dir": None, **STREAM, **IMAGE_PROTOCOL, "meta_batch_size": 4},
    "lit_meta.data.TieredImageNetDataModule": {
        "root": "data/tieredimagenet", "imagenet_root": None, "labels": "fine", "split_dir": None, **EPISODES,
        "image_size": 84, "interpolation": RESIZE, "mean": list(tieredimagenet.MEAN), "std": list(tieredimagenet.STD),
        "on_bad_image": "stop", "pool_device": "auto", "build_workers": 0, "cache_dir": None,
        **STREAM, **IMAGE_PROTOCOL, "meta_batch_size": 4},
    "lit_meta.data.ImageFolderDataModule": {
        "root": "data/folder", "split": "auto", "val_fraction": 0.2, "test_fraction": 0.2, "split_seed": 0,
        **EPISODES, **IMAGES, "channels": 3, "invert": False, "mean": None, "std": None,
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
