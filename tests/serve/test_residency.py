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


def _stream(http: Any, body: dict[str, Any], chunks: list[str]) -> None:
    """Stream ``body``; every chunk with text appended to ``chunks`` as it arrives."""
    with http, http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = "".join(c.get("text") or "" for c in json.loads(line[6:]).get("choices", []))
                if chunk:
                    chunks.append(chunk)


def _wait(cond: Any, seconds: float = 30.0) -> bool:
    """Poll ``cond`` until true or ``seconds`` pass (a bound for a broken server, not a speed assumption)."""
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.005)
    return bool(cond())


def test_load_while_serving_stalls_others_no_longer_than_the_load(fresh: Any, reference: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A 0.6 s adapter load (API load, then an on-demand one) pauses two streaming requests once: it runs
    on the engine thread between two decode steps (no forward during it), both streams run before it and
    go on at the very next forward after it, each load is paid once; the streams' texts are unchanged.

    Checked on the engine's own record of forwards and loads, not on wall-clock gaps (those measure the
    machine's load: the timing belongs to benchmarks). The streams' decode waits at two points for the
    test's next request, so both loads fall inside the streams however fast or slow the machine.
    """
    engine = fresh.state.engine
    log: list[tuple[str, int]] = []  # engine thread: ("fwd" | "load+" | "load-", rows running)
    load = lorakit.load_adapter

    def slow_load(*a: Any, **kw: Any) -> Any:
        log.append(("load+", len(engine.rows)))
        time.sleep(0.6)
        try:
            return load(*a, **kw)
        finally:
            log.append(("load-", len(engine.rows)))

    # (min tokens of the 2 running streams, what the next step waits for): the API load, then c's request
    stages: list[list[Any]] = [[5, lambda: bool(engine.commands)], [None, lambda: bool(engine.waiting)]]
    holding = threading.Event()

    def hold(*_: Any) -> None:
        log.append(("fwd", len(engine.rows)))
        counts = [r.count for r in engine.rows]
        if stages and len(counts) == 2 and stages[0][0] is not None and min(counts) >= stages[0][0]:
            holding.set()
            assert _wait(stages[0][1])
            holding.clear()
            stages.pop(0)
            if stages:
                stages[0][0] = min(counts) + 1 + 3  # 3 more tokens each after the load's step

    monkeypatch.setattr(lorakit, "load_adapter", slow_load)
    with _http(fresh) as http:
        assert http.post("/v1/completions", json={"model": "a", "prompt": "w", "max_tokens": 1}).status_code == 200
        del log[:]
        hook = engine.model.register_forward_pre_hook(hold)
        try:
            bodies = [{"model": "a", "prompt": "keep streaming", "max_tokens": 60, "temperature": 0},
                      {"model": "toy", "prompt": "The quick brown fox", "max_tokens": 60, "temperature": 0}]
            chunks: list[list[str]] = [[], []]
            threads = [threading.Thread(target=_stream, args=(_http(fresh), b, c))
                       for b, c in zip(bodies, chunks, strict=True)]
            for t in threads:
                t.start()
            load_s0 = _metric(fresh, "lorakit_adapter_load_seconds_sum")
            assert _wait(holding.is_set)  # both streams have 5 tokens and wait
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "b2", "lora_path": "b"})
            assert r.status_code == 200, r.text
            assert _wait(lambda: len(stages) == 1 and holding.is_set())  # 3 tokens more each, waiting again
            # and one loaded on demand by a request (c, from the adapter directory)
            c = http.post("/v1/completions", json={"model": "c", "prompt": "q", "max_tokens": 2, "temperature": 0})
            assert c.status_code == 200
            for t in threads:
                t.join(timeout=60)
            loads = _metric(fresh, "lorakit_adapter_load_seconds_sum") - load_s0
        finally:
            hook.remove()
    assert loads >= 1.2  # both loads really took their 0.6 s
    starts = [i for i, (what, _) in enumerate(log) if what == "load+"]
    assert len(starts) == 2, log  # two loads, each paid once
    for i in starts:
        assert log[i][1] == 2 and log[i - 1] == ("fwd", 2), log[i - 3:i + 3]  # while both streams ran
        assert log[i + 1] == ("load-", 2), log[i - 3:i + 3]  # no forward during the load: the batch waits
        assert log[i + 2] == ("fwd", 2), log[i - 3:i + 3]  # the streams go on at the next step, nothing else
    assert not stages
    for got, body in zip(chunks, bodies, strict=True):
        want = reference.text(body["prompt"], None if body["model"] == "toy" else body["model"], 60)
        assert "".join(got) == want and len(got) >= 50


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
    gate = threading.Event()
    engine.call(gate.wait)  # all 8 are queued before any runs: they compete for the bay on every machine
    try:
        with _http(fresh) as http, ThreadPoolExecutor(len(jobs)) as ex:
            futs = [ex.submit(lambda j=j: http.post("/v1/completions", json={
                "model": j[1], "prompt": j[0], "max_tokens": j[2], "temperature": 0})) for j in jobs]
            assert _wait(lambda: engine.stats()["waiting"] == len(jobs)), engine.stats()
            gate.set()
            res = [f.result() for f in futs]
    finally:
        gate.set()
    for (prompt, model, n), r in zip(jobs, res, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == reference.text(prompt, None if model == "toy" else model, n)
    assert _metric(fresh, "lorakit_requests_total", outcome="error") == 0
    assert engine.bays.owner == [] and engine.bays.refs == {}
