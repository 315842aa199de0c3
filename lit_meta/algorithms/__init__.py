"""Algorithms: each a LightningModule in its own short file.

Few-shot algorithms extend ``MetaLearner`` (base.py: the options and hooks; the per-episode
computation is lit_meta/episode.py); the metric and closed-form heads extend its
``EmbeddingLearner`` (embedding.py); the learned optimizer ``LearningToLearn`` extends only
the shared plumbing, ``MetaModule`` (meta_module.py).
"""
from lit_meta.algorithms.anil import ANIL
from lit_meta.algorithms.base import MetaLearner
from lit_meta.algorithms.boil import BOIL
from lit_meta.algorithms.embedding import EmbeddingLearner
from lit_meta.algorithms.imaml import IMAML
from lit_meta.algorithms.learning_to_learn import LearningToLearn
from lit_meta.algorithms.maml import MAML
from lit_meta.algorithms.mamlpp import MAMLpp
from lit_meta.algorithms.meta_lstm import MetaLSTM
from lit_meta.algorithms.meta_module import MetaModule
from lit_meta.algorithms.metabaseline import MetaBaseline
from lit_meta.algorithms.metasgd import MetaSGD
from lit_meta.algorithms.protonet import ProtoNet
from lit_meta.algorithms.r2d2 import R2D2
from lit_meta.algorithms.reptile import Reptile
from lit_meta.algorithms.transfer import Transfer

__all__ = ["ANIL", "BOIL", "IMAML", "MAML", "MAMLpp", "MetaBaseline", "MetaLearner", "MetaModule", "MetaSGD",
           "ProtoNet", "R2D2", "Reptile", "Transfer", "EmbeddingLearner", "LearningToLearn", "MetaLSTM"]
