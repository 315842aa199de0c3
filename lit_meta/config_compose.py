"""Config files that build on other config files: ``compose:``, expanded before LightningCLI parses.

A shipped config states only what makes it itself and names the files it builds on::

    # configs/omniglot/fomaml_5w5s.yaml
    compose: [maml_5w5s.yaml, fomaml_5w1s.yaml]
    trainer: {logger: {init_args: {name: omniglot_fomaml_5w5s}}}

``--config configs/omniglot/fomaml_5w5s.yaml`` becomes, before parsing, one ``--config`` per file
in the order they apply: the parts depth first (each part's own ``compose`` before it), each file
once, at its first place, then the file itself::

    --config protocol.yaml --config maml_5w1s.yaml --config maml_5w5s.yaml
    --config fomaml_5w1s.yaml --config fomaml_5w5s.yaml

So a protocol setting (``val_tasks`` of every Omniglot config) is written once, in
``protocol.yaml``, and a first-order variant adds one line to any shape. The expansion uses
LightningCLI's own repeated ``--config`` merge, so its rules hold unchanged: a later file wins, and
a file that changes ``class_path`` keeps the earlier ``init_args`` the new class accepts (ANIL
built on MAML keeps MAML's network and inner loop). Paths are relative to the file that names
them. A ``--config`` file without ``compose`` passes through as it is.

Why not jsonargparse's own ``config:`` key inside a file: it takes a single file, and a
``class_path`` change inside a nested file drops every earlier ``init_args`` (ANIL built on MAML
would lose the network).

After the expansion ``--compose null`` follows each expanded file, so the config that
``--print_config`` prints and the run saves holds every setting and no relative path to resolve.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

KEY = "compose"


def expand_config_args(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config FILE`` whose file has ``compose:`` replaced by its parts'
    ``--config`` arguments, then the file's, then ``--compose null``."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == f"--{KEY}" or arg.startswith(f"--{KEY}="):  # else the parser would take it and do nothing
            raise ValueError(f"--{KEY}: only a config file names the files it builds on "
                             f"(write `{KEY}: [...]` in it, or pass each file with --config)")
        if arg in ("--config", "-c") and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        files = composition(value)
        for path in files:
            out += ["--config", path]
        if len(files) > 1:
            out += [f"--{KEY}", "null"]
    return out


def composition(value: str) -> list[str]:
    """The files ``--config value`` stands for, in the order they apply (``value`` last); a value
    that is no file (a YAML string, say) is itself."""
    path = Path(value)
    try:
        if not path.is_file():
            return [value]
    except (OSError, ValueError):  # a YAML string too long or odd for a file name
        return [value]
    order: list[Path] = []
    visit(path, order, stack=[])
    return [str(p) if p != path.resolve() else value for p in order]


def visit(path: Path, order: list[Path], stack: list[Path]) -> None:
    resolved = path.resolve()
    if resolved in stack:
        chain = " -> ".join(p.name for p in [*stack, resolved])
        raise ValueError(f"{stack[0]}: {KEY}: the files build on each other in a circle ({chain})")
    if resolved in order:  # already applied, at its first place
        return
    for part in read_parts(path) or []:
        target = (path.parent / part)
        if not target.is_file():
            raise ValueError(f"{path}: {KEY}: {part!r} is not a file (paths are relative to {path.parent})")
        visit(target, order, [*stack, resolved])
    order.append(resolved)


def read_parts(path: Path) -> list[str] | None:
    """The file's ``compose`` list, or None where it has none (or is no YAML mapping)."""
    try:
        data: Any = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None  # LightningCLI reads the file next and reports what is wrong with it
    if not isinstance(data, dict) or data.get(KEY) is None:
        return None
    parts = data[KEY]
    if isinstance(parts, str):
        parts = [parts]
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise ValueError(f"{path}: {KEY}: expected a list of config files, got {parts!r}")
    return parts
