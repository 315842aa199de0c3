"""The peers of benchmarks/speed.py (lit_meta.bench.peers): each port computes the same meta-step as ours.

For each peer and each kind of step, on one batch from the same initial weights in float64:
second-order MAML and FOMAML give our meta-gradient, and Reptile's outer step (SGD at 1.0 on
θ − mean θ') leaves the same weights. Tolerance rtol 1e-6, atol 1e-7: float64 round-off
through two inner steps, but for two peers' constants: parallel-metalearn keeps its inner
rate as a float32 tensor (1e-9 off), and Adam's update g/(|g| + ε) turns differences in how
TorchOpt's bias correction is rounded into up to 1e-7 on entries whose gradient is near ε.
A port that does other work (first order for second, a missing task, another inner rate)
is off by 1e-3 or more.

Marked ``peers``: each test skips, with the reason, where its peer does not import
(``bash benchmarks/install_peers.sh``, then ``pytest -m peers``). The last tests (not marked)
check speed.py's rows without any peer installed.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import gpu_check, speed
from lit_meta.bench import peers
from lit_meta.bench.case import Case, build_data, build_ours, case_from_args
from lit_meta.bench.peers import PeerAbsent, build_peer, peer_version
from lit_meta.tasks import TaskBatch
from tests.episodes import run

TORCH_PEERS = ("higher", "torchopt", "parallel_metalearn")
ALGORITHMS = ("maml", "fomaml", "reptile")


def require(peer: str) -> None:
    try:
        peer_version(peer)
    except PeerAbsent as why:
        pytest.skip(f"marked peers: {why}")


@pytest.fixture
def float64_jax():
    import jax

    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def float64_case(algorithm: str, inner_steps: int = 2, **sizes: object) -> tuple[Case, object, TaskBatch]:
    sizes = {"meta_batch_size": 4, "inner_lr": 0.01 if algorithm == "reptile" else 0.1, **sizes}
    case = Case(random_images=True, algorithm=algorithm, inner_steps=inner_steps, **sizes)
    data = build_data(case)
    model, _ = build_ours(case, data)
    model.double()
    batch = data.datamodule.train_batch(0)
    batch = TaskBatch(*(t.double() if t.is_floating_point() else t for t in batch.tensors().values()))
    return case, model, batch


def ours_and_theirs(peer: str, algorithm: str, inner_steps: int = 2,
                    **sizes: object) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(ours, the peer's): MAML/FOMAML meta-gradients, or Reptile's weights after one outer step."""
    case, model, batch = float64_case(algorithm, inner_steps, **sizes)
    theirs = build_peer(peer, case, model.net, batch.support_x, tasks=lambda: batch)  # copies the initial weights
    theirs()
    if algorithm == "reptile":
        model.outer_update(batch)
        return [p.detach() for p in model.net.parameters()], theirs.weights()
    out = run(model, batch, case.inner_steps, first_order=case.is_first_order, training=True)
    out["query_loss"].mean().backward()
    return [p.grad for p in model.net.parameters()], theirs.meta_gradient()


def assert_same(ours: list[torch.Tensor], theirs: list[torch.Tensor], rtol: float = 1e-6, atol: float = 1e-7) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(b.to(a.dtype), a, rtol=rtol, atol=atol)


@pytest.mark.peers
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("peer", TORCH_PEERS)
def test_torch_peer_takes_our_meta_step(peer, algorithm):
    require(peer)
    if peer == "higher" and algorithm == "reptile":
        pytest.skip("higher's Adam places ε otherwise: test_highers_reptile_is_ours_but_for_where_its_adam_adds_epsilon")
    if peer == "parallel_metalearn" and algorithm == "reptile":
        with pytest.raises(PeerAbsent, match="InnerAdam"):
            ours_and_theirs(peer, algorithm)
        return
    # TorchOpt's Adam computes its bias correction 1 - β2^t in float32 whatever the weights'
    # dtype (pow of its float32 count): 6e-8 / 0.001, a relative 6e-5 on v̂, 3e-5 on the update
    loose = peer == "torchopt" and algorithm == "reptile"
    assert_same(*ours_and_theirs(peer, algorithm), **(dict(rtol=1e-4, atol=1e-6) if loose else {}))


