"""The data path on a GPU, proven on the CPU.

- Episodes built on the pool's device (one gather, rotations as a gather, device-filled
  normalisation constants) are exactly the episodes a per-image loop on the host draws
  from the same generator.
- With the pool on the ``meta`` device (a stand-in for a GPU: it has no values), sampling
  reads no device value on the host and issues no blocking host-to-device copy.
- A training step converts no tensor to a Python value (``lit_meta.sync_guard``), for
  every algorithm, on logging steps too.
- DataLoader workers (``loader_workers``) yield the same meta-batches as in-process
  sampling, in step order, from a mid-epoch start too.
"""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from lit_meta.algorithms import ANIL, MAML, MAMLpp, MetaSGD, Reptile
from lit_meta.data import OmniglotDataModule
from lit_meta.data.base import EpisodicDataModule
from lit_meta.data.class_pools import ClassPool, sample_episodes
from lit_meta.data.sine import SineDataModule
from lit_meta.sync_guard import HostSyncError, guard_training_steps, no_host_sync
from lit_meta.tasks import TaskBatch
from tests.image_data_fixtures import omniglot_arrays, write_omniglot_npz

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def pool_of(classes: int = 7, per_class: int = 5, channels: int = 3, size: int = 6, rotations: bool = True,
            counts: list[int] | None = None) -> ClassPool:
    counts = counts or [per_class] * classes
    images = torch.randint(0, 256, (sum(counts), channels, size, size), generator=torch.Generator().manual_seed(1),
                           dtype=torch.uint8)
    return ClassPool(images, torch.tensor(counts), [f"c{k}" for k in range(len(counts))], rotations)


