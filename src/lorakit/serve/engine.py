"""The continuous-batching engine: one loop, one running batch, each row with its own adapter.

::

    engine = Engine(model, tokenizer, AdapterPool(model, "adapters"), max_batch=16)
    engine.start()
    handle = engine.submit(prompt_ids, SamplingParams(max_tokens=32, temperature=0), "sql", sink)
    # sink(Event) is called from the engine thread: "token" events with text, then one "done" / "error"
    engine.shutdown(drain_timeout=30)

Every iteration (see :meth:`Engine._iterate`): run queued model commands (adapter loads and
unloads), drop cancelled rows, **admit** waiting requests up to ``max_batch`` (their adapters made
resident and given a bay, their prompts prefilled together, left-padded, one forward with each
row's adapter), then **decode one token for every running row** in one forward
(each row's adapter from :class:`.slots.AdapterBays`, the batch's adapters stacked once per layer;
per-row KV cache in :mod:`.kv`, each row's own position ids). A finished row (stop string, end of
sequence, ``max_tokens``) leaves at once; a long request never holds a short one back.
The engine imports no web framework.
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters_pool import AdapterEntry, AdapterPool
from .errors import InvalidRequestError, QueueFullError, ServeError, ShuttingDownError
from .kv import BatchCache, new_cache
from .sampling import SamplingParams, TextStream, sample
from .slots import AdapterBays

log = logging.getLogger("lorakit.serve")


@dataclass(frozen=True)
class Event:
    """What the engine tells a request's sink: ``token`` (text), then ``done`` or ``error``."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: ServeError | None = None


