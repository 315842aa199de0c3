"""lit_meta."""
from lit_meta.optim import LearnedOptimizer

__all__ = ["LearnedOptimizer"]
