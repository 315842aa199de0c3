from lit_meta.data.base import EpisodicDataModule, derive_seed
from lit_meta.data.sine import SineDataModule
from lit_meta.data.folder import ImageFolderDataModule
from lit_meta.data.miniimagenet import MiniImageNetDataModule
from lit_meta.data.omniglot import OmniglotDataModule
from lit_meta.data.cifar import CIFARFSDataModule, FC100DataModule
from lit_meta.data.cub import CUBDataModule
from lit_meta.data.tieredimagenet import TieredImageNetDataModule
from lit_meta.data.optimizees import MLPClassification, OptimizeeDataModule, OptimizeeFamily, Quadratic

__all__ = ["EpisodicDataModule", "SineDataModule", "derive_seed",
           "ImageFolderDataModule", "MiniImageNetDataModule", "OmniglotDataModule",
           "CIFARFSDataModule", "FC100DataModule", "CUBDataModule", "TieredImageNetDataModule",
           "MLPClassification", "OptimizeeDataModule", "OptimizeeFamily", "Quadratic"]
