"""``lorakit serve`` as a process: TOML config, bind address, SIGTERM drains and exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(toy: Path, tmp_path: Path, **extra: object) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    cfg = {"model": str(toy / "model"), "adapter-dir": str(toy / "adapters"), "port": port, "max-batch": 2,
           "log-level": "warning", "threads": 1, **extra}
    lines = [f"{k} = {json.dumps(v)}" for k, v in cfg.items()]
    (tmp_path / "serve.toml").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--config", str(tmp_path / "serve.toml")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def _wait_up(proc: subprocess.Popen[bytes], url: str) -> bool:
    """True once /health answers; False if the server could not bind its port (taken since ``_free_port``)."""
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode()  # type: ignore[union-attr]
            if "address already in use" in out.lower():
                return False
            pytest.fail(f"server exited {proc.returncode}: {out[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            time.sleep(0.1)
    pytest.fail("server did not come up")


def _start_up(toy: Path, tmp_path: Path, **extra: object) -> tuple[subprocess.Popen[bytes], str]:
    """A started server; another free port if another process took the first between the probe and the bind."""
    for _ in range(3):
        proc, url = _start(toy, tmp_path, **extra)
        try:
            if _wait_up(proc, url):
                return proc, url
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    pytest.fail("three free ports were taken before the server bound them")


@pytest.mark.slow
def test_sigterm_finishes_running_stream_then_exits_0(toy: Path, tmp_path: Path) -> None:
    """A stream running at SIGTERM ends with a final event and [DONE]; new requests are refused; exit 0.

    Drain 0 s: the running request is cancelled with an error event naming the shutdown. Greedy: a
    sampled end-of-sequence would end it as "stop" before the signal.
    """
    import httpx

    proc, url = _start_up(toy, tmp_path, **{"drain-timeout": 0.0, "max-tokens-cap": 200})
    try:
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "model"
        events: list[str] = []
        with httpx.stream("POST", url + "/v1/completions", timeout=30,
                          json={"model": "a", "prompt": "go", "max_tokens": 200, "temperature": 0,
                                "stream": True}) as r:
            lines = (ln for ln in r.iter_lines() if ln.startswith("data: "))
            events.append(next(lines))
            proc.send_signal(signal.SIGTERM)
            events.extend(lines)
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][6:])
        # either it finished within the (zero) drain or it was cancelled with a clear error event
        assert last.get("error", {}).get("code") == "shutting_down" or last["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
