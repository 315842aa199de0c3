from lit_meta.data.base import EpisodicDataModule, derive_seed
from lit_meta.data.sine import SineDataModule
from lit_meta.data.folder import ImageFolderDataModule
from lit_meta.data.miniimagenet import MiniImageNetDataModule
from lit_meta.data.omniglot import OmniglotDataModule

__all__ = ["EpisodicDataModule", "SineDataModule", "derive_seed",
           "ImageFolderDataModule", "MiniImageNetDataModule", "OmniglotDataModule"]
