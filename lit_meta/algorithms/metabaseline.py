"""Meta-Baseline (Chen, Liu, Xu, Darrell & Wang 2021, "Meta-Baseline: Exploring Simple
Meta-Learning for Few-Shot Learning").

Two stages, each a fit of its own (so each resumes exactly like any fit):

1. Classifier-Baseline: a classifier over all training classes (64 on miniImageNet), trained
   on the training images with their global labels: the transfer baseline's pre-training
   (``lit_meta.algorithms.Transfer`` with the DataModule's ``global_labels``;
   configs/miniimagenet/metabaseline_resnet12_pretrain.yaml).
2. Meta-Baseline: the classifier's encoder (its ``net`` body, without any head) meta-trained
   on episodes with a cosine nearest-centroid head and a learned temperature τ (init 10):
   ProtoNet with ``distance: cosine`` (protonet.py), started from ``init_from``, the
   stage-1 checkpoint. Meta-testing the stage-2 model at step 0 is Classifier-Baseline's
   own evaluation (cosine nearest centroid on the pre-trained encoder).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lit_meta.algorithms.protonet import ProtoNet
from lit_meta.checkpoint import read_checkpoint


class MetaBaseline(ProtoNet):
    algorithm = "metabaseline"

    def __init__(self, init_from: str | None = None, distance: str = "cosine", **kwargs: Any) -> None:
        super().__init__(distance=distance, **kwargs)
        self.init_from = init_from
        if init_from is not None:
            self.load_encoder(init_from)

    def load_encoder(self, path: str) -> None:
        """The encoder weights of a classifier checkpoint (``net.*``, its heads left out)."""
        state = read_checkpoint(path).get("state_dict", {})
        own = self.net.state_dict()
        found = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")
                 and k.removeprefix("net.") in own}
        missing = sorted(set(own) - set(found))
        if missing:
            raise ValueError(f"init_from {Path(path)} has no encoder weights {missing[:3]} for this backbone: it must "
                             "be a checkpoint of the classifier stage with the same backbone and image size")
        for name, value in found.items():
            if value.shape != own[name].shape:
                raise ValueError(f"init_from {Path(path)}: net.{name} has shape {list(value.shape)}, this encoder's is "
                                 f"{list(own[name].shape)}: the backbone options differ from the classifier's")
        with torch.no_grad():
            self.net.load_state_dict(found)