def host_reference(pool: ClassPool, generator: torch.Generator, tasks: int, ways: int, shots: int, queries: int,
                   mean: list[float], std: list[float]) -> TaskBatch:
    """The same draws as ``sample_episodes``, then one image at a time on the host."""
    base_classes = len(pool.counts)
    classes = torch.rand(tasks, pool.num_classes, generator=generator).topk(ways, dim=1).indices
    counts = pool.counts[classes % base_classes]
    keys = torch.rand(tasks, ways, int(counts.max()), generator=generator)
    support, query = [], []
    for t in range(tasks):
        s_images, q_images = [], []
        for w in range(ways):
            k = int(classes[t, w])
            base, turns = k % base_classes, k // base_classes
            count = int(pool.counts[base])
            items = keys[t, w, :count].topk(shots + queries).indices
            for n, item in enumerate(items.tolist()):
                image = pool.images[int(pool.offsets[base]) + item]
                image = torch.rot90(image, turns, dims=(-2, -1)).float() / 255
                image = (image - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
                (s_images if n < shots else q_images).append(image)
        support.append(torch.stack(s_images))
        query.append(torch.stack(q_images))
    labels = torch.arange(ways)
    return TaskBatch(torch.stack(support), labels.repeat_interleave(shots).repeat(tasks, 1),
                     torch.stack(query), labels.repeat_interleave(queries).repeat(tasks, 1))


def assert_same(a: TaskBatch, b: TaskBatch) -> None:
    for name in ("support_x", "support_y", "query_x", "query_y"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert torch.equal(x, y), name


@pytest.mark.parametrize("rotations", [False, True])
def test_device_sampling_draws_exactly_the_host_loop_episodes(rotations):
    pool = pool_of(rotations=rotations, counts=[5, 7, 4, 6, 5, 8, 4])  # unequal classes: masked keys
    for seed in range(3):
        device = sample_episodes(pool, torch.Generator().manual_seed(seed), 16, 4, 2, 2, MEAN, STD)
        host = host_reference(pool, torch.Generator().manual_seed(seed), 16, 4, 2, 2, MEAN, STD)
        assert_same(device, host)


def test_sampling_on_a_device_reads_no_value_and_copies_nothing_blocking():
    """The ``meta`` device has no values: any host read of a device tensor, and (guard)
    any blocking host-to-device copy, fails. Host-side index draws are allowed."""
    pool = pool_of(rotations=True)
    on_device = ClassPool(pool.images.to("meta"), pool.counts, pool.names, rotations=True)
    with no_host_sync(strict=False):
        batch = sample_episodes(on_device, torch.Generator().manual_seed(0), 8, 5, 1, 3, MEAN, STD)
    assert batch.query_x.device.type == "meta" and batch.query_x.shape == (8, 15, 3, 6, 6)
    assert batch.support_y.device.type == "meta"


def test_the_guard_catches_what_would_sync_a_gpu():
    x = torch.ones(3, device="meta")
    host = torch.ones(3)
    for sync in (lambda: x.sum().item(), lambda: bool(x.sum()), lambda: x.tolist(), lambda: x.cpu(),
                 lambda: host.to("meta"), lambda: torch.tensor([1.0, 2.0], device="meta")):
        with pytest.raises(HostSyncError), no_host_sync(strict=False):
            sync()
    with no_host_sync(strict=False):
        host.sum().item()  # a host tensor's value is not a device sync
        host.to("meta", non_blocking=True)
    with pytest.raises(HostSyncError, match="item"), no_host_sync():  # strict: CPU tensors stand for the device
        host.sum().item()


def test_pixels_are_the_same_bits_on_any_device():
    """x/255 of every gray level: CUDA divides by a host (Python) scalar as a multiply by its
    reciprocal, which is one ulp off for about half the levels; ``normalize`` divides by a 0-dim
    tensor on the images' device, which both devices divide exactly (IEEE division)."""
    from torch.overrides import TorchFunctionMode

    from lit_meta.data.preprocessing import normalize

    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    exact = levels.float() / torch.tensor(255.0)
    reciprocal = levels.float() * (1 / torch.tensor(255.0))  # what CUDA computes for x / 255
    assert (reciprocal != exact).sum() > 100  # why a Python divisor would not do
    assert torch.equal(normalize(levels, [0.0], [1.0]), exact)

    divisors = []

    class Divisions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.div_, torch.Tensor.div, torch.Tensor.__truediv__, torch.div):
                divisors.append(args[1])
            return func(*args, **(kwargs or {}))

    with Divisions():
        normalize(levels.to("meta"), [0.5], [0.25])
    assert divisors and all(isinstance(d, torch.Tensor) and d.device.type == "meta" for d in divisors)


# ---------------------------------------------------------------------------- training steps
@pytest.fixture(scope="module")
def omni_npz(tmp_path_factory):
    return write_omniglot_npz(tmp_path_factory.mktemp("omni_npz"), omniglot_arrays())


def tiny_omniglot(root, tmp_path, **kwargs) -> OmniglotDataModule:
    kwargs = {"ways": 3, "shots": 1, "queries": 2, "image_size": 14, "cache_dir": str(tmp_path / "cache"),
              "meta_batch_size": 4, "val_tasks": 4, "test_tasks": 4, "steps_per_epoch": 3, **kwargs}
    return OmniglotDataModule(root=str(root), **kwargs)


ALGORITHMS = {
    "maml": (MAML, {"inner_steps": 2}),
    "fomaml": (MAML, {"first_order": True}),
    "maml_ga_clip_cosine_chunked": (MAML, {"weighting": "gradient_agreement", "grad_clip": 1.0,
                                           "lr_schedule": "cosine", "task_chunk_size": 2}),
    "reptile": (Reptile, {"inner_steps": 2, "lr_schedule": "linear"}),
    "metasgd": (MetaSGD, {}),
    "mamlpp": (MAMLpp, {"inner_steps": 2, "bnwb": True, "bnrs": True, "msl_epochs": 1, "lr_schedule": "cosine"}),
    "anil": (ANIL, {}),
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_training_steps_convert_no_tensor_to_a_python_value(name, omni_npz, tmp_path):
    """Every step is a logging step (log_every_n_steps=1, progress bar on), so the logging
    code runs inside the guard too."""
    cls, kwargs = ALGORITHMS[name]
    dm = tiny_omniglot(omni_npz, tmp_path)
    model = cls(task_spec=dm.task_spec, backbone_kwargs={"filters": 4}, meta_batch_size=4, **kwargs)
    guard_training_steps(model)
    trainer = pl.Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=True, log_every_n_steps=1, inference_mode=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4


@pytest.mark.parametrize("bar", [False, True])
def test_logged_training_values_are_read_once_on_their_logging_step(bar, monkeypatch, tmp_path):
    """Lightning turns every prog_bar value into a number at each batch end while it stays
    logged: a device tensor logged on step 4 was read on steps 5, 6, 7 too (a sync a step on a
    GPU). Without a bar no value is logged for one (Lightning converts none); with one, the bar
    shows the logging step's values (host copies: that they are copies is seen on a GPU only)."""
    from pytorch_lightning.trainer.connectors.logger_connector import result

    converted: list[tuple[int, list[torch.Tensor]]] = []
    original = result.convert_tensors_to_scalars

    def spy(value):
        converted.append((trainer.global_step, [value] if isinstance(value, torch.Tensor) else []))
        return original(value)

    monkeypatch.setattr(result, "convert_tensors_to_scalars", spy)
    dm = SineDataModule(meta_batch_size=4)
    model = MAML(task_spec=dm.task_spec)
    logged: dict[int, float] = {}
    step = model.outer_update

    def outer_update(batch, ctx=None):
        out = step(batch, ctx)
        logged[trainer.global_step] = float(out["final_query_loss"].mean())
        return out

    model.outer_update = outer_update
    trainer = pl.Trainer(max_steps=8, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=bar, log_every_n_steps=5, inference_mode=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    if not bar:
        assert converted == []
        assert trainer.callback_metrics["train/mse"].item() == pytest.approx(logged[5], rel=1e-6)
    else:
        assert converted and all(t.device.type == "cpu" and t.grad_fn is None for _, ts in converted for t in ts)
        assert trainer.progress_bar_metrics["train/mse"] == pytest.approx(logged[5], rel=1e-6)


def test_a_training_step_that_reads_a_value_is_caught(tmp_path):
    dm = SineDataModule(meta_batch_size=4)
    model = MAML(task_spec=dm.task_spec)
    update = model.outer_update
    model.outer_update = lambda batch, ctx=None: {**(out := update(batch, ctx)), "loss": out["query_loss"].mean().item()}
    guard_training_steps(model)
    trainer = pl.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, inference_mode=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    with pytest.raises(HostSyncError, match="item"):
        trainer.fit(model, datamodule=dm)


# ---------------------------------------------------------------------------- DataLoader workers
class _AtStep:
    """The two trainer attributes the stream reads."""

    def __init__(self, step: int) -> None:
        self.global_step, self.global_rank, self.world_size = step, 0, 1
        self.strategy = type("S", (), {"root_device": torch.device("cpu")})()


@pytest.mark.parametrize("start", [0, 5])
def test_loader_workers_yield_the_in_process_meta_batches_in_step_order(omni_npz, tmp_path, start):
    """steps_per_epoch=7 with 3 workers: uneven shares; start=5 is a mid-epoch resume."""
    dm = tiny_omniglot(omni_npz, tmp_path, steps_per_epoch=7)
    dm.setup()
    dm.loader_workers = 3
    dm.trainer = _AtStep(start)
    loader = dm.train_dataloader()
    assert loader.num_workers == 3
    got = list(loader)
    expected_steps = list(range(start, 7))
    assert len(got) == len(expected_steps)
    for step, batch in zip(expected_steps, got):
        assert_same(batch, dm.train_batch(step))


def test_loader_workers_fit_equals_in_process_fit(omni_npz, tmp_path):
    def fit(workers: int) -> dict[str, torch.Tensor]:
        pl.seed_everything(0)
        dm = tiny_omniglot(omni_npz, tmp_path, steps_per_epoch=3)
        dm.loader_workers = workers
        model = MAML(task_spec=dm.task_spec, backbone_kwargs={"filters": 4}, meta_batch_size=4, first_order=True)
        pl.Trainer(max_steps=5, limit_val_batches=0, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, inference_mode=False, enable_model_summary=False,
                   default_root_dir=tmp_path).fit(model, datamodule=dm)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    in_process, workers = fit(0), fit(2)
    for name in in_process:
        assert torch.equal(in_process[name], workers[name]), name


def test_loader_workers_option_is_checked():
    with pytest.raises(ValueError, match="loader_workers must be an integer >= 0, got -1"):
        EpisodicDataModule(loader_workers=-1)



# ---------------------------------------------------------------------------- on CUDA (pytest -m gpu)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rotations", [False, True])
def test_cuda_sampling_makes_no_host_sync_and_draws_the_cpu_episodes(rotations):
    from lit_meta.sync_guard import cuda_sync_errors

    pool = pool_of(rotations=rotations, counts=[5, 7, 4, 6, 5, 8, 4])
    on_gpu = pool.to("cuda")
    with cuda_sync_errors():
        gpu = sample_episodes(on_gpu, torch.Generator().manual_seed(3), 16, 4, 2, 2, MEAN, STD)
    assert gpu.query_x.is_cuda
    assert_same(gpu.to("cpu"), sample_episodes(pool, torch.Generator().manual_seed(3), 16, 4, 2, 2, MEAN, STD))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ["maml", "reptile", "mamlpp"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_cuda_training_steps_make_no_host_sync(name, precision, omni_npz, tmp_path):
    """Sampling and training_step under torch.cuda.set_sync_debug_mode("error"). Not on
    logging steps (log_every_n_steps): there Lightning's ``self.log`` builds its
    accumulators and the logger reads the values, by design once per logging interval;
    our own logging code reads no value (the CPU test above logs every step)."""
    from lit_meta.sync_guard import cuda_sync_errors

    cls, kwargs = ALGORITHMS[name]
    dm = tiny_omniglot(omni_npz, tmp_path)
    model = cls(task_spec=dm.task_spec, backbone_kwargs={"filters": 4}, meta_batch_size=4, **kwargs)
    sample = dm.train_batch

    def guarded_sample(step: int) -> TaskBatch:
        with cuda_sync_errors():
            return sample(step)

    dm.train_batch = guarded_sample
    guard_training_steps(model, strict=False, cuda=True)
    trainer = pl.Trainer(accelerator="cuda", devices=1, precision=precision, max_steps=4, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, log_every_n_steps=50,
                         inference_mode=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4 and dm.pools["train"].images.is_cuda


@pytest.mark.gpu
@needs_cuda
def test_loader_workers_on_cuda_pin_and_equal_in_process(omni_npz, tmp_path):
    dm = tiny_omniglot(omni_npz, tmp_path, steps_per_epoch=4)
    dm.setup()
    dm.loader_workers = 2
    dm.trainer = _AtStep(0)
    dm.trainer.strategy.root_device = torch.device("cuda")
    batches = list(dm.train_dataloader())
    assert all(b.query_x.is_pinned() for b in batches)
    for step, batch in enumerate(batches):
        assert_same(batch.to("cuda").to("cpu"), dm.train_batch(step))


def test_every_batch_says_where_its_tasks_come_from():
    """The origin a model reads instead of the DataModule or the Trainer: split, step, global index
    of the first task (per DDP rank and evaluation piece), seed and the stream's epoch."""
    from lit_meta.tasks import Origin

    dm = SineDataModule(meta_batch_size=4, eval_batch_size=3, val_tasks=7, steps_per_epoch=5, seed=11)
    assert dm.train_batch(12).origin == Origin("train", 12, 0, 11, 2)
    dm.trainer = _AtStep(12)
    dm.trainer.global_rank, dm.trainer.world_size = 1, 2
    assert dm.train_batch(12).origin == Origin("train", 12, 2, 11, 2)  # rank 1's half
    pieces = dm.eval_pieces("val", 1, 2)  # tasks 3..6: the whole second chunk, the first task of the third
    firsts = [dm.eval_piece("val", *piece).origin.first_task for piece in pieces]
    assert firsts == [3, 6] and dm.eval_piece("val", *pieces[0]).origin.split == "val"
    batch = dm.eval_batch("val", 1)
    moved = batch.slice(1, 3).to("cpu").pin_memory()
    assert moved.origin == Origin("val", 0, 4, 11) and moved.num_tasks == 2
