"""``train.py adapt`` / ``lit_meta.adapt``: a checkpoint fine-tuned on a task given as files.

Data: a miniature Omniglot written in the official PNG layout (bool images, mode "1"),
with class structure (each character is a blob pattern; its drawers are shifted, noisy
copies), so a hundred FOMAML steps learn something a random initialisation lacks.
(``measure_*`` are also run under other seeds and thread counts by tests/learning_margins.py.)
"""
from __future__ import annotations

import copy
import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

import lit_meta
from lit_meta.adapt import adapt, read_query_folder, read_support_folder
from lit_meta.algorithms import ANIL, MAML, MAMLpp, MetaLSTM, MetaSGD, Reptile, Transfer
from lit_meta.checkpoint import load_checkpoint
from lit_meta.cli import main
from lit_meta.data import OmniglotDataModule
from lit_meta.data.preprocessing import normalize
from lit_meta.metrics import mean_ci95
from tests.image_data_fixtures import HALVES, _omniglot_files, write_omniglot_folders
from tests.episodes import adapt_one, predict, run

BACKGROUND, EVALUATION, DRAWERS = 80, 40, 6
SMALL = {"filters": 8}
TRAIN_STEPS = 100


def structured_arrays(size: int = 35, seed: int = 0) -> dict[str, np.ndarray]:
    """``half -> bool [characters, drawers, size, size]`` (True = paper), learnable classes."""
    rng = np.random.default_rng(seed)
    out = {}
    for half, n in zip(HALVES, (BACKGROUND, EVALUATION)):
        proto = (rng.random((n, 7, 7)) < 0.35).repeat(size // 7, 1).repeat(size // 7, 2)
        ink = np.empty((n, DRAWERS, size, size), bool)
        for c in range(n):
            for d in range(DRAWERS):
                shifted = np.roll(proto[c], tuple(rng.integers(-2, 3, 2)), (0, 1))
                ink[c, d] = shifted ^ (rng.random((size, size)) < 0.05)
        out[half] = ~ink
    return out


def save_checkpoint(model: pl.LightningModule, path: Path) -> Path:
    """What LightningCLI's ModelCheckpoint writes, as far as ``adapt`` reads it."""
    hparams = {**dict(model.hparams), "_class_path": f"lit_meta.algorithms.{type(model).__name__}",
               "_instantiator": "pytorch_lightning.cli.instantiate_module"}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": pl.__version__}, path)
    return path


def lake_datamodule(root: Path, seed: int = 0, **kwargs) -> OmniglotDataModule:
    """Lake split: the test tasks are of the evaluation characters, unseen in training."""
    kwargs = {"ways": 5, "shots": 1, "queries": 3, "eval_shots": 2, "eval_queries": 3, "image_size": 14,
              "meta_batch_size": 4, "eval_batch_size": 4, "test_tasks": 4, "val_tasks": 4, **kwargs}
    dm = OmniglotDataModule(str(root), split="lake", seed=seed, cache_dir=str(root / "cache"), **kwargs)
    dm.setup()
    return dm


def make_omni(root: Path) -> dict:
    """The PNG pack, its files, and a Lake-split DataModule (test = evaluation characters)."""
    arrays = structured_arrays()
    write_omniglot_folders(root, arrays)
    files = [root / p for p, _ in _omniglot_files(arrays)]
    return {"root": root, "dm": lake_datamodule(root), "files": files}


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    return make_omni(tmp_path_factory.mktemp("omniglot"))


def train_fomaml(dm: OmniglotDataModule, seed: int = 0, steps: int = TRAIN_STEPS) -> tuple[MAML, MAML]:
    """(the untrained model, the same model after ``steps`` 5-way FOMAML meta-steps)."""
    torch.manual_seed(seed)
    model = MAML(task_spec=dm.task_spec, backbone_kwargs=SMALL, inner_lr=0.4, first_order=True,
                 meta_batch_size=4, meta_lr=0.01, eval_inner_steps=3)
    untrained = copy.deepcopy(model)
    for step in range(steps):
        model.outer_update(dm.train_batch(step))
    return untrained, model


@pytest.fixture(scope="module")
def checkpoints(omni, tmp_path_factory):
    """A 5-way FOMAML checkpoint after 100 meta-steps and the same model untrained."""
    out = tmp_path_factory.mktemp("ckpt")
    random, trained = train_fomaml(omni["dm"])
    return {"random": save_checkpoint(random, out / "random.ckpt"),
            "trained": save_checkpoint(trained, out / "trained.ckpt")}


def write_task(omni, task: int, folder: Path) -> tuple[Path, Path, object]:
    """Copy the original PNGs of test task ``task`` into ``support/way<l>/`` and ``query/way<l>/``
    (so sorted folder order is the episode's label order, and file order its query order)."""
    dm = omni["dm"]
    size = dm.eval_batch_size
    batch = dm.eval_batch("test", task // size).slice(task % size, task % size + 1)
    pool = dm.pools["test"]
    everything = normalize(pool.images, dm.mean, dm.std)
    for part, x, y in (("support", batch.support_x[0], batch.support_y[0]),
                       ("query", batch.query_x[0], batch.query_y[0])):
        for i, (image, label) in enumerate(zip(x, y.tolist())):
            index = int((everything == image).flatten(1).all(1).nonzero()[0])
            character = int(torch.searchsorted(pool.offsets, index, right=True)) - 1
            drawer = index - int(pool.offsets[character])
            # Lake split: test character k is evaluation character k, its drawers in file order.
            source = omni["files"][(BACKGROUND + character) * DRAWERS + drawer]
            target = folder / part / f"way{label}" / f"{i:02d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    return folder / "support", folder / "query", batch


def class_folders(root: Path, classes: dict[str, list[Path]]) -> Path:
    for name, files in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, root / name / f.name)
    return root


def evaluation_task(omni, folder: Path, characters: list[int], shots: int = 1) -> tuple[Path, Path]:
    """Support/query folders of evaluation characters (``shots`` drawers to support, the rest query)."""
    support, query = {}, {}
    for c in characters:
        files = omni["files"][(BACKGROUND + c) * DRAWERS:(BACKGROUND + c + 1) * DRAWERS]
        support[f"char{c:02d}"], query[f"char{c:02d}"] = files[:shots], files[shots:]
    return class_folders(folder / "support", support), class_folders(folder / "query", query)


# ---------------------------------------------------------------------------- equivalence
def test_png_files_give_the_datamodule_task_predictions(omni, checkpoints, tmp_path):
    support, query, batch = write_task(omni, 1, tmp_path)
    result = adapt(checkpoints["trained"], support, query)

    model = load_checkpoint(checkpoints["trained"])
    params = {n: p.detach() for n, p in model.inner_params().items()}
    sx, sy, qx = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    with torch.enable_grad():
        adapted = adapt_one(model, params, sx, sy, model.eval_inner_steps, first_order=True, training=False)
        expected = predict(model, adapted.params, sx, qx, model.eval_inner_steps, training=False).detach()
        module_acc = run(model, batch, model.eval_inner_steps, first_order=True, training=False)["query_acc"]
    assert result.outputs.shape == expected.shape == (15, 5)
    torch.testing.assert_close(result.outputs, expected, atol=1e-5, rtol=1e-5)
    assert result.predictions == [f"way{i}" for i in expected.argmax(-1).tolist()]
    assert result.labels == [f"way{i}" for i in batch.query_y[0].tolist()]
    assert result.accuracy == pytest.approx(float(module_acc[0]))
    assert result.notices == []  # 5 classes into a 5-way head: nothing to resize


def test_lit_meta_adapt_is_the_api(omni, checkpoints, tmp_path):
    support, query = evaluation_task(omni, tmp_path, [0, 1, 2, 3, 4])
    assert lit_meta.adapt is adapt
    result = lit_meta.adapt(checkpoints["trained"], support, query, steps=0)
    assert len(result.predictions) == 25 and result.accuracy is not None


# ---------------------------------------------------------------------------- CLI output
def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_labelled_query_accuracy_matches_the_csv(omni, checkpoints, tmp_path, capsys):
    support, query = evaluation_task(omni, tmp_path, [5, 6, 7, 8, 9], shots=2)
    output = tmp_path / "preds.csv"
    main(["adapt", "--ckpt_path", str(checkpoints["trained"]), "--support", str(support),
          "--query", str(query), "--output", str(output)])
    printed = capsys.readouterr().out
    rows = read_csv(output)
    assert list(rows[0]) == ["file", "prediction", "label"] and len(rows) == 5 * 4
    assert all(Path(r["file"]).parent.name == r["label"] for r in rows)
    from_csv = sum(r["prediction"] == r["label"] for r in rows) / len(rows)
    accuracy = float(printed.split("accuracy:")[1].split()[0])
    assert accuracy == pytest.approx(from_csv, abs=1e-4)


def test_unlabelled_query_prints_a_table(omni, checkpoints, tmp_path, capsys):
    support, labelled = evaluation_task(omni, tmp_path, [0, 1, 2])
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(sorted(labelled.rglob("*.png"))):
        shutil.copy(f, flat / f"q{i:02d}.png")
    main(["adapt", "--ckpt_path", str(checkpoints["trained"]), "--support", str(support), "--query", str(flat)])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].split() == ["file", "prediction"] and len(lines) == 1 + 15
    assert "accuracy" not in out
    assert {line.split()[1] for line in lines[1:]} <= {"char00", "char01", "char02"}


