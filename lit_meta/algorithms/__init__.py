"""Algorithms: each a LightningModule in its own short file.

Few-shot algorithms extend ``MetaLearner`` (base.py: the hooks; episodic.py: the per-task
computation, vmapped); the learned optimizer ``LearningToLearn`` extends only the shared
plumbing, ``MetaModule`` (meta_module.py).
"""
from lit_meta.algorithms.anil import ANIL
from lit_meta.algorithms.base import MetaLearner
from lit_meta.algorithms.learning_to_learn import LearningToLearn
from lit_meta.algorithms.maml import MAML
from lit_meta.algorithms.mamlpp import MAMLpp
from lit_meta.algorithms.meta_lstm import MetaLSTM
from lit_meta.algorithms.meta_module import MetaModule
from lit_meta.algorithms.metasgd import MetaSGD
from lit_meta.algorithms.reptile import Reptile
from lit_meta.algorithms.transfer import Transfer

__all__ = ["ANIL", "MAML", "MAMLpp", "MetaLearner", "MetaModule", "MetaSGD", "Reptile", "Transfer",
           "LearningToLearn", "MetaLSTM"]
