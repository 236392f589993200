"""The real server (uvicorn on localhost) through the official ``openai`` client and plain HTTP."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest

PROMPTS = [  # (prompt, model, max_tokens): different lengths, adapters, the base ("toy") and budgets
    ("hello there", "a", 20), ("x", "toy", 7), ("a much longer prompt, with more tokens in it", "b", 30),
    ("abc", "c", 12), ("short", "a", 25), ("zz top", "b", 5), ("q", "d", 17), ("The quick brown fox", "toy", 24),
    ("LoRA!", "c", 40), ("mixed batches", "d", 9),
]


def _metric(http: Any, name: str, labels: str = "") -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return float(line.split()[-1])
    return 0.0


def _wait(cond: Callable[[], bool], seconds: float = 30.0) -> bool:
    """Poll ``cond`` until true or ``seconds`` pass (a bound for a broken server, not a speed assumption)."""
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


@contextmanager
def _decode_held_until(engine: Any, cond: Callable[[], bool]) -> Iterator[None]:
    """Every model forward while rows run waits until ``cond()`` (at most 30 s): the running rows cannot
    finish before the test's next move, however fast or slow the machine."""
    def hold(*_: Any) -> None:
        if engine.rows:
            _wait(cond)

    h = engine.model.register_forward_pre_hook(hold)
    try:
        yield
    finally:
        h.remove()


def test_batching_equals_each_request_alone(server: Any, client: Any, http: Any, reference: Any) -> None:
    """10 concurrent greedy requests over 4 adapters + base (2 resident at a time) equal PEFT's generate alone.

    The engine is held until all 10 are queued (in PROMPTS order), so they run together whatever the
    machine's speed: the batches (and so the float rounding of every row) are the same on every run.
    """
    engine = server.state.engine
    rows0, count0 = _metric(http, "lorakit_batch_occupancy_sum"), _metric(http, "lorakit_batch_occupancy_count")
    evict0 = _metric(http, "lorakit_adapter_events_total", '{event="evict"}')

    def one(p: tuple[str, str, int]) -> tuple[str, str | None]:
        r = client.completions.create(model=p[1], prompt=p[0], max_tokens=p[2], temperature=0)
        return r.choices[0].text, r.choices[0].finish_reason

    gate = threading.Event()
    engine.call(gate.wait)
    try:
        with ThreadPoolExecutor(len(PROMPTS)) as ex:
            futs = []
            for i, p in enumerate(PROMPTS):
                futs.append(ex.submit(one, p))
                assert _wait(lambda i=i: engine.stats()["waiting"] == i + 1), engine.stats()
            gate.set()
            got = [f.result() for f in futs]
    finally:
        gate.set()
    for (prompt, model, n), (text, reason) in zip(PROMPTS, got, strict=True):
        want = reference.text(prompt, None if model == "toy" else model, n)
        assert text == want, (prompt, model)
        assert reason in ("length", "stop")
    # they really ran together: more than one row per iteration on average, and adapters were evicted
    rows = _metric(http, "lorakit_batch_occupancy_sum") - rows0
    count = _metric(http, "lorakit_batch_occupancy_count") - count0
    assert rows / count > 1.5
    assert _metric(http, "lorakit_adapter_events_total", '{event="evict"}') - evict0 >= 1
    assert len({t for t, _ in got}) == len(got)  # adapters change the text


