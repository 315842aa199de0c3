from lit_meta.data.base import EpisodicDataModule, derive_seed
from lit_meta.data.sine import SineDataModule

__all__ = ["EpisodicDataModule", "SineDataModule", "derive_seed"]