# ---------------------------------------------------------------------------- ways
OTHER_WAYS_BOUND = {3: 0.60, 7: 0.40}


def check_other_ways(ways: int, accuracy: float) -> None:
    # A zero head still learns the task in 3 steps. Measured at seeds 0-4 x 1-2 threads
    # (docs/RESULTS.md, 2026-11-30): 3-way 0.80-1.00, 7-way 0.51-0.77 (issue 23 quotes 0.49 as
    # the lowest 7-way); this checkout's own test run: 3-way 1.00, 7-way 0.66. The bounds are
    # 1.8 x chance for 3-way (0.60: 9 of its 15 queries) and 2.8 x chance for 7-way (0.40:
    # 14 of 35), each 3 queries below the lowest measured (12/15, 17/35). The data are easy (a random
    # initialisation gets 0.73 / 0.54, and 1 step or a 10 x smaller rate change nothing), so the
    # bound catches an adaptation that misses classes: one on the first 2 support images only
    # gets 0.26 at 7-way, which the old 1.5 x chance bound (0.21) passed.
    assert accuracy >= OTHER_WAYS_BOUND[ways], (ways, accuracy)


def measure_other_ways(omni: dict, ckpt: Path, folder: Path) -> dict[int, float]:
    """The test below's accuracies (its tasks: the first 3 or 7 evaluation characters, 1 shot)."""
    return {ways: adapt(ckpt, *evaluation_task(omni, folder / f"ways{ways}", list(range(ways)))).accuracy
            for ways in (3, 7)}


