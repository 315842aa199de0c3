"""Reading shipped config files as the tests need them: what one file states itself (its YAML), and
the whole config a file and the parts it builds on (``compose:``, lit_meta/config_compose.py) make
(LightningCLI's own merge)."""
from __future__ import annotations

import contextlib
import io

from pathlib import Path
from typing import Any

import yaml

from lit_meta.config_compose import KEY


def merges(key: str, value: Any, pre: tuple) -> bool:
    """Whether LightningCLI merges ``value`` key by key into what came before (a section, a class's
    ``init_args``, a class spec) rather than replacing it whole (a dict-valued option such as
    ``backbone_kwargs``)."""
    return isinstance(value, dict) and (not pre or key == "init_args" or "class_path" in value)


def own_settings(path: Path) -> dict[tuple, Any]:
    """The settings ``path`` states itself, flattened to key paths."""
    def flat(d: dict, pre: tuple) -> dict:
        out: dict[tuple, Any] = {}
        for k, v in d.items():
            out.update(flat(v, (*pre, k)) if merges(k, v, pre) else {(*pre, k): v})
        return out
    data = yaml.safe_load(Path(path).read_text()) or {}
    data.pop(KEY, None)
    return flat(data, ())


def printed(*args: str) -> dict:
    """The config ``train.py fit ARGS --print_config`` prints, as a dict: the parts merged and every
    default filled in (LightningCLI's own merge)."""
    from lit_meta.cli import MetaCLI

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            MetaCLI(args=["fit", *args, "--print_config"])
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise AssertionError(f"{args}: --print_config exited with {stop.code}") from None
    return yaml.safe_load(out.getvalue())


def composed(path: Path) -> dict:
    """The whole config ``train.py fit --config path`` runs."""
    return printed("--config", str(path))
