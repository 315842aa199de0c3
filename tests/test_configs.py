"""Every config in configs/ parses and takes two training steps on generated data."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.config_files import composed
from tests.conftest import REPO
from tests.image_data_fixtures import mini_arrays, omniglot_arrays, write_mini_pickles, write_omniglot_npz
from tests.source_fixtures import tiered_synsets, write_cifar100, write_cub, write_imagenet

IMAGE_DATASETS = ("omniglot", "miniimagenet", "cifar_fs", "fc100", "cub", "tieredimagenet")


def _param(config: str):
    # The default run covers every sine / learning_to_learn config and every algorithm's 5-way 1-shot
    # image config; the other shot and way counts differ only in numbers (`pytest -m slow`).
    image = config.split("/")[0] in IMAGE_DATASETS
    return pytest.param(config, marks=pytest.mark.slow) if image and "_5w1s" not in config else config


PART_DIRS = ("logger", "trainer", "backbones")  # parts composed after a whole config (tests below)
PARTS = ("data.yaml", "protocol.yaml")  # data.yaml: composed after a whole config; protocol.yaml: under one
CONFIGS = [
    _param(p.relative_to(REPO / "configs").as_posix())
    for p in sorted((REPO / "configs").rglob("*.yaml"))
    if p.parent.name not in PART_DIRS and p.name not in PARTS
]
DATA_PARTS = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").glob("*/data.yaml"))


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("config-data")
    # 330 characters: enough for 20-way episodes in every split of the Finn proportions.
    omniglot = write_omniglot_npz(base / "omniglot", omniglot_arrays(background=200, evaluation=130, drawers=20))
    # 16 training classes: R2-D2's miniImageNet config trains on 16-way episodes
    mini = write_mini_pickles(base / "mini", mini_arrays(classes={"train": 16, "val": 5, "test": 5},
                                                         per_class=20, size=84))
    # 6 images of each class: the 5-shot configs draw 5 support + 1 query images per class
    sources = {"cifar": write_cifar100(base / "sources" / "cifar", train=5, test=1),
               "cub": write_cub(base / "sources" / "cub", per_class=6),
               "imagenet": write_imagenet(base / "sources" / "imagenet", tiered_synsets(6))}
    return {"omniglot": omniglot, "miniimagenet": mini, "cache": base / "cache", "cifar_fs": sources["cifar"],
            "fc100": sources["cifar"], "cub": sources["cub"], "tieredimagenet": base / "tiered",
            "imagenet": sources["imagenet"]}


def data_args(dataset: str, roots: dict[str, Path]) -> list[str]:
    if dataset not in IMAGE_DATASETS:
        return []
    # one query per class: the original-source miniatures hold 2-4 images per class, and the
    # papers' 15 queries would make the second-order 84x84 configs take half a minute a step here
    args = ["--data.root", str(roots[dataset]), "--data.cache_dir", str(roots["cache"]),
            "--data.queries", "1", "--data.eval_queries", "1"]
    return args + (["--data.imagenet_root", str(roots["imagenet"])] if dataset == "tieredimagenet" else [])


def narrow_resnet12(config: str, channels: tuple[int, ...] = (8, 8, 8, 8)) -> list[str]:
    """ResNet-12 at 84x84 takes about a minute a step on 2 cores: the default tier runs its configs
    with the config's own backbone options but ``channels`` narrowed (one full-width step: slow tier)."""
    init = composed(REPO / "configs" / config).get("model", {}).get("init_args", {})
    if init.get("backbone") != "resnet12":
        return []
    return ["--model.init_args.backbone_kwargs", json.dumps({**init.get("backbone_kwargs", {}), "channels": list(channels)})]


@pytest.mark.parametrize("config", CONFIGS)
def test_config_takes_two_training_steps(config, roots, tmp_path, monkeypatch):
    from lit_meta.cli import MetaCLI

    monkeypatch.chdir(tmp_path)
    # two tasks per step, whatever the paper's meta-batch (linked into the data, as a user's flag is)
    args = ["--config", str(REPO / "configs" / config), *data_args(config.split("/")[0], roots),
            "--model.init_args.meta_batch_size", "2", *narrow_resnet12(config)]
    cli = MetaCLI(args=args, run=False)
    model, dm = cli.model, cli.datamodule
    assert model.meta_batch_size == dm.meta_batch_size == 2
    dm.setup("fit")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(2):
        model.outer_update(dm.train_batch(step))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, f"{config}: no parameter moved"
    assert all(math.isfinite(p.detach().abs().sum().item()) for p in model.parameters())


@pytest.mark.slow
def test_a_resnet12_config_takes_a_step_at_full_width(roots, tmp_path, monkeypatch):
    from lit_meta.cli import MetaCLI

    monkeypatch.chdir(tmp_path)
    config = "miniimagenet/protonet_resnet12_5w1s.yaml"
    cli = MetaCLI(args=["--config", str(REPO / "configs" / config), *data_args("miniimagenet", roots),
                        "--model.init_args.meta_batch_size", "1"], run=False)
    model, dm = cli.model, cli.datamodule
    assert sum(p.numel() for p in model.net.parameters()) == 12_427_525 - 5 * 641  # headless: no 5-way head
    dm.setup("fit")
    before = [p.detach().clone() for p in model.parameters()]
    model.outer_update(dm.train_batch(0))
    assert all(math.isfinite(p.detach().abs().sum().item()) for p in model.parameters())
    assert any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("part", DATA_PARTS)