@pytest.mark.parametrize("ways", [3, 7])
def test_other_ways_resize_the_head_and_say_so(omni, checkpoints, tmp_path, capsys, ways):
    support, query = evaluation_task(omni, tmp_path, list(range(ways)))
    main(["adapt", "--ckpt_path", str(checkpoints["trained"]), "--support", str(support), "--query", str(query)])
    captured = capsys.readouterr()
    assert f"the checkpoint has 5 classes, the support set {ways}" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    check_other_ways(ways, float(captured.out.split("accuracy:")[1]))


ALGORITHMS = {
    "maml": lambda spec: MAML(task_spec=spec, backbone_kwargs=SMALL, inner_lr=0.4),
    # two steps: with a zero head the first step moves only the head, the second the body too
    "anil": lambda spec: ANIL(task_spec=spec, backbone_kwargs=SMALL, inner_lr=0.4, eval_inner_steps=2),
    "metasgd": lambda spec: MetaSGD(task_spec=spec, backbone_kwargs=SMALL, eval_inner_steps=2),
    "mamlpp": lambda spec: MAMLpp(task_spec=spec, backbone_kwargs=SMALL, eval_inner_steps=2),
    "reptile": lambda spec: Reptile(task_spec=spec, backbone_kwargs=SMALL, eval_inner_steps=2),
    "transfer": lambda spec: Transfer(task_spec=spec, backbone_kwargs=SMALL, inner_lr=0.4),
    "meta_lstm": lambda spec: MetaLSTM(task_spec=spec, backbone_kwargs=SMALL, inner_steps=2),
}


@torch.no_grad()
def learned_rules_set_apart(model) -> None:
    """Meta-learned rule state that plain SGD at ``inner_lr`` cannot imitate: Meta-SGD's rates
    random per entry, MAML++'s different per layer and step, Meta-LSTM's gates far from
    (keep, inner_lr)."""
    torch.manual_seed(1)
    if isinstance(model, MetaSGD):
        for rates in model.inner_lrs.values():
            rates.uniform_(0.05, 0.5)
    elif isinstance(model, MAMLpp):
        for layer, rates in enumerate(model.inner_lrs.values()):
            rates.copy_(torch.tensor([0.3, 0.04]) * (1 + layer % 3))
    elif isinstance(model, MetaLSTM):
        model.meta_learner.from_h.bias.copy_(torch.tensor([0.9, 0.2]).logit())
        model.meta_learner.from_theta.uniform_(-0.5, 0.5)


