"""Every collective of ``lorakit train`` under torchrun is bounded by ``LORAKIT_DIST_TIMEOUT``, and the error
names it: a stuck rank (SIGSTOP) makes the other fail with :class:`CollectiveTimeoutError` instead of a hang
(reference: the backend's own timeout, set through ``init_process_group(timeout=)``)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import cli_env, tiny_train_args
from .test_fsdp import _workers, torchrun


def test_backend_timeout_becomes_a_named_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.errors import LoraError
    from lorakit.train.distributed import named_timeouts
    from lorakit.train.errors import CollectiveTimeoutError

    monkeypatch.setenv("LORAKIT_DIST_TIMEOUT", "8")
    monkeypatch.setenv("RANK", "1")
    gloo = "[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 8000ms for recv operation to complete"
    with pytest.raises(CollectiveTimeoutError, match=r"rank 1: .*LORAKIT_DIST_TIMEOUT=8 s.*Timed out waiting") as err:
        with named_timeouts():
            raise RuntimeError(gloo)
    assert isinstance(err.value, LoraError) and isinstance(err.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError, match="^shape mismatch$"), named_timeouts():  # anything else: unchanged
        raise RuntimeError("shape mismatch")
    with pytest.raises(ValueError, match="timeout"), named_timeouts():
        raise ValueError("--timeout: not a number")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's rank processes through /proc")
@pytest.mark.parametrize("fsdp", [True, False], ids=["fsdp", "ddp"])
def test_stuck_rank_fails_the_other_within_the_timeout(fsdp: bool, tmp_path: Path, tiny_bert: Path,
                                                       sentiment_files: tuple[Path, Path]) -> None:
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    limit = 8
    args = tiny_train_args(tiny_bert, sentiment_files, max_steps=100_000, batch_size=4, save_every=100_000,
                           fsdp=fsdp, output_dir=out)
    env = cli_env(CUDA_VISIBLE_DEVICES="", LORAKIT_DIST_TIMEOUT=str(limit))
    with log.open("w") as fh:
        proc = subprocess.Popen([*torchrun(2), "--max-restarts", "0", "-m", "lorakit", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=fh)
    stopped = None
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:  # until both ranks are training
            if (out / "metrics.jsonl").is_file() and '"split": "train"' in (out / "metrics.jsonl").read_text():
                break
            time.sleep(0.2)
        workers = _workers(proc.pid)
        assert proc.poll() is None and len(workers) == 2, log.read_text()[-2000:]
        stopped = max(workers)
        os.kill(stopped, signal.SIGSTOP)  # a stuck rank: alive, never reaching its next collective
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() < t0 + limit + 90:
            if "LORAKIT_DIST_TIMEOUT" in log.read_text():
                break
            time.sleep(0.2)
        waited = time.monotonic() - t0
        text = log.read_text()
        assert "CollectiveTimeoutError" in text or "a collective did not complete" in text, text[-3000:]
        assert f"LORAKIT_DIST_TIMEOUT={limit} s" in text
        assert limit - 1 <= waited <= limit + 90  # bounded by the variable, not by the suite's timeout
        os.kill(stopped, signal.SIGCONT)  # let torchrun's SIGTERM reach it
        assert proc.wait(timeout=90) != 0
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _workers(proc.pid):  # nothing outlives the test
            os.kill(pid, signal.SIGKILL)
