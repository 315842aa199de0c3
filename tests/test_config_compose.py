"""Configs that build on others (``compose:``, lit_meta/config_compose.py): the order parts apply in,
the merge LightningCLI makes of them, the errors of a bad composition, and that each shipped
setting is stated once."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lit_meta.config_compose import composition, expand_config_args, read_parts
from tests.config_files import own_settings, printed
from tests.conftest import REPO

CONFIGS = REPO / "configs"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def diamond(tmp_path: Path) -> Path:
    """top builds on left and right, both on base: base's settings once, then left, right, top."""
    write(tmp_path / "base.yaml", "model:\n  class_path: lit_meta.algorithms.MAML\n  init_args:\n"
          "    inner_lr: 0.3\n    inner_steps: 2\ndata:\n  class_path: lit_meta.data.SineDataModule\n"
          "  init_args:\n    shots: 7\n    val_tasks: 11\n")
    write(tmp_path / "left.yaml", "compose: [base.yaml]\nmodel:\n  init_args:\n    first_order: true\n")
    # right sets shots again: base must not be applied a second time after left (it would undo nothing
    # here, but would undo left's first_order if base set it)
    write(tmp_path / "sub" / "right.yaml", "compose: [../base.yaml]\ndata:\n  init_args:\n    shots: 3\n")
    return write(tmp_path / "top.yaml", "compose: [left.yaml, sub/right.yaml]\nmodel:\n  init_args:\n"
                 "    inner_steps: 4\n")


def test_parts_apply_depth_first_each_once_then_the_file(diamond: Path):
    root = diamond.parent
    assert [Path(p).resolve() for p in composition(str(diamond))] == [
        (root / n).resolve() for n in ("base.yaml", "left.yaml", "sub/right.yaml", "top.yaml")]
    argv = expand_config_args(["--model.init_args.meta_batch_size", "2", "--config", str(diamond), "--seed_everything", "1"])
    assert argv[:2] == ["--model.init_args.meta_batch_size", "2"] and argv[-2:] == ["--seed_everything", "1"]
    assert argv[-4:-2] == ["--compose", "null"]  # the run's saved config holds no relative path
    assert argv.count("--config") == 4


def test_a_composed_config_is_the_merge_of_its_parts(diamond: Path):
    config = printed("--config", str(diamond))
    init = config["model"]["init_args"]
    assert config["model"]["class_path"] == "lit_meta.algorithms.MAML"
    assert (init["inner_lr"], init["first_order"], init["inner_steps"]) == (0.3, True, 4)  # base, left, top
    assert (config["data"]["init_args"]["shots"], config["data"]["init_args"]["val_tasks"]) == (3, 11)
    assert config["compose"] is None


def test_a_part_that_changes_the_class_keeps_what_the_new_class_accepts(tmp_path: Path, diamond: Path):
    anil = write(tmp_path / "anil.yaml", "compose: [top.yaml]\nmodel:\n  class_path: lit_meta.algorithms.ANIL\n")
    init = printed("--config", str(anil))["model"]
    assert init["class_path"] == "lit_meta.algorithms.ANIL"
    assert (init["init_args"]["inner_lr"], init["init_args"]["inner_steps"]) == (0.3, 4)


def test_the_printed_config_runs_as_it_is_and_means_the_same(tmp_path: Path):
    """What --print_config prints (and a run saves as config.yaml) needs none of the parts."""
    first = printed("--config", str(CONFIGS / "omniglot" / "fomaml_5w5s.yaml"))
    saved = write(tmp_path / "elsewhere" / "config.yaml", yaml.safe_dump(first))
    assert printed("--config", str(saved)) == first


@pytest.mark.parametrize("text, message", [
    ("compose: [missing.yaml]\n", r"a\.yaml: compose: 'missing\.yaml' is not a file \(paths are relative to "),
    ("compose: 3\n", r"a\.yaml: compose: expected a list of config files, got 3"),
    ("compose: [b.yaml]\n", r"compose: the files build on each other in a circle \(a\.yaml -> b\.yaml -> a\.yaml\)"),
])
def test_a_bad_composition_is_one_line_naming_the_file(tmp_path: Path, text: str, message: str, capsys):
    from lit_meta.cli import main

    write(tmp_path / "b.yaml", "compose: [a.yaml]\n")
    bad = write(tmp_path / "a.yaml", text)
    with pytest.raises(ValueError, match=message):
        expand_config_args(["--config", str(bad)])
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "a.yaml: compose:" in err[0]


SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if read_parts(p))


def test_the_shipped_configs_build_on_protocols():
    # every benchmark with several algorithms has one protocol file the others build on
    for bench in ("omniglot", "miniimagenet", "sine"):
        protocol = (CONFIGS / bench / "protocol.yaml").resolve()
        users = [p for p in (CONFIGS / bench).glob("*.yaml") if p.name != "protocol.yaml"]
        assert users and all(Path(composition(str(p))[0]).resolve() == protocol for p in users), bench
    assert len(SHIPPED) > 60


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_a_shipped_config_states_nothing_its_parts_already_say(path: Path):
    """Each setting stated once: a value a file repeats from the files it builds on is a copy that
    would drift when the protocol changes."""
    inherited: dict[tuple, object] = {}
    for part in composition(str(path))[:-1]:
        inherited.update(own_settings(Path(part)))
    repeated = {k: v for k, v in own_settings(path).items() if k in inherited and inherited[k] == v}
    assert not repeated, f"{path.name} repeats {sorted('.'.join(k) for k in repeated)}"


def test_compose_on_the_command_line_is_refused_and_a_yaml_string_config_passes_through():
    with pytest.raises(ValueError, match=r"--compose: only a config file names the files it builds on"):
        expand_config_args(["--compose", "[configs/omniglot/maml_5w1s.yaml]"])
    # a config given as a YAML string, too long for a file name: passed on for LightningCLI to read
    inline = "{seed_everything: 3, model: {init_args: {inner_lr: 0.25, inner_steps: " + "1" * 300 + "}}}"
    assert expand_config_args(["--config", inline]) == ["--config", inline]
    assert expand_config_args(["--config", "{seed_everything: 3}"]) == ["--config", "{seed_everything: 3}"]
    assert printed("--config", "{seed_everything: 3}")["seed_everything"] == 3
