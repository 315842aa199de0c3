"""``lit_meta.loggers.WandbLogger``: README's "without an API key or a network it logs offline,
says so in one line and carries on". The no-key path runs end to end in
tests/test_cli.py::test_wandb_offline_run_holds_logged_metrics; here the other one: a key is
set but the server cannot be reached."""
from __future__ import annotations

import time

import pytest


def test_with_a_key_but_no_network_the_run_falls_back_to_offline_with_one_notice(tmp_path, monkeypatch, capsys):
    """A (fake) key, a W&B server on a closed local port: the online start fails, one
    ``lit_meta:`` line says so, and the run is an offline one under ``save_dir``. wandb waits
    ``init_timeout`` (WANDB_INIT_TIMEOUT, 90 s by default: what a user without network waits)
    before giving up; 1 s here: the fallback takes about 2.5 s (measured; the test 5 s with its imports)."""
    wandb = pytest.importorskip("wandb")
    from lit_meta.internals import wandb_is_offline
    from lit_meta.loggers import WandbLogger

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no settings of the user's
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef" * 2 + "01234567")  # 40 characters, like a real one
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "1")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_MODE", "WANDB_DISABLED", "WANDB_DIR", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    # a fresh wandb process state: an earlier offline run in this process (tests/test_cli.py,
    # tests/test_curves.py) leaves wandb's singleton settings, under which the next run starts offline
    wandb.teardown()
    logger = WandbLogger(save_dir=str(tmp_path), project="lit-meta-test")
    assert not wandb_is_offline(logger)  # a key is set: it tries online first
    start = time.monotonic()
    try:
        run = logger.experiment
        elapsed = time.monotonic() - start
        run.log({"x": 1.0})
        assert run.offline and run.settings.mode in ("offline", "dryrun")  # wandb names it either way
        assert wandb_is_offline(logger)
    finally:
        wandb.finish()
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lit_meta:")]
    assert len(notices) == 1, notices
    assert notices[0].startswith("lit_meta: W&B online start failed (") and \
        notices[0].endswith("); logging offline instead"), notices
    assert "no W&B API key" not in notices[0]
    assert list((tmp_path / "wandb").glob("offline-run-*")), list(tmp_path.rglob("*"))[:20]
    assert elapsed < 30, elapsed  # WANDB_INIT_TIMEOUT was honoured
