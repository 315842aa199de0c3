"""Benchmark command lines (run them as files: ``python benchmarks/speed.py ...``).

Each script imports only ``lit_meta`` (the harness is ``lit_meta.bench``), never a sibling
script, so it runs the same with lit_meta installed or from the source tree
(``PYTHONPATH=.``). This file makes the folder a package so that tests import the
scripts as ``benchmarks.<name>`` (pytest puts the repository root on ``sys.path``:
``pythonpath`` in pyproject.toml).
"""
