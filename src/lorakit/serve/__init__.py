"""``lorakit serve``: one base model, many LoRA adapters, an OpenAI-compatible server.

* :mod:`.engine` — continuous batching (per-row KV cache, per-row adapters through
  :func:`lorakit.batch_adapters`); no web imports, usable without a socket.
* :mod:`.adapters_pool` — the adapter registry, LRU residency, path checks.
* :mod:`.sampling` — temperature / top-p / seed / stop strings, incremental detokenization.
* :mod:`.api`, :mod:`.schemas` — the FastAPI app and its pydantic request models.
* :mod:`.metrics` — Prometheus metrics; :mod:`.app` — options, model loading, uvicorn, SIGTERM.
* :mod:`.toy` — a tiny random Llama and random adapters for tests and trying it out.

The web modules need the ``serve`` extra (``pip install 'lorakit[serve]'``); this package's
``__init__`` imports none of them. See docs/serving.md.
"""

from .adapters_pool import AdapterPool
from .engine import Engine, Event
from .errors import ServeError
from .sampling import SamplingParams

__all__ = ["AdapterPool", "Engine", "Event", "SamplingParams", "ServeError"]