def test_data_part_composes_with_an_algorithm_config(part, roots, tmp_path, monkeypatch):
    """``--config <algorithm config> --config configs/<dataset>/data.yaml``: the dataset's class and
    source, the algorithm config's model and episode sizes (LightningCLI carries over the options the
    new data class shares)."""
    from lit_meta.cli import MetaCLI

    monkeypatch.chdir(tmp_path)
    dataset = part.split("/")[0]
    # reptile_5w1s.yaml trains on 15 shots per class (the Reptile paper's); the miniatures have 2-4 images a class
    cli = MetaCLI(args=["--config", str(REPO / "configs" / "miniimagenet" / "reptile_5w1s.yaml"),
                        "--config", str(REPO / "configs" / part), *data_args(dataset, roots), "--data.shots", "1"],
                  run=False)
    model, dm = cli.model, cli.datamodule
    assert dm.name == dataset and model.task_spec["dataset"] == dataset and model.algorithm == "reptile"
    # from reptile_5w1s.yaml and the miniImageNet protocol.yaml it builds on
    assert (dm.ways, dm.eval_shots, dm.eval_batch_size, dm.val_tasks) == (5, 1, 10, 600)
    model.meta_batch_size = dm.meta_batch_size = 2
    dm.setup("fit")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.outer_update(dm.train_batch(0))
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_backbone_part_puts_resnet12_under_an_algorithm_config_and_keeps_the_rest(tmp_path, monkeypatch):
    """``--config <algorithm config> --config configs/backbones/resnet12.yaml``: the algorithm and its
    inner loop from the first, ResNet-12 (64-160-320-640, DropBlock) with none of conv4's options left."""
    from lit_meta.cli import MetaCLI
    from lit_meta.models.resnet12 import ResNet12

    monkeypatch.chdir(tmp_path)
    alone = MetaCLI(args=["--config", str(REPO / "configs" / "miniimagenet" / "maml_5w1s.yaml"),
                          "--data.root", str(tmp_path / "not_read")], run=False).model
    cli = MetaCLI(args=["--config", str(REPO / "configs" / "miniimagenet" / "maml_5w1s.yaml"),
                        "--config", str(REPO / "configs" / "backbones" / "resnet12.yaml"),
                        "--data.root", str(tmp_path / "not_read")], run=False)
    model = cli.model
    assert type(model) is type(alone) and model.algorithm == "maml"
    assert isinstance(model.net, ResNet12)
    assert model.hparams.backbone_kwargs == {"channels": [64, 160, 320, 640], "drop_rate": 0.1,
                                             "drop_block_size": 5, "head_pool": "mean"}
    assert sum(p.numel() for p in model.net.parameters()) == 12_427_525  # 5-way head (docs/RESULTS.md, ResNet-12 row)
    for key in ("inner_steps", "inner_lr", "first_order", "meta_batch_size", "eval_inner_steps"):
        assert model.hparams[key] == alone.hparams[key], key


ALL_CONFIGS = [p.relative_to(REPO / "configs").as_posix() for p in sorted((REPO / "configs").rglob("*.yaml"))
               if p.parent.name not in PART_DIRS and p.name not in PARTS]
GENERATED = ("sine", "learning_to_learn")  # data drawn in memory: cheap enough to draw every task


def as_rank(dm, rank: int, world: int) -> None:
    """Make ``dm`` see what DDP rank ``rank`` of ``world`` sees of its Trainer (all its loaders read)."""
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, global_step=0,
                                 strategy=SimpleNamespace(root_device=torch.device("cpu")))


