"""Benchmark harness: build a case, time its meta-steps, measure their peak memory.

The scripts in ``benchmarks/`` (``speed.py``, ``profile_step.py``, ...) are command lines
over this package; it lives inside ``lit_meta`` so that they import it the same way
whether lit_meta is installed or run from the source tree (``PYTHONPATH=.``).

- :mod:`lit_meta.bench.case`: :class:`Case` (dataset shape, algorithm, episode sizes,
  meta-batch, inner steps, device), its data and our meta-step.
- :mod:`lit_meta.bench.learn2learn_baseline`: learn2learn's meta-step for the same case.
- :mod:`lit_meta.bench.measure`: time per step, peak memory (CPU and CUDA), both sides.

Import from the modules (``from lit_meta.bench.measure import measure_case``): this file
imports nothing, so ``python -m lit_meta.bench.measure`` runs the module only once.
"""