class NullMetrics:
    """The engine's metrics interface (see :class:`lorakit.serve.metrics.ServeMetrics`); records nothing."""

    def request_done(self, outcome: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> None: ...
    def ttft(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def step(self, rows: int, waiting: int, resident: int) -> None: ...
    def adapter(self, event: str, seconds: float) -> None: ...


@dataclass(eq=False)
class Handle:
    """One submitted request; ``cancel()`` it when the client goes away."""

    id: int
    prompt: list[int]
    params: SamplingParams
    entry: AdapterEntry | None
    sink: Callable[[Event], None]
    engine: Engine
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    finished: bool = False

    def cancel(self) -> None:
        self.engine.cancel(self)


@dataclass(eq=False)
class _Row:
    handle: Handle
    adapter: str                  # internal lorakit name, or "base"
    stream: TextStream
    gen: torch.Generator
    length: int                   # tokens of this row in the cache
    last: int = -1                # the token to feed next
    count: int = 0                # generated tokens
    t_last: float = 0.0


class Engine:
    """Continuous batching over one model (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer: Any, pool: AdapterPool, *, max_batch: int = 16,
                 max_queue: int = 256, max_context: int | None = None, metrics: Any = None,
                 threads: int | None = None) -> None:
        if max_batch < 1:
            raise InvalidRequestError(f"max_batch must be >= 1, got {max_batch}", param="max_batch")
        self.model, self.tokenizer, self.pool = model.eval(), tokenizer, pool
        self.max_batch, self.max_queue, self.threads = max_batch, max_queue, threads
        cfg = getattr(model, "config", None)
        self.max_context = max_context or int(getattr(cfg, "max_position_embeddings", 2048))
        self.metrics = metrics or NullMetrics()
        self.device = next(model.parameters()).device
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.eos = _eos_ids(model, tokenizer)
        params = inspect.signature(type(model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self._keep_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.waiting: deque[Handle] = deque()
        self.rows: list[_Row] = []
        self.kv = BatchCache()
        self.bays = AdapterBays(model, min(max_batch, pool.max_loaded))
        self.commands: deque[tuple[Callable[[], Any], cf.Future[Any]]] = deque()
        self.cv = threading.Condition()
        self.accepting = True
        self.stopping = False
        self.thread: threading.Thread | None = None
        self._ids = itertools.count(1)

    # --- API side (any thread) -----------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self.thread.start()

    def check_length(self, n_prompt: int, max_tokens: int, param: str = "prompt") -> None:
        if n_prompt < 1:
            raise InvalidRequestError(f"{param}: the prompt is empty", param=param)
        if n_prompt + max_tokens > self.max_context:
            raise InvalidRequestError(
                f"{param}: this model's maximum context length is {self.max_context} tokens; the request "
                f"has {n_prompt} prompt tokens + max_tokens {max_tokens} = {n_prompt + max_tokens}", param=param)

    def submit(self, prompt: Sequence[int], params: SamplingParams, adapter: str | None,
               sink: Callable[[Event], None]) -> Handle:
        """Queue a request (``adapter`` None: the base model); raises 404 / 429 / 503 / 400 errors."""
        self.check_length(len(prompt), params.max_tokens)
        if not self.accepting:
            raise ShuttingDownError("the server is shutting down", retry_after=5.0)
        entry = self.pool.pin(adapter) if adapter is not None else None
        with self.cv:
            if len(self.waiting) + len(self.rows) >= self.max_batch + self.max_queue:
                if entry is not None:
                    self.pool.unpin(entry)
                raise QueueFullError(f"{len(self.rows)} requests running and {len(self.waiting)} queued "
                                     f"(--max-batch {self.max_batch}, --max-queue {self.max_queue}); retry later",
                                     retry_after=1.0)
            h = Handle(next(self._ids), list(prompt), params, entry, sink, self)
            self.waiting.append(h)
            self.cv.notify()
        return h

    def cancel(self, h: Handle) -> None:
        with self.cv:
            h.cancelled = True
            self.cv.notify()

    def call(self, fn: Callable[[], Any]) -> cf.Future[Any]:
        """Run ``fn`` on the engine thread between two iterations (model changes: loads, unloads)."""
        fut: cf.Future[Any] = cf.Future()
        with self.cv:
            if self.thread is None or not self.thread.is_alive():
                fut.set_exception(ShuttingDownError("the engine is not running"))
                return fut
            self.commands.append((fn, fut))
            self.cv.notify()
        return fut

    def begin_drain(self) -> None:
        """Stop admitting new requests (503); running and queued ones go on."""
        self.accepting = False

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting, let in-flight requests finish for ``drain_timeout`` s, cancel the rest, stop."""
        self.begin_drain()
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and self.busy():
            time.sleep(0.02)
        with self.cv:
            self.stopping = True
            self.cv.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def busy(self) -> bool:
        with self.cv:
            return bool(self.waiting or self.rows)

    def stats(self) -> dict[str, int]:
        return {"running": len(self.rows), "waiting": len(self.waiting),
                "resident": len(self.pool.resident_names())}

    # --- engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self.cv:
                while not (self.commands or self.waiting or self.rows or self.stopping):
                    self.cv.wait()
                if self.stopping:
                    break
            try:
                with torch.no_grad():
                    self._iterate()
            except Exception as exc:  # noqa: BLE001 - a failed forward fails its rows, the server goes on
                log.exception("engine iteration failed")
                for r in self.rows:
                    self._end(r.handle, Event("error", error=ServeError(f"internal error: {exc}")), r.count)
                    self._release(r)
                self.rows, self.kv = [], BatchCache()
        self._cancel_all(ShuttingDownError("cancelled: the server shut down before this request finished"))

    def _iterate(self) -> None:
        if self.commands:
            while self.commands:
                fn, fut = self.commands.popleft()
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(exc)
            self.bays.sync()  # a load may have wrapped new modules
        self._drop_cancelled()
        self._admit()
        if self.rows:
            self._decode()
        self.metrics.step(len(self.rows), len(self.waiting), len(self.pool.resident_names()))

    def _drop_cancelled(self) -> None:
        with self.cv:
            for h in [h for h in self.waiting if h.cancelled]:
                self.waiting.remove(h)
                self._end(h, Event("done", finish_reason="cancelled"), 0)
        gone = [i for i, r in enumerate(self.rows) if r.handle.cancelled]
        if gone:
            for i in gone:
                r = self.rows[i]
                self._end(r.handle, Event("done", finish_reason="cancelled"), r.count)
                self._release(r)
            self._keep([i for i in range(len(self.rows)) if i not in set(gone)])

    def _admit(self) -> None:
        new: list[_Row] = []
        with self.cv:
            for h in list(self.waiting):
                if len(self.rows) + len(new) >= self.max_batch:
                    break
                try:
                    name = self.pool.ensure_resident(h.entry) if h.entry is not None else "base"
                    if name is None or (name != "base" and not self.bays.has_bay(name)):
                        continue  # every resident adapter / bay is busy: wait for a row to finish
                    if name != "base":
                        self.bays.acquire(name)
                except ServeError as exc:  # the files do not load, or a layer the batch cannot mix
                    self.waiting.remove(h)
                    self._end(h, Event("error", error=exc), 0)
                    continue
                self.waiting.remove(h)
                if h.entry is not None:
                    h.entry.rows += 1
                new.append(_Row(h, name, TextStream(self.tokenizer, h.params.stop), h.params.generator(),
                                len(h.prompt)))
        if new:
            self._prefill(new)

    def _forward(self, names: list[str], cache: Any, **kw: Any) -> tuple[torch.Tensor, Any]:
        """One forward, row i with adapter ``names[i]``: (last-position logits (rows, vocab) fp32, cache)."""
        kw[self._cache_kw] = cache
        with self.bays.rows(names, self.device):
            out = self.model(**kw, use_cache=True, **self._keep_kw)
        new = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        return out.logits[:, -1, :].float(), new

    def _prefill(self, rows: list[_Row]) -> None:
        lens = [len(r.handle.prompt) for r in rows]
        n = max(lens)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, n - lens[i]:] = torch.tensor(r.handle.prompt)
            mask[i, n - lens[i]:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        try:
            logits, cache = self._forward([r.adapter for r in rows], new_cache(), input_ids=ids,
                                          attention_mask=mask, position_ids=pos)
        except Exception as exc:  # noqa: BLE001 - the new rows are not in the batch yet: end them, the rest go on
            log.exception("prefill failed")
            for r in rows:
                self._end(r.handle, Event("error", error=ServeError(f"internal error: {exc}")), 0)
                self._release(r)
            return
        self.kv.add(cache, mask)
        self.rows.extend(rows)
        self._emit(logits, first=len(self.rows) - len(rows))

    def _decode(self) -> None:
        ids = torch.tensor([[r.last] for r in self.rows], dtype=torch.long, device=self.device)
        pos = torch.tensor([[r.length] for r in self.rows], dtype=torch.long, device=self.device)
        mask = self.kv.grow()
        logits, self.kv.cache = self._forward([r.adapter for r in self.rows], self.kv.cache, input_ids=ids,
                                              attention_mask=mask, position_ids=pos)
        for r in self.rows:
            r.length += 1
        self._emit(logits, first=0)

    def _emit(self, logits: torch.Tensor, first: int) -> None:
        """Sample rows ``first..`` from ``logits`` (one line per such row), stream, drop finished rows."""
        now = time.perf_counter()
        rows = self.rows[first:]
        greedy = torch.argmax(logits, dim=-1).tolist()
        done: set[int] = set()
        for j, r in enumerate(rows):
            p = r.handle.params
            tok = greedy[j] if p.greedy else sample(logits[j], p, r.gen)
            if r.count == 0:
                self.metrics.ttft(now - r.handle.submitted)
            else:
                self.metrics.inter_token(now - r.t_last)
            r.t_last, r.last = now, tok
            r.count += 1
            reason, delta = None, ""
            if r.handle.cancelled:  # the client left during this step: nothing more to send, whatever the token
                reason = "cancelled"
            elif tok in self.eos:
                reason, delta = "stop", r.stream.finish()
            else:
                delta, stopped = r.stream.push(tok)
                if stopped:
                    reason = "stop"
                elif r.count >= p.max_tokens:
                    reason = "length"
                    delta += r.stream.finish()
            if delta:
                r.handle.sink(Event("token", delta))
            if reason is not None:
                self._end(r.handle, Event("done", finish_reason=reason), r.count)
                self._release(r)
                done.add(first + j)
        if done:
            self._keep([i for i in range(len(self.rows)) if i not in done])

    def _keep(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        self.kv.keep(keep)

    def _release(self, r: _Row) -> None:
        e = r.handle.entry
        if e is not None:
            e.rows -= 1
            self.bays.release(r.adapter)

    def _end(self, h: Handle, ev: Event, count: int) -> None:
        """Send the final event once, unpin the adapter, record the outcome."""
        if h.finished:
            return
        h.finished = True
        if h.entry is not None:
            self.pool.unpin(h.entry)
        ev = Event(ev.kind, ev.text, ev.finish_reason, len(h.prompt), count, ev.error)
        outcome = ev.finish_reason if ev.kind == "done" else "error"
        self.metrics.request_done(outcome or "error", len(h.prompt), count, time.perf_counter() - h.submitted)
        try:
            h.sink(ev)
        except Exception:  # noqa: BLE001 - a broken sink must not stop the engine
            log.exception("request sink failed")

    def _cancel_all(self, err: ServeError) -> None:
        with self.cv:
            for h in list(self.waiting):
                self._end(h, Event("error", error=err), 0)
            self.waiting.clear()
        for r in self.rows:
            self._end(r.handle, Event("error", error=err), r.count)
            self._release(r)
        self.rows, self.kv = [], BatchCache()
        while self.commands:
            _, fut = self.commands.popleft()
            fut.set_exception(err)


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return ids


__all__ = ["Engine", "Event", "Handle", "NullMetrics"]
