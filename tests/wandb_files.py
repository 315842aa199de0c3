"""Reading what a W&B offline run wrote, for the tests that log to W&B without a network."""
from __future__ import annotations

import time
from pathlib import Path


def offline_records(save_dir: Path, keys: tuple[bytes, ...], timeout_s: float = 30.0) -> tuple[list[Path], bytes]:
    """The offline run files under ``save_dir`` and the bytes of the one run, once every key is in
    them or ``timeout_s`` has passed. wandb's writer is a separate process: on a loaded machine its
    last records can land a moment after ``wandb.finish()`` returns. The run file is a log of
    protobuf records, whose string fields are stored verbatim."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = list((Path(save_dir) / "wandb").glob("offline-run-*/run-*.wandb"))
        records = runs[0].read_bytes() if len(runs) == 1 else b""
        if all(k in records for k in keys) or time.monotonic() > deadline:
            return runs, records
        time.sleep(0.5)
