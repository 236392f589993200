"""Fixtures of the server tests: a tiny random Llama with three random adapters, the real server
(uvicorn on a free localhost port, in a thread), and greedy references from PEFT + transformers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

for mod in ("fastapi", "uvicorn", "httpx", "openai", "prometheus_client", "transformers"):
    pytest.importorskip(mod, reason=f"the server tests need {mod} (pip install 'lorakit[serve,dev]')")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

API_KEY = "test-key"
ADAPTERS = ("a", "b", "c", "d")


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lorakit.serve.toy import write_toy

    return write_toy(tmp_path_factory.mktemp("toy"), adapters=ADAPTERS)


@pytest.fixture(scope="session")
def server(toy: Path) -> Iterator[Any]:
    """max_batch 4, 2 resident adapters of 4 (so mixed batches evict), cap 64 tokens, context 256."""
    from lorakit.serve.app import ServeConfig, ServerThread, build_state

    cfg = ServeConfig(model=str(toy / "model"), adapter=[f"a={toy / 'adapters' / 'a'}"],
                      adapter_dir=str(toy / "adapters"), max_loaded=2, max_batch=4, max_queue=32,
                      max_tokens_cap=64, api_key=API_KEY, served_model_name="toy")
    with ServerThread(build_state(cfg)) as srv:
        yield srv


@pytest.fixture
def client(server: Any) -> Any:
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)


@pytest.fixture
def http(server: Any) -> Iterator[Any]:
    import httpx

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as c:
        yield c


class Reference:
    """Greedy text of one prompt alone: transformers ``generate`` on the base or a PEFT model."""

    def __init__(self, toy: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.toy = toy
        self.tok = AutoTokenizer.from_pretrained(toy / "model")
        self.base = AutoModelForCausalLM.from_pretrained(toy / "model").eval()
        self.models: dict[str | None, Any] = {None: self.base}

    def model(self, adapter: str | None) -> Any:
        if adapter not in self.models:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(self.toy / "model").eval()
            self.models[adapter] = PeftModel.from_pretrained(base, self.toy / "adapters" / str(adapter)).eval()
        return self.models[adapter]

    def ids(self, ids: list[int], adapter: str | None, max_tokens: int) -> list[int]:
        x = torch.tensor([ids])
        with torch.no_grad():
            out = self.model(adapter).generate(input_ids=x, attention_mask=torch.ones_like(x),
                                               max_new_tokens=max_tokens, do_sample=False)
        return out[0, x.shape[1]:].tolist()

    def text(self, prompt: str, adapter: str | None, max_tokens: int) -> str:
        return self.tok.decode(self.ids(self.tok(prompt)["input_ids"], adapter, max_tokens), skip_special_tokens=True)

    def chat(self, messages: list[dict[str, str]], adapter: str | None, max_tokens: int) -> str:
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return self.tok.decode(self.ids(ids, adapter, max_tokens), skip_special_tokens=True)


@pytest.fixture(scope="session")
def reference(toy: Path) -> Reference:
    pytest.importorskip("peft", reason="the greedy reference is PEFT's generate")
    return Reference(toy)


@pytest.fixture
def slow_engine(server: Any) -> Iterator[None]:
    """Every model forward takes >= 20 ms, so a request with 64 tokens stays in flight ~1.3 s."""
    import time

    h = server.state.engine.model.register_forward_pre_hook(lambda *a: time.sleep(0.02))
    try:
        yield
    finally:
        h.remove()


def peft_refs_and_bays(paths: dict[str, Path], *, seed: int = 3, n_bays: int = 3) -> tuple[Any, dict[str, Any], Any]:
    """A tiny Llama (``seed``) holding every adapter of ``paths`` by name, PEFT's model for each adapter alone
    (plus ``"base"``: the model without any), and the model's :class:`AdapterBays`."""
    import peft

    import lorakit
    from lorakit.serve.slots import AdapterBays
    from lorakit.serve.toy import tiny_llama

    refs: dict[str, Any] = {"base": tiny_llama(seed=seed)}
    for n, p in paths.items():
        refs[n] = peft.PeftModel.from_pretrained(tiny_llama(seed=seed), p).eval()
    model = tiny_llama(seed=seed)
    for n, p in paths.items():
        lorakit.load_adapter(model, p, name=n)
    return model, refs, AdapterBays(model, n_bays=n_bays)
