"""The package's shape: no import cycle, no module using another's private names, and every
hook an algorithm overrides is one ``MetaLearner``'s docstring lists."""
from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "lit_meta"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports_of(name: str) -> set[str]:
    """lit_meta modules that ``name`` imports anywhere (functions included; not under ``if TYPE_CHECKING``)."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # ``from pkg import module``
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in MODULES and m != name}


def test_no_import_cycle_in_lit_meta():
    graph = {name: imports_of(name) for name in MODULES}
    assert "lit_meta.cli" not in graph["lit_meta.adapt"]  # cli -> adapt (for adapt.main), never back
    state: dict[str, str] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = "done"

    for name in graph:
        if name not in state:
            walk(name)


def private_names(name: str) -> set[str]:
    """``_names`` a module defines: functions, methods, classes, ``self._x`` / module-level assignments."""
    names = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_module_uses_another_modules_private_names():
    defined = {name: private_names(name) for name in MODULES}
    offences = []
    for name in MODULES:
        own = defined[name]
        others = set().union(*(d for m, d in defined.items() if m != name)) - own
        for node in ast.walk(ast.parse(MODULES[name].read_text())):
            used = None
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                used = node.attr
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lit_meta"):
                used = next((a.name for a in node.names if a.name.startswith("_")), None)
            if used in others:
                offences.append(f"{name}:{node.lineno} uses {used}")
    assert not offences, offences


def algorithm_classes() -> list[type]:
    """Every ``MetaLearner`` subclass of lit_meta (exported or not), ``MetaLearner`` itself left out."""
    import lit_meta.algorithms as algorithms
    from lit_meta.algorithms import MetaLearner

    found, todo = {getattr(algorithms, n) for n in algorithms.__all__}, list(MetaLearner.__subclasses__())
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo += cls.__subclasses__()
    return sorted((c for c in found if isinstance(c, type) and issubclass(c, MetaLearner) and c is not MetaLearner
                   and c.__module__.startswith("lit_meta.")), key=lambda c: c.__name__)


def test_every_hook_an_algorithm_overrides_is_documented_and_public():
    import pytorch_lightning as pl

    from lit_meta.algorithms import MetaLearner, MetaModule

    documented = MetaLearner.__doc__
    base_names = set(vars(MetaLearner)) | set(vars(MetaModule))
    lightning = {n for n in dir(pl.LightningModule) if not (n.startswith("__") and n.endswith("__"))}
    classes = algorithm_classes()
    assert {"MAML", "ANIL", "MAMLpp", "Reptile", "MetaLSTM", "ProtoNet"} <= {c.__name__ for c in classes}
    for cls in classes:
        own = {n for n in vars(cls) if not (n.startswith("__") and n.endswith("__"))}
        # every LightningModule name, whether or not MetaLearner/MetaModule define it
        assert not own & lightning, f"{cls.__name__} overrides Lightning hook(s) {sorted(own & lightning)}"
        overridden = {n for n in own if n in base_names} - {"algorithm"}
        for hook in overridden:
            assert f"``{hook}" in documented, f"{cls.__name__}.{hook} is not among MetaLearner's documented hooks"
            assert not hook.startswith("_"), f"{cls.__name__} overrides private {hook}"
            assert not hook.startswith("on_"), f"{cls.__name__} overrides Lightning hook {hook}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports_first_in_a_fresh_interpreter(name):
    result = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1:]


TREE_GLYPHS = str.maketrans({c: " " for c in "│├└─┬┼"})
PATH_TOKEN = re.compile(r"[\w.-]+(/[\w.-]+)*(\.py|/)")


def tree_paths(tree: str) -> set[str]:
    """The paths a README tree block names, each as a whole path from the tree's top.

    A line's names are its leading path-like tokens (``x.py``, ``dir/x.py``, ``dir/``; its
    description after them is not read). A folder token (``dir/``) opens a folder: the bare
    names after it on its line, and every name on the following lines indented deeper than
    it (nested entries, or continuation lines of the folder's names), are inside it."""
    named: set[str] = set()
    folders: list[tuple[int, str]] = []  # (indent, path) of the open folders, innermost last
    for raw in tree.translate(TREE_GLYPHS).splitlines():
        tokens = []
        for token in raw.split():
            if not PATH_TOKEN.fullmatch(token):
                break
            tokens.append(token)
        if not tokens:
            continue
        indent = len(raw) - len(raw.lstrip())
        while folders and indent <= folders[-1][0]:
            folders.pop()
        inside = folders[-1][1] if folders else ""
        if tokens[0].endswith("/"):
            folder = inside + tokens[0]
            named.add(folder)
            named.update(folder + t for t in tokens[1:])
            folders.append((indent, folder))
        else:
            named.update(inside + t for t in tokens)
    return named


def readme_tree() -> str:
    """The first code block after README's "## How it works"."""
    readme = (REPO / "README.md").read_text()
    return readme.split("## How it works", 1)[1].split("```")[1]


def test_tree_paths_reads_whole_paths_nested_folders_and_continuation_lines():
    tree = """
lit_meta/
  tasks.py                 TaskBatch (`train.py adapt` in a description is not a name)
  algorithms/base.py       MetaLearner
  models/                  the networks
    conv4.py               conv4
    resnet12.py  mlp.py
  data/  sine.py folder.py
         omniglot.py
  bench/case.py
train.py                   not in lit_meta/
"""
    assert tree_paths(tree) == {
        "lit_meta/", "lit_meta/tasks.py", "lit_meta/algorithms/base.py", "lit_meta/models/",
        "lit_meta/models/conv4.py", "lit_meta/models/resnet12.py", "lit_meta/models/mlp.py", "lit_meta/data/",
        "lit_meta/data/sine.py", "lit_meta/data/folder.py", "lit_meta/data/omniglot.py", "lit_meta/bench/case.py",
        "train.py"}  # data/base.py is not named, though algorithms/base.py is


def test_readme_tree_names_every_module():
    """README's "How it works" tree matches the files: each module of lit_meta is named there by
    its whole path inside lit_meta/ (``data/base.py``; ``algorithms/base.py`` does not name it)."""
    named = {p[len("lit_meta/"):] for p in tree_paths(readme_tree()) if p.startswith("lit_meta/")}
    modules = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert "tasks.py" in named, "README's How it works tree has no lit_meta/ folder"
    missing = sorted(modules - named)
    assert not missing, f"README's How it works tree does not name lit_meta/{{{', '.join(missing)}}}"



def test_every_data_module_says_what_it_owns():
    """One file per job in ``lit_meta/data/``: each module opens with a docstring saying what it owns."""
    silent = sorted(p.relative_to(PACKAGE).as_posix() for p in (PACKAGE / "data").rglob("*.py")
                    if p.name != "__init__.py" and not ast.get_docstring(ast.parse(p.read_text())))
    assert not silent, f"lit_meta/data modules without a docstring: {silent}"

# ---------------------------------------------------------------------------- context is passed, not stashed
# What an algorithm's or the episode's code may assign to ``self`` outside ``__init__``, and why:
# none of it says what step or split is running.
STATE_ALLOWED = {
    "curves": "the test curves of the last test epoch, for results.json",
    "inner_lr": "set_inner_lr: an adaptation option the user gives",
    "ways": "resize_head of a headless embedding: the number of classes of a new task's support set",
    "classifier": "before_load_state: the transfer classifier sized by a checkpoint",
    "tuned_lrs": "the learned optimizer's tuned baseline rates, for the test epoch",
    "_unroll": "the learned optimizer's unroll in progress (its training state, checkpointed by design)",
    "_standalone_optimizer": "the meta-optimizer without a Trainer, made on first use",
    "_fit_started": "the wall clock of fit (train/wall_s)",
    "_elapsed_before": "the wall clock of fit before a resume, from the checkpoint",
    "_pending_train_values": "a logging step's values, from training_step to the bar's host copy at the batch's end",
}


def test_no_algorithm_stashes_the_step_or_split_or_sets_a_layers_mode():
    offences = []
    files = sorted((PACKAGE / "algorithms").glob("*.py")) + [PACKAGE / "episode.py"]
    for path in files:
        for func in ast.walk(ast.parse(path.read_text())):
            if not isinstance(func, ast.FunctionDef) or func.name == "__init__":
                continue
            for node in ast.walk(func):
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
                for target in targets:
                    if not isinstance(target, ast.Attribute):
                        continue
                    owner = ast.unparse(target.value)
                    if owner == "self" and target.attr in STATE_ALLOWED:
                        continue
                    if owner == "self.net" and target.attr == "head" and func.name == "resize_head":
                        continue  # a new head module for a new number of classes
                    offences.append(f"{path.name}:{node.lineno} {func.name} sets {ast.unparse(target)}")
    assert not offences, offences


def test_a_batchnorm_layer_keeps_no_mode_between_forwards():
    import torch

    from lit_meta.models.layers import Norm, PerStepBatchNorm

    layer = PerStepBatchNorm(3, steps=2)
    before = {k: v for k, v in vars(layer).items() if not k.startswith("_")}
    x = torch.randn(6, 3, 4, 4)
    for norm in (Norm(), Norm(support_rows=2), Norm(running=True), Norm(record=[])):
        layer(x, 1, norm)
    assert {k: v for k, v in vars(layer).items() if not k.startswith("_")} == before


# ---------------------------------------------------------------------------- options stated once
def outer_loop_options() -> dict[str, object]:
    from lit_meta.algorithms import MetaModule

    parameters = inspect.signature(MetaModule.__init__).parameters
    return {n: p.default for n, p in parameters.items() if n not in ("self", "task_spec")}


NON_DEFAULT = {"meta_optimizer": "sgd", "meta_lr": 0.005, "lr_schedule": "cosine", "weighting": "gradient_agreement",
               "grad_clip": 2.0, "grad_clip_value": 0.5, "min_lr": 0.001, "max_nonfinite": 3}


def test_meta_lstm_and_the_learned_optimizer_take_every_outer_loop_option_without_restating_it():
    """Each outer-loop option is stated once (MetaModule) and reaches both through **kwargs; a
    shared option either restates is one whose default it changes (Meta-LSTM: the paper's clip)."""
    from lit_meta.algorithms import LearningToLearn, MetaLearner, MetaLSTM, MetaModule
    from lit_meta.checkpoint import signature_defaults
    from lit_meta.data.optimizees import OptimizeeDataModule
    from lit_meta.tasks import task_spec

    assert set(NON_DEFAULT) == set(outer_loop_options())  # a new shared option must be added here
    images = task_spec("toy", "classification", [1, 8, 8], 3)
    for cls, spec in ((MetaLSTM, images), (LearningToLearn, OptimizeeDataModule().task_spec)):
        restated = set(inspect.signature(cls.__init__).parameters) & set(outer_loop_options())
        base = MetaLearner if issubclass(cls, MetaLearner) else MetaModule
        base_defaults = signature_defaults(base)
        assert all(signature_defaults(cls)[n] != base_defaults[n] for n in restated), (cls, restated)
        model = cls(task_spec=spec, backbone_kwargs={"filters": 4}, **NON_DEFAULT) if cls is MetaLSTM \
            else cls(task_spec=spec, **NON_DEFAULT)
        step = model.meta_step
        assert (model.meta_optimizer_name, model.meta_lr, model.lr_schedule, model.min_lr) == ("sgd", 0.005, "cosine",
                                                                                              0.001)
        assert (step.weighting, step.grad_clip, step.grad_clip_value, step.guard.max_nonfinite) == \
            ("gradient_agreement", 2.0, 0.5, 3)
        assert all(model.hparams[n] == v for n, v in NON_DEFAULT.items())  # and checkpoints record them
