"""lit_meta.bench.graphed_step: the static-buffer meta-step that gpu_check captures as a CUDA
graph. Capture itself needs CUDA (the GPU check measures it); here the same step, uncaptured,
must be the model's own meta-step, and each call must read the batch it is given."""
from __future__ import annotations

import pytest
import torch

from lit_meta.algorithms import MAML
from lit_meta.bench.graphed_step import GraphedStep
from lit_meta.data.sine import SineDataModule


def test_the_static_step_is_the_models_own_meta_step_on_each_new_batch(one_thread):
    dm = SineDataModule(meta_batch_size=4)
    batches = [dm.train_batch(step) for step in range(3)]
    torch.manual_seed(0)
    reference = MAML(task_spec=dm.task_spec, meta_batch_size=4, inner_steps=2)
    torch.manual_seed(0)
    model = MAML(task_spec=dm.task_spec, meta_batch_size=4, inner_steps=2)
    step = GraphedStep(model, batches[0], capture=False)
    for batch in batches:  # second order, a fresh batch each call (copied into the static buffers)
        reference.outer_update(batch)
        step(batch)
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(batches[0].support_x, batches[2].support_x)  # the batches differ


def test_capture_off_cuda_is_a_one_line_error():
    dm = SineDataModule(meta_batch_size=2)
    model = MAML(task_spec=dm.task_spec, meta_batch_size=2)
    with pytest.raises(ValueError, match="capture needs the batch and the model on a CUDA device"):
        GraphedStep(model, dm.train_batch(0), capture=True)


def test_a_step_it_would_not_capture_faithfully_is_refused_by_name():
    dm = SineDataModule(meta_batch_size=4)
    chunked = MAML(task_spec=dm.task_spec, meta_batch_size=4, task_chunk_size=2)
    with pytest.raises(ValueError, match="task_chunk_size=2"):
        GraphedStep(chunked, dm.train_batch(0), capture=False)
    sgd = MAML(task_spec=dm.task_spec, meta_batch_size=4, meta_optimizer="sgd")
    with pytest.raises(ValueError, match="meta_optimizer 'sgd'"):
        GraphedStep(sgd, dm.train_batch(0), capture=False)
