"""Adapter residency under load, on a fresh real server per test (uvicorn on a free localhost port):
a load while serving stalls the other requests no longer than the load, LRU eviction and reload on
demand are counted in ``/metrics``, and with fewer adapter bays than adapters requests wait (never fail).
Texts are checked against PEFT's ``generate`` alone (``conftest.Reference``)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import lorakit

KEY = "residency-key"


@pytest.fixture
def fresh(toy: Path, tmp_path: Path) -> Iterator[Any]:
    """A new server: no start-up adapters, 2 resident at most, batch 4; adapters a-d copied to its own dir."""
    from lorakit.serve.app import ServeConfig, ServerThread, build_state

    adir = tmp_path / "adapters"
    shutil.copytree(toy / "adapters", adir)
    cfg = ServeConfig(model=str(toy / "model"), adapter_dir=str(adir), max_loaded=2, max_batch=4, max_queue=32,
                      max_tokens_cap=64, api_key=KEY, served_model_name="toy")
    with ServerThread(build_state(cfg)) as srv:
        yield srv


def _http(srv: Any) -> Any:
    import httpx

    return httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def _metric(srv: Any, name: str, **labels: str) -> float:
    return srv.state.metrics.value(name, labels) or 0.0


def _slow(srv: Any, seconds: float = 0.02) -> Any:
    """Every model forward takes >= ``seconds`` (a request stays in flight long enough to overlap)."""
    return srv.state.engine.model.register_forward_pre_hook(lambda *a: time.sleep(seconds))


def _stream_times(http: Any, body: dict[str, Any], times: list[float], out: dict[str, Any]) -> None:
    """Stream ``body``; the arrival time of every chunk with text, the whole text into ``out``."""
    text = []
    with http, http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = "".join(c.get("text") or "" for c in json.loads(line[6:]).get("choices", []))
                if chunk:
                    times.append(time.perf_counter())
                    text.append(chunk)
    out["text"] = "".join(text)


def test_load_while_serving_stalls_others_no_longer_than_the_load(fresh: Any, reference: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A 0.6 s adapter load (API load, then an on-demand one) pauses two streaming requests once, by at
    most the load's own time (+ one step's slack); the streams' texts are unchanged."""
    load = lorakit.load_adapter

    def slow_load(*a: Any, **kw: Any) -> Any:
        time.sleep(0.6)
        return load(*a, **kw)

    monkeypatch.setattr(lorakit, "load_adapter", slow_load)
    hook = _slow(fresh)
    try:
        with _http(fresh) as http:
            assert http.post("/v1/completions", json={"model": "a", "prompt": "w", "max_tokens": 1}).status_code == 200
            bodies = [{"model": "a", "prompt": "keep streaming", "max_tokens": 60, "temperature": 0},
                      {"model": "toy", "prompt": "The quick brown fox", "max_tokens": 60, "temperature": 0}]
            times: list[list[float]] = [[], []]
            outs: list[dict[str, Any]] = [{}, {}]
            threads = [threading.Thread(target=_stream_times, args=(_http(fresh), b, t, o))
                       for b, t, o in zip(bodies, times, outs, strict=True)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 10
            while min(len(t) for t in times) < 5 and time.monotonic() < deadline:
                time.sleep(0.005)
            load_s0 = _metric(fresh, "lorakit_adapter_load_seconds_sum")
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "b2", "lora_path": "b"})
            assert r.status_code == 200, r.text
            seen, deadline = [len(t) for t in times], time.monotonic() + 10
            while min(len(t) - n for t, n in zip(times, seen, strict=True)) < 3 and time.monotonic() < deadline:
                time.sleep(0.005)  # both streams go on before the next load
            # and one loaded on demand by a request (c, from the adapter directory)
            c = http.post("/v1/completions", json={"model": "c", "prompt": "q", "max_tokens": 2, "temperature": 0})
            assert c.status_code == 200
            for t in threads:
                t.join(timeout=60)
            loads = _metric(fresh, "lorakit_adapter_load_seconds_sum") - load_s0
    finally:
        hook.remove()
    assert loads >= 1.2  # both loads really took their 0.6 s
    for ts, body, out in zip(times, bodies, outs, strict=True):
        gaps = sorted(b - a for a, b in zip(ts, ts[1:], strict=False))
        assert len(ts) >= 50
        assert gaps[-1] >= 0.55, gaps[-3:]  # the loads happened while this request was streaming
        assert gaps[-1] <= 0.6 + 0.35, gaps[-3:]  # ...and stalled it by one load, not more
        assert sum(g >= 0.55 for g in gaps) <= 2  # two loads, each paid once
        assert sum(gaps[:-2]) / (len(gaps) - 2) < 0.2  # the rest streamed at decoding speed
        want = reference.text(body["prompt"], None if body["model"] == "toy" else body["model"], 60)
        assert out["text"] == want


def test_lru_eviction_and_reload_on_demand_counted_in_metrics(fresh: Any, reference: Any) -> None:
    """--max-loaded 2: a, b, a, c evicts b (least recently used, not a: first loaded); b again reloads it
    (evicting c); every text equals PEFT's for that adapter, the reloaded b's included."""
    steps = [("a", 1, 0), ("b", 2, 0), ("a", 2, 0), ("c", 3, 1), ("a", 3, 1), ("b", 4, 2), ("b", 4, 2), ("a", 4, 2)]
    with _http(fresh) as http:
        for model, loads, evicts in steps:
            r = http.post("/v1/completions", json={"model": model, "prompt": "lru " + model, "max_tokens": 12,
                                                   "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == reference.text("lru " + model, model, 12), model
            assert _metric(fresh, "lorakit_adapter_events_total", event="load") == loads, model
            assert _metric(fresh, "lorakit_adapter_events_total", event="evict") == evicts, model
            assert _metric(fresh, "lorakit_adapters_resident") == min(loads, 2)
        text = http.get("/metrics").text
    assert 'lorakit_adapter_events_total{event="evict"} 2.0' in text
    assert 'lorakit_adapter_events_total{event="load"} 4.0' in text
    assert fresh.state.pool.resident_names() == ["b", "a"]  # LRU order, oldest first


def test_fewer_bays_than_adapters_requests_wait_not_fail(fresh: Any, reference: Any) -> None:
    """One adapter bay (so one adapter at a time in the batch): 8 concurrent requests over a, b, base all
    complete with PEFT's text; none ends as an error (the rows wait until the bay frees)."""
    from lorakit.serve.slots import AdapterBays

    engine = fresh.state.engine
    done = threading.Event()
    engine.call(lambda: setattr(engine, "bays", AdapterBays(engine.model, 1))).add_done_callback(
        lambda f: done.set())
    assert done.wait(10)
    jobs = [("one " * (i % 3 + 1), ["a", "b", "toy"][i % 3], 10 + i) for i in range(8)]
    hook = _slow(fresh, 0.01)
    try:
        with _http(fresh) as http, ThreadPoolExecutor(len(jobs)) as ex:
            res = list(ex.map(lambda j: http.post("/v1/completions", json={
                "model": j[1], "prompt": j[0], "max_tokens": j[2], "temperature": 0}), jobs))
    finally:
        hook.remove()
    for (prompt, model, n), r in zip(jobs, res, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == reference.text(prompt, None if model == "toy" else model, n)
    assert _metric(fresh, "lorakit_requests_total", outcome="error") == 0
    assert engine.bays.owner == [] and engine.bays.refs == {}
