"""DoRA adapters in the server's mixed batches (lorakit.serve.slots): each row equals PEFT's forward for
its adapter alone, DoRA rows next to plain-LoRA and base rows, decode- and prefill-sized; the greedy
text of a DoRA request served next to others equals PEFT ``generate`` alone; LoRA bias is refused."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

import lorakit

from .conftest import peft_refs_and_bays

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any], Any, dict[str, Path]]:
    from lorakit.serve.toy import random_adapter, tiny_llama

    root = tmp_path_factory.mktemp("bays-dora")
    base = tiny_llama(seed=3)
    paths = {"d": random_adapter(base, root / "d", r=4, seed=21, use_dora=True, targets=["q_proj", "down_proj",
                                                                                         "embed_tokens"]),
             "e": random_adapter(base, root / "e", r=8, seed=22, use_dora=True),
             "q": random_adapter(base, root / "q", r=8, seed=23)}
    return (*peft_refs_and_bays(paths), paths)


@pytest.mark.parametrize("t_len", [1, 12])
def test_dora_rows_equal_peft_row_by_row(setup: tuple[Any, ...], t_len: int) -> None:
    model, refs, bays, _ = setup
    names = ["d", "q", "base", "e", "d", "e"]
    for n in ("d", "q", "e"):
        bays.acquire(n)
    try:
        ids = torch.randint(3, 100, (len(names), t_len), generator=torch.Generator().manual_seed(t_len))
        with torch.no_grad(), bays.rows(names):
            got = model(input_ids=ids).logits
        with torch.no_grad():
            want = torch.cat([refs[n](input_ids=ids[i:i + 1]).logits for i, n in enumerate(names)])
            # the magnitudes matter: the same A/B as plain LoRA give other logits
            plain = refs["e"].base_model.model
            with refs["e"].disable_adapter():
                base_row = plain(input_ids=ids[3:4]).logits
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        assert not torch.allclose(want[3:4], base_row, atol=1e-3)
        with torch.no_grad(), bays.rows(["d", "d"]):  # every row one DoRA bay: the single-bay path
            torch.testing.assert_close(model(input_ids=ids[:2]).logits,
                                       refs["d"](input_ids=ids[:2]).logits, atol=2e-5, rtol=1e-4)
        bays.release("d")  # the last bay (e) moves into d's: its factors move with it
        with torch.no_grad(), bays.rows(["e", "q"]):
            torch.testing.assert_close(model(input_ids=ids[3:5]).logits,
                                       torch.cat([refs["e"](input_ids=ids[3:4]).logits,
                                                  refs["q"](input_ids=ids[4:5]).logits]), atol=2e-5, rtol=1e-4)
        bays.acquire("d")
    finally:
        for n in ("d", "q", "e"):
            bays.release(n)
    assert all(not any(st.dora) for st in bays.layers.values() if st.fac is not None)


def test_dora_request_served_next_to_others_equals_generate_alone(toy: Path, tmp_path: Path,
                                                                  reference: Any) -> None:
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from transformers import AutoModelForCausalLM

    from lorakit.serve.app import ServeConfig, ServerThread, build_state
    from lorakit.serve.toy import random_adapter

    adir = tmp_path / "adapters"
    shutil.copytree(toy / "adapters", adir)
    random_adapter(AutoModelForCausalLM.from_pretrained(toy / "model"), adir / "dora", seed=31, use_dora=True)
    cfg = ServeConfig(model=str(toy / "model"), adapter_dir=str(adir), max_loaded=3, max_batch=4, max_queue=32,
                      max_tokens_cap=64, served_model_name="toy")
    dora_ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy / "model"), adir / "dora")
    reference.models["dora-test"] = dora_ref.eval()  # reference.text(..., "dora-test") generates with it
    jobs = [("dora", "the quick brown", 24), ("a", "hello there", 20), ("dora", "a b", 16), (None, "xyz", 12)]
    with ServerThread(build_state(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        def one(job: tuple[str | None, str, int]) -> str:
            model, prompt, n = job
            r = http.post("/v1/completions", json={"model": model or "toy", "prompt": prompt, "max_tokens": n,
                                                   "temperature": 0})
            assert r.status_code == 200, r.text
            return str(r.json()["choices"][0]["text"])

        import threading

        engine, gate = srv.state.engine, threading.Event()
        engine.call(gate.wait)  # all 4 queue (in order) before any runs: the same batches on every machine
        try:
            with ThreadPoolExecutor(len(jobs)) as ex:
                futs = []
                for i, job in enumerate(jobs):
                    futs.append(ex.submit(one, job))
                    deadline = time.monotonic() + 30
                    while engine.stats()["waiting"] < i + 1 and time.monotonic() < deadline:
                        time.sleep(0.01)
                    assert engine.stats()["waiting"] == i + 1, engine.stats()
                gate.set()
                got = [f.result() for f in futs]
        finally:
            gate.set()
    want = [reference.text(p, "dora-test" if m == "dora" else m, n) for m, p, n in jobs]
    assert got == want
    assert want[0] != reference.text(jobs[0][1], None, jobs[0][2])  # the DoRA adapter changes the text


def test_lora_bias_adapter_is_refused_naming_the_layer(setup: tuple[Any, ...]) -> None:
    from lorakit.serve.errors import AdapterLoadError

    model, _, bays, _ = setup
    layer = dict(lorakit.lora_layers(model))["model.layers.0.mlp.down_proj"]
    slot = layer.__dict__["_lora_slots"]["q"]

    class _Bias:
        def describe(self) -> str:
            return "LoRA bias"

    slot.variant = _Bias()
    try:
        with pytest.raises(AdapterLoadError, match=r"adapter 'q': 'model.layers.0.mlp.down_proj' .* LoRA bias"):
            bays.acquire("q")
        assert "q" not in bays.refs and bays.owner == []
    finally:
        slot.variant = None