def _tasks_of(batches) -> torch.Tensor:
    return torch.cat([b.support_x.reshape(b.num_tasks, -1) for b in batches])


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_every_rank_of_2_and_3_gets_work_and_evaluation_covers_each_task_once(config, tmp_path, monkeypatch):
    """Every shipped config under 2 and 3 simulated DDP ranks. Image configs: built with their data
    setup skipped (no source is read), so the loaders' lengths and the evaluation chunk arithmetic
    are checked; sine and learning_to_learn: every training share and evaluation task is drawn and
    compared with what one process draws."""
    from lit_meta.cli import MetaCLI, check_world_size

    from lit_meta.data.image_datamodule import ImageEpisodicDataModule

    monkeypatch.chdir(tmp_path)
    # the transfer configs' global labels size the head by the training classes, which only the
    # source can tell: a stand-in count, so that no source is read
    monkeypatch.setattr(ImageEpisodicDataModule, "num_classes", lambda self, split: 64)
    dataset = config.split("/")[0]
    data = [] if dataset in GENERATED else ["--data.root", str(tmp_path / "not_read")]
    cli = MetaCLI(args=["--config", str(REPO / "configs" / config), *data,
                        "--trainer.default_root_dir", str(tmp_path / "root")], run=False)
    assert Path(cli.trainer.logger.save_dir) == tmp_path / "root" / "logs"  # the config pins no log folder
    dm = cli.datamodule
    generated = dataset in GENERATED
    single = {split: _tasks_of([dm.eval_batch(split, c) for c in range(len(dm.eval_chunks(split)))])
              for split in ("val", "test")} if generated else {}
    for world in (2, 3):
        divisible = dm.meta_batch_size % world == 0
        if not divisible:  # refused before any process starts (tests/test_distributed.py runs it through train.py)
            with pytest.raises(ValueError, match=f"meta_batch_size={dm.meta_batch_size} is not divisible by the {world}"):
                check_world_size(SimpleNamespace(world_size=world), dm)
        for split in ("val", "test"):
            sizes = dm.eval_chunks(split)
            assert sum(sizes) == (dm.val_tasks if split == "val" else dm.test_tasks)
            seen: Counter = Counter()
            drawn = []
            for rank in range(world):
                as_rank(dm, rank, world)
                pieces = dm.eval_pieces(split, rank, world)
                assert pieces, f"{config}: rank {rank} of {world} has no {split} task"
                loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
                assert len(loader) == len(pieces)
                for chunk, start, stop in pieces:
                    assert 0 <= start < stop <= sizes[chunk]
                    seen.update((chunk, i) for i in range(start, stop))
                if generated:
                    drawn += list(loader)
            assert seen == Counter({(c, i): 1 for c, n in enumerate(sizes) for i in range(n)}), (config, split, world)
            if generated:
                assert torch.equal(_tasks_of(drawn), single[split])
        for rank in range(world):
            as_rank(dm, rank, world)
            assert len(dm.train_dataloader()) == dm.steps_per_epoch >= 1
            if generated and divisible:
                share = next(iter(dm.train_dataloader()))
                dm.trainer = None
                whole = dm.train_batch(0)
                size = dm.meta_batch_size // world
                assert share.num_tasks == size >= 1
                assert torch.equal(share.support_x, whole.support_x[rank * size:(rank + 1) * size])


def test_ddp_part_instantiates_a_ddp_trainer_on_cpu(tmp_path, monkeypatch):
    from pytorch_lightning.strategies import DDPStrategy

    from lit_meta.cli import MetaCLI

    monkeypatch.chdir(tmp_path)
    cli = MetaCLI(args=["--config", str(REPO / "configs" / "sine" / "maml.yaml"),
                        "--config", str(REPO / "configs" / "trainer" / "ddp.yaml"),
                        "--trainer.accelerator", "cpu", "--trainer.devices", "2"], run=False)
    strategy = cli.trainer.strategy
    assert type(strategy) is DDPStrategy and strategy._ddp_kwargs["find_unused_parameters"] is False
    assert cli.trainer.world_size == 2 and cli.trainer.num_devices == 2
    assert type(strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"  # the CLI's default plugin kept


def test_slurm_part_instantiates_a_requeueing_multi_node_trainer_in_a_slurm_job(tmp_path, monkeypatch):
    """configs/trainer/slurm.yaml as rank 5 of a 2 nodes x 4 tasks job (CPU devices stand in for
    the GPUs), and scripts/slurm_example.sh asks SLURM for the same layout and the SIGUSR1."""
    import re

    from pytorch_lightning.plugins.environments import SLURMEnvironment
    from pytorch_lightning.strategies import DDPStrategy

    from lit_meta.cli import MetaCLI

    from lightning_fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    # the Trainer makes this process rank 5 for Lightning's rank_zero_only; restored afterwards,
    # or later tests' loggers (W&B) would stay silent as a non-zero rank
    for function in (rank_zero_only, fabric_rank_zero_only):
        monkeypatch.setattr(function, "rank", getattr(function, "rank", 0), raising=False)
    monkeypatch.chdir(tmp_path)
    for key, value in {"SLURM_JOB_ID": "777", "SLURM_JOB_NAME": "lit_meta_maml", "SLURM_NTASKS": "8",
                       "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2", "SLURM_NODELIST": "node[1-2]",
                       "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}.items():
        monkeypatch.setenv(key, value)
    cli = MetaCLI(args=["--config", str(REPO / "configs" / "omniglot" / "maml_5w1s.yaml"),
                        "--config", str(REPO / "configs" / "trainer" / "slurm.yaml"),
                        "--trainer.accelerator", "cpu", "--data.root", str(tmp_path / "not_read")], run=False)
    trainer = cli.trainer
    assert type(trainer.strategy) is DDPStrategy
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 4, 8)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank) == (5, 1, 1)
    assert type(trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"
    assert trainer.logger.version == "slurm_777"  # a requeued job writes to the same run directory
    assert cli.datamodule.meta_batch_size % trainer.world_size == 0

    script = (REPO / "scripts" / "slurm_example.sh").read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script, re.M))
    assert (sbatch["nodes"], sbatch["ntasks-per-node"], sbatch["signal"]) == ("2", "4", "SIGUSR1@90")
    assert "--trainer.num_nodes 2 --trainer.devices 4" in script and "configs/trainer/slurm.yaml" in script
    assert "--requeue" in script
