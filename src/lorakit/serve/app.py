"""``lorakit serve``: options, model loading, and running the app under uvicorn.

::

    lorakit serve --model smollm2 --adapter sql=adapters/sql --adapter-dir adapters --max-loaded 8
    lorakit serve --config serve.toml          # the same names as keys, like lorakit train

Binds 127.0.0.1 unless ``--host`` says otherwise. SIGTERM (or Ctrl-C): new requests get 503, running
ones finish for up to ``--drain-timeout`` seconds, the rest end with an error event; exit status 0.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from lorakit.train.config import BaseConfig, opt
from lorakit.train.errors import TrainConfigError

log = logging.getLogger("lorakit.serve")


@dataclass
class ServeConfig(BaseConfig):
    """Options of ``lorakit serve``."""

    model: str = opt("smollm2", "preset (smollm2) or a causal-LM model directory (config.json + weights)")
    adapter: list[str] = opt([], "adapters loaded at start-up, NAME=PATH each (trusted paths)")
    adapter_dir: str | None = opt(None, "directory of adapter sub-directories: loaded on demand when a request "
                                        "names one, and the only place /v1/load_lora_adapter may read from")
    max_loaded: int = opt(8, "adapters resident on the model at once (least recently used evicted)", lo=1)
    host: str = opt("127.0.0.1", "address to bind (0.0.0.0 exposes the server to the network)")
    port: int = opt(8000, "TCP port (0: any free port)", lo=0, hi=65535)
    api_key: str | None = opt(None, "require 'Authorization: Bearer KEY' on every endpoint but /health "
                                    "(default: $LORAKIT_API_KEY if set)")
    max_batch: int = opt(16, "rows decoded together per engine iteration", lo=1)
    max_queue: int = opt(256, "requests waiting beyond the batch before 429", lo=0)
    max_tokens_cap: int = opt(512, "largest max_tokens a request may ask for", lo=1)
    max_context: int | None = opt(None, "prompt + max_tokens limit (default: the model's max_position_embeddings)",
                                  lo=1)
    served_model_name: str | None = opt(None, "the base model's id in the API (default: --model's name)")
    threads: int | None = opt(None, "torch threads of the engine (default: torch's)", lo=1)
    device: str = opt("auto", "cpu, cuda or auto (cuda when available)")
    dtype: str = opt("auto", "weights' dtype: auto (fp32 on CPU, bf16 on GPU), fp32, bf16, fp16",
                     choices=("auto", "fp32", "bf16", "fp16"))
    drain_timeout: float = opt(30.0, "seconds in-flight requests may run on after SIGTERM", lo=0.0)
    log_level: str = opt("info", "uvicorn log level", choices=("critical", "error", "warning", "info", "debug"))

    def validate(self) -> None:
        super().validate()
        for spec in self.adapter:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise TrainConfigError(f"--adapter: {spec!r} is not NAME=PATH")

    def adapters(self) -> list[tuple[str, str]]:
        return [(s.partition("=")[0], s.partition("=")[2]) for s in self.adapter]


def load_base(cfg: ServeConfig) -> tuple[Any, Any]:
    """(model, tokenizer) for ``--model``, on ``--device`` in ``--dtype``, eval mode."""
    import torch

    from lorakit.train.models import load_model, load_tokenizer, resolve

    src = resolve(cfg.model)
    tok = load_tokenizer(src)
    model = load_model(src, "generation")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        cfg.dtype, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    return model.to(device=device, dtype=dtype).eval(), tok


def build_state(cfg: ServeConfig, model: Any = None, tokenizer: Any = None) -> Any:
    """Everything but the socket: pool (start-up adapters loaded), metrics, engine (started), app state."""
    from .adapters_pool import AdapterPool
    from .api import ServerState
    from .engine import Engine
    from .metrics import ServeMetrics

    if model is None:
        model, tokenizer = load_base(cfg)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    metrics = ServeMetrics(cfg.max_batch)
    pool = AdapterPool(model, cfg.adapter_dir, cfg.max_loaded, on_change=metrics.adapter)
    for name, path in cfg.adapters():
        if not (Path(path) / "adapter_config.json").is_file():
            raise TrainConfigError(f"--adapter {name}={path}: no adapter directory (adapter_config.json) there")
        pool.register(name, path, trusted=True, source="startup")
    for name in pool.names()[: cfg.max_loaded]:
        pool.ensure_resident(pool.entries[name])
    engine = Engine(model, tokenizer, pool, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                    max_context=cfg.max_context, metrics=metrics, threads=cfg.threads)
    engine.start()
    base = cfg.served_model_name or Path(cfg.model.rstrip("/")).name
    key = cfg.api_key if cfg.api_key is not None else os.environ.get("LORAKIT_API_KEY") or None
    return ServerState(engine, pool, metrics, tokenizer, base, key, cfg.max_tokens_cap)


def _uvicorn_server(state: Any, cfg: ServeConfig) -> Any:
    import uvicorn

    from .api import create_app

    class Server(uvicorn.Server):
        """uvicorn, but SIGTERM drains the engine first and the process then exits 0 (no re-raised signal)."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if not self.should_exit:
                log.info("signal %s: draining (up to %.0f s)", sig, cfg.drain_timeout)
                state.engine.begin_drain()
                threading.Thread(target=state.engine.shutdown, args=(cfg.drain_timeout,), daemon=True).start()
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    config = uvicorn.Config(create_app(state), host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                            timeout_graceful_shutdown=int(cfg.drain_timeout) + 5, access_log=False)
    return Server(config)


def run(cfg: ServeConfig) -> int:
    """Serve until SIGTERM / Ctrl-C; returns the exit status (0 after a graceful stop)."""
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = build_state(cfg)
    server = _uvicorn_server(state, cfg)
    log.info("serving %s with adapters %s on http://%s:%d", state.base_name, state.pool.available(), cfg.host,
             cfg.port)
    server.run()
    state.engine.shutdown(0)
    return 0


class ServerThread:
    """The real server on a local port in a background thread (tests, notebooks)::

        with ServerThread(state) as srv:
            httpx.get(srv.url + "/health")
    """

    def __init__(self, state: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.state = state
        cfg = ServeConfig(host=host, port=port, log_level="warning", drain_timeout=5.0)
        self.server = _uvicorn_server(state, cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.state.engine.shutdown(0)
