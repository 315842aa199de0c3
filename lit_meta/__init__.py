"""lit_meta."""
from lit_meta.optim import LearnedOptimizer
from lit_meta.adapt import adapt  # noqa: E402  (the function; the module stays importable as lit_meta.adapt)

__all__ = ["LearnedOptimizer", "adapt"]
