"""Algorithms: each a LightningModule in its own short file on top of ``MetaLearner``."""
from lit_meta.algorithms.anil import ANIL
from lit_meta.algorithms.base import MetaLearner
from lit_meta.algorithms.l2l_lstm import LearningToLearn
from lit_meta.algorithms.maml import MAML
from lit_meta.algorithms.mamlpp import MAMLpp
from lit_meta.algorithms.meta_lstm import MetaLSTM
from lit_meta.algorithms.metasgd import MetaSGD
from lit_meta.algorithms.reptile import Reptile
from lit_meta.algorithms.transfer import Transfer

__all__ = ["ANIL", "MAML", "MAMLpp", "MetaLearner", "MetaSGD", "Reptile", "Transfer",
           "LearningToLearn", "MetaLSTM"]