# the timed cases, as gpu_check.py runs them (and docs/RESULTS.md's commands): each case's own
# sizes and inner rate (MAML the dataset's, Reptile Adam's 1e-3), read from its speed.py flags
TIMED = {name: case_from_args(speed.parse_args(flags)) for name, flags in gpu_check.speed_cases(smoke=False)}


@pytest.mark.peers
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("timed", list(TIMED))
@pytest.mark.parametrize("peer", TORCH_PEERS)
def test_torch_peer_takes_our_meta_step_at_the_timed_sizes(peer, timed):
    """The same agreement at each timed case's own sizes, so no side is timed doing less work there."""
    require(peer)
    timed_case = TIMED[timed]
    algorithm, inner_steps = timed_case.algorithm, timed_case.inner_steps
    sizes = {k: getattr(timed_case, k) for k in ("dataset", "ways", "shots", "queries", "meta_batch_size", "inner_lr")}
    if algorithm == "reptile" and peer in ("higher", "parallel_metalearn"):
        pytest.skip("higher's ε placement and parallel-metalearn's missing Reptile: see the tests above")
    loose = peer == "torchopt" and algorithm == "reptile"
    assert_same(*ours_and_theirs(peer, algorithm, inner_steps, **sizes),
                **(dict(rtol=1e-4, atol=1e-6) if loose else {}))


@pytest.mark.peers
@pytest.mark.usefixtures("one_thread")
def test_highers_reptile_is_ours_but_for_where_its_adam_adds_epsilon(monkeypatch):
    """higher's DifferentiableAdam adds ε before the bias correction: ours with ε·sqrt(1 − β2^t).
    At one inner step (t = 1) that ε given to higher makes the two the same update; the
    other steps of the port are those tested above for MAML."""
    require("higher")
    from lit_meta.bench import higher_baseline

    monkeypatch.setattr(higher_baseline, "ADAM_EPS", higher_baseline.ADAM_EPS * math.sqrt(1 - 0.999))
    assert_same(*ours_and_theirs("higher", "reptile", inner_steps=1))


@pytest.mark.peers
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_jax_takes_our_meta_step(algorithm, request):
    require("jax")
    request.getfixturevalue("float64_jax")
    ours, theirs = ours_and_theirs("jax", algorithm)
    assert all(t.dtype == torch.float64 for t in theirs)
    assert_same(ours, theirs)


@pytest.mark.peers
@pytest.mark.usefixtures("one_thread")
def test_short_mode_runs_every_installed_peer_beside_ours(capsys):
    speed.main(["--short", "--random-images", "--threads", "1", "--compare", *peers.PEERS])
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["peer"] for r in rows] == list(peers.PEERS)
    for row in rows:
        if "absent" not in row:
            assert math.isfinite(row["ratio"]) and row["ratio"] > 0 and row["peer_version"], row
    jax = rows[-1]
    assert "absent" in jax or jax["baseline_compile_s"] > 0


def test_a_peer_that_does_not_import_is_absent_and_the_others_still_run(capsys, monkeypatch):
    real = peers.peer_version

    def higher_missing(peer: str) -> str:
        if peer == "higher":
            raise PeerAbsent("higher does not import (ModuleNotFoundError: No module named 'higher')")
        return real(peer)

    monkeypatch.setattr(speed, "peer_version", higher_missing)
    monkeypatch.setattr(peers, "build_peer", lambda *a, **k: pytest.fail("no peer may be built"))
    speed.main(["--short", "--random-images", "--threads", "1", "--compare", "higher", "none"])
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 1 and rows[0]["peer"] == "higher" and "No module named" in rows[0]["absent"]
    assert rows[0]["ours_tasks_per_s"] > 0 and "ratio" not in rows[0] and "baseline_tasks_per_s" not in rows[0]


def test_compare_none_is_ours_alone(capsys):
    speed.main(["--short", "--random-images", "--threads", "1", "--compare", "none"])
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 1 and rows[0]["peer"] is None and rows[0]["ours_tasks_per_s"] > 0 and "ratio" not in rows[0]