def test_streaming_and_chat(client: Any, reference: Any) -> None:
    full = client.completions.create(model="b", prompt="stream me", max_tokens=20, temperature=0)
    parts = list(client.completions.create(model="b", prompt="stream me", max_tokens=20, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == full.choices[0].text == reference.text("stream me", "b", 20)
    assert parts[-1].choices[0].finish_reason == "length" and len(parts) > 5

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    chat = client.chat.completions.create(model="c", messages=msgs, max_tokens=15, temperature=0)
    assert chat.choices[0].message.content == reference.chat(msgs, "c", 15)
    assert chat.choices[0].message.role == "assistant"
    rendered = reference.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<s>system: be brief\n<s>user: hi there\n")  # the model's template was applied
    assert chat.usage.completion_tokens == 15
    assert chat.usage.prompt_tokens == len(rendered) - 2 * rendered.count("<s>")  # a token per char, <s> is one
    chunks = list(client.chat.completions.create(model="c", messages=msgs, max_tokens=15, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.total_tokens == chat.usage.total_tokens
    # max_tokens absent: chat runs to the cap (64) unless the model stops
    capped = client.chat.completions.create(model="c", messages=msgs, temperature=0)
    assert capped.usage.completion_tokens == 64 or capped.choices[0].finish_reason == "stop"


def test_sampling_seed_top_p_and_stop(client: Any) -> None:
    def text(**kw: Any) -> tuple[str, str | None]:
        r = client.completions.create(model="a", prompt="sample", max_tokens=24, **kw)
        return r.choices[0].text, r.choices[0].finish_reason

    greedy, _ = text(temperature=0)
    assert text(temperature=1.0, seed=7) == text(temperature=1.0, seed=7)
    assert len({text(temperature=1.0, seed=s)[0] for s in range(4)}) > 1
    assert text(temperature=1.0, top_p=1e-6, seed=3)[0] == greedy  # only the top token survives top-p
    stop = greedy[8:11]
    cut, reason = text(temperature=0, stop=[stop, "never-there"])
    assert cut == greedy[: greedy.index(stop)] and reason == "stop"
    streamed = client.completions.create(model="a", prompt="sample", max_tokens=24, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(p.choices[0].text for p in streamed) == cut


BAD = [  # (body, status, param)
    ('{"model": "a", "prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),
    ('{"model": "a", "prompt": "x", "temperature": "hot"}', 400, "temperature"),
    ('{"model": "a", "prompt": "x", "bogus": 1}', 400, "bogus"),
    ('{"model": "a", "prompt": "x"', 400, None),
    ('[1, 2]', 400, None),
    ('{"prompt": "x"}', 400, "model"),
    ('{"model": "nope", "prompt": "x"}', 404, "model"),
    ('{"model": "../model", "prompt": "x"}', 404, "model"),
    ('{"model": "a", "prompt": "x", "max_tokens": 65}', 400, "max_tokens"),
    ('{"model": "a", "prompt": "' + "y" * 250 + '", "max_tokens": 10}', 400, "prompt"),
    ('{"model": "a", "prompt": "x", "n": 2}', 400, "n"),
    ('{"model": "a", "prompt": "x", "temperature": 2.5}', 400, "temperature"),
    ('{"model": "a", "prompt": "x", "stop": ["1", "2", "3", "4", "5"]}', 400, None),
    ('{"model": "a", "prompt": [1000]}', 400, "prompt"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_requests_get_openai_errors(http: Any, body: str, status: int, param: str | None) -> None:
    r = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if param:
        assert param in err["message"]


def test_bad_chat_and_client_errors(client: Any, http: Any) -> None:
    import openai

    r = http.post("/v1/chat/completions", json={"model": "a", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = http.post("/v1/chat/completions", json={"model": "a", "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens"):
        client.chat.completions.create(model="a", messages=[{"role": "user", "content": "x"}],
                                       max_completion_tokens=1000)
    assert http.get("/v1/nowhere").json()["error"]["code"] == "not_found"
    # still serving
    assert client.completions.create(model="a", prompt="ok", max_tokens=3, temperature=0).usage.completion_tokens == 3


def test_auth(server: Any) -> None:
    import httpx
    import openai

    for path in ("/v1/models", "/metrics"):
        assert httpx.get(server.url + path).status_code == 401
        assert httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = httpx.post(server.url + "/v1/completions", json={"model": "a", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert server.url.startswith("http://127.0.0.1:")


def test_models_load_unload_and_paths(server: Any, client: Any, http: Any, toy: Any, tmp_path: Any) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "toy" and set("abcd") <= set(ids)
    adir = toy / "adapters"
    # path escapes: 403
    outside = tmp_path / "outside"
    shutil.copytree(adir / "b", outside)
    os.symlink(outside, adir / "link-out")
    (adir / "half").mkdir(exist_ok=True)
    shutil.copy(adir / "b" / "adapter_config.json", adir / "half")
    os.symlink(outside / "adapter_model.safetensors", adir / "half" / "adapter_model.safetensors")
    try:
        for path in (str(outside), "../model", "link-out", "half", "/etc"):
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": path})
            assert r.status_code == 403, (path, r.text)
            assert r.json()["error"]["param"] == "lora_path"
        assert http.post("/v1/completions", json={"model": "link-out", "prompt": "x"}).status_code == 404
    finally:
        os.unlink(adir / "link-out")
        shutil.rmtree(adir / "half")
    # load under a new name, use it, refuse duplicates, unload (409 while a request runs on it)
    want = client.completions.create(model="d", prompt="same weights", max_tokens=10, temperature=0).choices[0].text
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "my/adapter v2", "lora_path": "d"})
    assert r.status_code == 200, r.text
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "my/adapter v2", "lora_path": "d"}).status_code == 400
    assert "my/adapter v2" in [m.id for m in client.models.list().data]
    got = client.completions.create(model="my/adapter v2", prompt="same weights", max_tokens=10, temperature=0)
    assert got.choices[0].text == want
    # the stream's decode steps wait until the unload is queued: it runs while the row has tokens to go
    tried = threading.Event()
    engine = server.state.engine
    with _decode_held_until(engine, lambda: bool(engine.commands) or tried.is_set()):
        stream = client.completions.create(model="my/adapter v2", prompt="long", max_tokens=64, temperature=0,
                                           stream=True)
        it = iter(stream)
        next(it)
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "my/adapter v2"})
        tried.set()
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_in_use"
    rest = list(it)
    assert rest[-1].choices[0].finish_reason == "length"  # the running request is unaffected
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "my/adapter v2"}).status_code == 200
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "my/adapter v2"}).status_code == 404
    assert http.post("/v1/completions", json={"model": "my/adapter v2", "prompt": "x"}).status_code == 404
    bad = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "d", "extra": 1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "extra"


def test_broken_adapter_files_are_refused(http: Any, toy: Any) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    adir = toy / "adapters"
    for name, change in (("nan", "nan"), ("trunc", "truncate"), ("shape", "shape")):
        shutil.copytree(adir / "b", adir / name)
        f = adir / name / "adapter_model.safetensors"
        if change == "truncate":
            f.write_bytes(f.read_bytes()[:200])
        else:
            sd = load_file(f)
            k = sorted(sd)[0]
            sd[k] = torch.full_like(sd[k], float("nan")) if change == "nan" else torch.zeros(3, 3)
            save_file(sd, f)
        try:
            r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name})
            assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_load_failed", r.text
            r = http.post("/v1/completions", json={"model": name, "prompt": "x"})  # on demand: the same refusal
            assert r.status_code == 400, r.text
        finally:
            shutil.rmtree(adir / name)
    assert http.post("/v1/completions", json={"model": "b", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_disconnect_frees_row_and_queue_limit(server: Any, http: Any) -> None:
    """A streaming client that leaves frees its row (the row's decode waits until the server has seen the
    disconnect, so it cannot finish first); then the queue limit answers 429."""
    engine = server.state.engine
    cancelled = _metric(http, "lorakit_requests_total", '{outcome="cancelled"}')
    with _decode_held_until(engine, lambda: any(r.handle.cancelled for r in list(engine.rows))):
        with http.stream("POST", "/v1/completions", json={"model": "c", "prompt": "bye", "max_tokens": 64,
                                                          "temperature": 0, "stream": True}) as r:
            next(r.iter_lines())
        assert _wait(lambda: engine.stats()["running"] == 0)
    assert _metric(http, "lorakit_requests_total", '{outcome="cancelled"}') == cancelled + 1
    old = engine.max_batch, engine.max_queue
    engine.max_batch, engine.max_queue = 1, 1
    gate = threading.Event()
    engine.call(gate.wait)  # the engine waits: requests queue up
    try:
        with ThreadPoolExecutor(2) as ex:
            futs = [ex.submit(http.post, "/v1/completions", json={"model": "a", "prompt": "q", "max_tokens": 2})
                    for _ in range(2)]
            assert _wait(lambda: engine.stats()["waiting"] == 2), engine.stats()
            r = http.post("/v1/completions", json={"model": "a", "prompt": "q", "max_tokens": 2})
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
            gate.set()
            assert [f.result().status_code for f in futs] == [200, 200]
    finally:
        gate.set()
        engine.max_batch, engine.max_queue = old


def test_metrics_text(http: Any) -> None:
    text = http.get("/metrics").text
    for name in ("lorakit_requests_total", "lorakit_generated_tokens_total", "lorakit_batch_occupancy_bucket",
                 "lorakit_adapters_resident", "lorakit_queue_length", "lorakit_time_to_first_token_seconds_bucket",
                 "lorakit_inter_token_seconds_bucket", "lorakit_adapter_load_seconds_count"):
        assert name in text
    assert _metric(http, "lorakit_adapters_resident") <= 2
    assert json.loads(http.get("/health").text)["status"] == "ok"


def test_drain_refuses_new_requests_and_finishes_running(client: Any, http: Any, server: Any,
                                                         slow_engine: None) -> None:
    engine = server.state.engine
    stream = client.completions.create(model="b", prompt="finish me", max_tokens=30, temperature=0, stream=True)
    it = iter(stream)
    first = next(it)
    engine.begin_drain()
    try:
        r = http.post("/v1/completions", json={"model": "b", "prompt": "late", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["Retry-After"] and r.json()["error"]["code"] == "shutting_down"
        assert http.get("/health").status_code == 503
        rest = list(it)
        assert rest[-1].choices[0].finish_reason == "length"
        text = first.choices[0].text + "".join(p.choices[0].text for p in rest)
    finally:
        engine.accepting = True
    assert text == client.completions.create(model="b", prompt="finish me", max_tokens=30,
                                             temperature=0).choices[0].text


def test_non_streaming_disconnect_frees_row(server: Any, http: Any) -> None:
    """A non-streaming client that gives up frees its running row: deterministic, no timing race.

    Once the row runs, the engine is held inside its next decode forward until the server has seen
    the disconnect (the handle is cancelled), so the row cannot finish first however slow the machine.
    The held step's token is made an end-of-sequence token: a cancelled row still counts as cancelled
    (CI once sampled a real EOS there and counted the request as "stop"). The request is greedy: its
    first token (the prefill's, before any hold) is not a sampled EOS that would end it at once. The
    client (a raw socket) leaves once the row runs, not after a client timeout that a slow engine
    thread could outlast (the row then cancelled while still queued).
    """
    import socket

    engine = server.state.engine
    cancelled = _metric(http, "lorakit_requests_total", '{outcome="cancelled"}')
    gate = threading.Event()

    def hold(*_: Any) -> None:
        if engine.rows and not gate.is_set():  # a decode step (the prefill runs before the row joins)
            gate.wait(30)

    eos = engine.eos
    body = json.dumps({"model": "c", "prompt": "bye", "max_tokens": 64, "temperature": 0}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nAuthorization: {http.headers['Authorization']}"
            f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    hook = engine.model.register_forward_pre_hook(hold)
    try:
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(head + body)
            assert _wait(lambda: len(engine.rows) == 1), engine.stats()  # running, held in its first decode
        assert _wait(lambda: any(r.handle.cancelled for r in list(engine.rows)))
        assert [r.handle.cancelled for r in list(engine.rows)] == [True]  # seen while the row still runs
        engine.eos = set(range(engine.model.config.vocab_size))
    finally:
        gate.set()
        hook.remove()
    try:
        _wait(lambda: not engine.busy())
    finally:
        engine.eos = eos
    assert engine.stats()["running"] == engine.stats()["waiting"] == 0
    assert _metric(http, "lorakit_requests_total", '{outcome="cancelled"}') == cancelled + 1