def hand_adapted_logits(model, rule: str, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
    """The query logits after the checkpoint's test-time steps of ``rule``, written out from the
    papers' update equations (the network's forward is the model's; nothing of its inner loop)."""
    params = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    if rule == "anil":
        names = ["head.weight", "head.bias"]
    elif rule == "mamlpp":  # BNWB: per-step BN weights [slots, C] are outer-loop only (adapt_bn false)
        names = [n for n, p in params.items() if not (n.startswith("body.") and p.dim() == 2)]
    else:
        names = list(params)
    m = {n: torch.zeros_like(params[n]) for n in names}
    v = {n: torch.zeros_like(params[n]) for n in names}
    lstm_state = None
    for k in range(model.eval_inner_steps):
        with torch.enable_grad():
            live = {n: p.requires_grad_(n in names) for n, p in ((n, p.clone()) for n, p in params.items())}
            loss = torch.nn.functional.cross_entropy(model.forward_fn(live, sx, k), sy)
            grads = dict(zip(names, torch.autograd.grad(loss, [live[n] for n in names])))
        for n in names:
            g = grads[n]
            if rule in ("sgd", "anil"):
                params[n] = params[n] - model.inner_lr * g
            elif rule == "metasgd":  # θ' = θ − α ⊙ ∇, α learned per entry
                params[n] = params[n] - model.inner_lrs.of(n).detach() * g
            elif rule == "mamlpp":  # LSLR: the rate of this layer at step k
                params[n] = params[n] - model.inner_lrs.of(n).detach()[k] * g
            elif rule == "reptile":  # Adam, β1 = 0: m = g, v = β2 v + (1 − β2) g², bias-corrected v
                b2, t = 0.999, k + 1
                m[n] = g
                v[n] = b2 * v[n] + (1 - b2) * g * g
                params[n] = params[n] - model.inner_lr * m[n] / ((v[n] / (1 - b2 ** t)).sqrt() + 1e-8)
        if rule == "meta_lstm":  # c_t = f_t ⊙ c_{t−1} − i_t ⊙ ∇_t, the gates from the meta-learner cell
            theta = torch.cat([params[n].reshape(-1) for n in names])
            grad = torch.cat([grads[n].reshape(-1) for n in names])
            cell = model.meta_learner
            lstm_state = cell.init_state(theta) if lstm_state is None else lstm_state
            f, i, lstm_state = cell(grad, loss.detach(), theta, lstm_state)
            assert (f - 1).abs().min() > 0.01 and (i - model.inner_lr).abs().min() > 0.05  # far from SGD
            flat = (f * theta - i * grad).detach()
            params.update({n: t.reshape(params[n].shape)
                           for n, t in zip(names, flat.split([params[n].numel() for n in names]))})
    return model.forward_fn(params, qx, model.query_step(model.eval_inner_steps)).detach()


OWN_RULE = {"maml": "sgd", "transfer": "sgd", "anil": "anil", "metasgd": "metasgd", "mamlpp": "mamlpp",
            "reptile": "reptile", "meta_lstm": "meta_lstm"}


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_adapts_with_its_own_rule(omni, tmp_path, algorithm):
    """``adapt``'s logits are those of the algorithm's own update rule computed by hand (from
    the same checkpoint with the same resized head), and not those of plain SGD."""
    model = ALGORITHMS[algorithm](omni["dm"].task_spec)
    learned_rules_set_apart(model)
    ckpt = save_checkpoint(model, tmp_path / "m.ckpt")
    support, query = evaluation_task(omni, tmp_path, [0, 1, 2])  # 3-way: head resized
    result = adapt(ckpt, support, query)
    assert result.outputs.shape == (15, 3) and torch.isfinite(result.outputs).all()
    assert "adapting a new zero-initialised 3-way head" in result.notices[0]
    assert type(load_checkpoint(ckpt)) is type(model)

    hand = load_checkpoint(ckpt)
    hand.resize_head(3)
    sx, sy, names = read_support_folder(support, hand.task_spec)
    qx, _ = read_query_folder(query, hand.task_spec, names)
    expected = hand_adapted_logits(hand, OWN_RULE[algorithm], sx.images, sy, qx.images)
    scale = expected.abs().max()
    torch.testing.assert_close(result.outputs, expected, atol=1e-5 * scale, rtol=1e-4)
    if OWN_RULE[algorithm] != "sgd":
        sgd = hand_adapted_logits(hand, "sgd", sx.images, sy, qx.images)
        assert (sgd - expected).abs().max() > 0.01 * scale, "the test cannot tell this rule from plain SGD"


def test_inner_lr_and_steps_are_used(omni, checkpoints, tmp_path):
    support, query = evaluation_task(omni, tmp_path, [0, 1, 2, 3, 4])
    none = adapt(checkpoints["trained"], support, query, steps=0)
    big = adapt(checkpoints["trained"], support, query, steps=1, inner_lr=0.4)
    small = adapt(checkpoints["trained"], support, query, steps=1, inner_lr=1e-6)
    torch.testing.assert_close(small.outputs, none.outputs, atol=1e-3, rtol=0)
    assert not torch.allclose(big.outputs, none.outputs, atol=1e-2)


# ---------------------------------------------------------------------------- it learns
HELD_OUT_TASKS = 100


def paired_gain(trained: MAML, random: MAML, root: Path, seed: int = 0) -> dict[str, float]:
    """Accuracy of each model on the same 100 5-way 1-shot tasks of held-out characters
    (5 queries per class), adapted for the checkpoints' 3 steps; and the per-task paired
    difference's mean with its 95% CI (tasks are independent draws, so the CI is a t-interval's
    normal approximation at n = 100)."""
    dm = lake_datamodule(root, seed, eval_shots=1, eval_queries=5, eval_batch_size=50, test_tasks=HELD_OUT_TASKS)
    accuracy = {}
    for name, model in (("trained", trained), ("random", random)):
        with torch.enable_grad():
            accuracy[name] = torch.cat([run(model, dm.eval_batch("test", c), model.eval_inner_steps,
                                                        first_order=True, training=False)["query_acc"]
                                        for c in range(len(dm.eval_chunks("test")))]).double()
    gain = accuracy["trained"] - accuracy["random"]
    mean, ci95, n = mean_ci95(torch.stack([gain.sum(), (gain ** 2).sum(), torch.tensor(float(len(gain)))]))
    return {"trained": accuracy["trained"].mean().item(), "random": accuracy["random"].mean().item(),
            "gain": mean, "gain_ci95": ci95, "tasks": n}


def check_trained_beats_random(m: dict[str, float]) -> None:
    # Measured at seeds 0-4 x 1-2 threads (tests/learning_margins.py, docs/RESULTS.md): gain
    # 0.28-0.39 with CI ±0.03, trained 0.90-0.92, random 0.52-0.62 (chance 0.2; 2026-11-30).
    # The bound on the CI's lower end (0.10) is ~6 CI widths below the smallest gain measured.
    assert m["tasks"] == HELD_OUT_TASKS
    assert m["gain"] - m["gain_ci95"] > 0.10, m
    assert m["trained"] > 0.75, m


def measure_trained_vs_random(root: Path, seed: int = 0) -> dict[str, float]:
    random, trained = train_fomaml(lake_datamodule(root, seed), seed)
    return paired_gain(trained, random, root, seed)


def test_trained_checkpoint_beats_random_init_on_held_out_characters(omni, checkpoints):
    """A paired comparison on 100 tasks: the CI of the mean gain excludes anything below 0.1."""
    trained, random = load_checkpoint(checkpoints["trained"]), load_checkpoint(checkpoints["random"])
    check_trained_beats_random(paired_gain(trained, random, omni["root"]))


# ---------------------------------------------------------------------------- bad input
def run_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["adapt", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_missing_and_corrupt_checkpoints(omni, tmp_path, capsys):
    support, query = evaluation_task(omni, tmp_path, [0, 1])
    missing = tmp_path / "nope.ckpt"
    assert str(missing) in run_error(capsys, "--ckpt_path", str(missing), "--support", str(support),
                                     "--query", str(query))
    corrupt = tmp_path / "bad.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    err = run_error(capsys, "--ckpt_path", str(corrupt), "--support", str(support), "--query", str(query))
    assert "corrupt" in err and str(corrupt) in err


def test_support_folder_errors(omni, checkpoints, tmp_path, capsys):
    one, query = evaluation_task(omni, tmp_path, [0])
    ckpt = str(checkpoints["random"])
    assert "at least 2 classes, found 1" in run_error(capsys, "--ckpt_path", ckpt, "--support", str(one),
                                                     "--query", str(query))
    (one / "empty_class").mkdir()
    (one / "empty_class" / "notes.txt").write_text("no images here")
    err = run_error(capsys, "--ckpt_path", ckpt, "--support", str(one), "--query", str(query))
    assert "support class folder has no images" in err and "empty_class" in err
    err = run_error(capsys, "--ckpt_path", ckpt, "--support", str(tmp_path / "absent"), "--query", str(query))
    assert "--support folder not found" in err


def test_undecodable_query_image_is_named_and_skipped(omni, checkpoints, tmp_path, capsys):
    support, query = evaluation_task(omni, tmp_path, [0, 1, 2, 3, 4])
    bad = query / "char01" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    output = tmp_path / "p.csv"
    main(["adapt", "--ckpt_path", str(checkpoints["trained"]), "--support", str(support),
          "--query", str(query), "--output", str(output)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped query image" in err[0] and str(bad) in err[0]
    rows = read_csv(output)
    assert len(rows) == 25 and str(bad) not in {r["file"] for r in rows}
    result = adapt(checkpoints["trained"], support, query)
    assert result.skipped == [str(bad)]


def test_rgb_images_into_a_grayscale_model_are_converted(omni, checkpoints, tmp_path):
    support, query = evaluation_task(omni, tmp_path, [0, 1, 2, 3, 4])
    gray = adapt(checkpoints["trained"], support, query)
    for f in list(support.rglob("*.png")) + list(query.rglob("*.png")):
        Image.open(f).convert("RGB").save(f)
    rgb = adapt(checkpoints["trained"], support, query)
    assert rgb.notices == ["note: converted 30 image(s) to grayscale: the model takes 1 channel(s)"]
    torch.testing.assert_close(rgb.outputs, gray.outputs)


def test_query_folder_errors(omni, checkpoints, tmp_path, capsys):
    support, query = evaluation_task(omni, tmp_path, [0, 1])
    (query / "stranger").mkdir()
    shutil.copy(next(query.rglob("*.png")), query / "stranger" / "x.png")
    err = run_error(capsys, "--ckpt_path", str(checkpoints["random"]), "--support", str(support),
                    "--query", str(query))
    assert "'stranger' is not a support class" in err


# ---------------------------------------------------------------------------- regression
def test_sine_csv_round_trip(tmp_path, capsys):
    from lit_meta.data import SineDataModule

    torch.manual_seed(0)
    model = MAML(task_spec=SineDataModule().task_spec, inner_lr=0.01, eval_inner_steps=5)
    ckpt = save_checkpoint(model, tmp_path / "sine.ckpt")
    xs = torch.linspace(-5, 5, 10)
    with open(tmp_path / "support.csv", "w") as f:
        f.write("x,y\n" + "".join(f"{x:.6f},{2 * math.sin(x - 1):.6f}\n" for x in xs.tolist()))
    qx = [-4.5, -1.25, 0.0, 3.5]
    with open(tmp_path / "query.csv", "w") as f:
        f.write("x,y\n" + "".join(f"{x},{2 * math.sin(x - 1):.6f}\n" for x in qx))
    output = tmp_path / "preds.csv"
    main(["adapt", "--ckpt_path", str(ckpt), "--support", str(tmp_path / "support.csv"),
          "--query", str(tmp_path / "query.csv"), "--output", str(output)])
    rows = read_csv(output)
    assert list(rows[0]) == ["x", "prediction", "y"] and [float(r["x"]) for r in rows] == qx
    sx = torch.tensor([[round(x, 6)] for x in xs.tolist()])
    sy = torch.tensor([[round(2 * math.sin(x - 1), 6)] for x in xs.tolist()])
    expected = load_checkpoint(ckpt).adapt_and_predict(sx, sy, torch.tensor(qx)[:, None])
    assert [float(r["prediction"]) for r in rows] == pytest.approx(expected[:, 0].tolist(), abs=1e-5)
    mse = float(capsys.readouterr().out.split("mse:")[1])
    assert mse == pytest.approx(np.mean([(float(r["prediction"]) - float(r["y"])) ** 2 for r in rows]), rel=1e-3)

    with open(tmp_path / "unlabelled.csv", "w") as f:
        f.write("x\n1.0\n2.0\n")
    result = adapt(ckpt, tmp_path / "support.csv", tmp_path / "unlabelled.csv")
    assert result.labels is None and result.mse is None and len(result.predictions) == 2
    with open(tmp_path / "bad.csv", "w") as f:
        f.write("x\n1.0\n")
    err = run_error(capsys, "--ckpt_path", str(ckpt), "--support", str(tmp_path / "bad.csv"),
                    "--query", str(tmp_path / "unlabelled.csv"))
    assert "needs columns x,y; missing y" in err
