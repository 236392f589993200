"""Adapter bays (lorakit.serve.slots): each row of a mixed batch equals PEFT's forward for that row alone.

Adapters of different ranks and targets (rank growth, layers an adapter lacks), base rows, decode-sized
(grouped, views) and prefill-sized (per-row weights) batches, a batch using a subset of the bays
(gathered), and the order after a bay is freed and the last one moves into its place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import lorakit

from .conftest import peft_refs_and_bays

peft = pytest.importorskip("peft")

SPECS = {"p": {"r": 4, "targets": ["q_proj", "v_proj"]}, "q": {"r": 8, "targets": "all-linear"},
         "s": {"r": 12, "targets": ["o_proj", "down_proj", "embed_tokens"]}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any], Any]:
    from lorakit.serve.toy import random_adapter, tiny_llama

    root = tmp_path_factory.mktemp("bays")
    base = tiny_llama(seed=3)
    paths = {n: random_adapter(base, Path(root) / n, seed=10 + i, **spec) for i, (n, spec) in enumerate(SPECS.items())}
    return peft_refs_and_bays(paths)


def _check(setup: tuple[Any, dict[str, Any], Any], names: list[str], t_len: int) -> None:
    model, refs, bays = setup
    ids = torch.randint(3, 100, (len(names), t_len), generator=torch.Generator().manual_seed(t_len))
    with torch.no_grad(), bays.rows(names):
        got = model(input_ids=ids).logits
    with torch.no_grad():
        want = torch.cat([refs[n](input_ids=ids[i:i + 1]).logits for i, n in enumerate(names)])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_bays_equal_peft_row_by_row(setup: tuple[Any, dict[str, Any], Any]) -> None:
    _, refs, bays = setup
    base_out = refs["base"](input_ids=torch.tensor([[5, 6, 7]])).logits
    assert not torch.allclose(base_out, refs["q"](input_ids=torch.tensor([[5, 6, 7]])).logits)  # adapters matter
    for n in ("p", "q", "q", "s"):  # rank 4, then 8 and 12: the stacks grow
        bays.acquire(n)
    assert bays.owner == ["p", "q", "s"]
    ranks = {st.name: st.rank() for st in bays.layers.values()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 8 and ranks["model.layers.0.mlp.down_proj"] == 12
    assert ranks["model.embed_tokens"] == 12  # the embedding path takes part too
    mixed = ["q", "base", "p", "s", "q", "p"]
    _check(setup, mixed, 1)   # decode: rows grouped by bay, views of bays 0..2
    _check(setup, mixed, 12)  # prefill: per-row weights
    _check(setup, ["s", "base", "s"], 1)  # a subset of the bays: gathered
    _check(setup, ["base", "base"], 4)    # no adapter at all: the base model
    bays.release("p")  # p's last row left: s moves into bay 0, bay 2 is zeroed
    assert bays.owner == ["s", "q"] and bays.refs == {"s": 1, "q": 2}
    _check(setup, ["q", "s", "q", "base"], 1)
    _check(setup, ["q", "s"], 9)
    bays.acquire("p")
    _check(setup, ["p", "q", "s"], 1)
    for n in ("p", "q", "q", "s"):
        bays.release(n)
    assert bays.owner == [] and all(not any(st.used) for st in bays.layers.values())


def test_a_reused_bay_keeps_nothing_of_its_last_adapter(setup: tuple[Any, dict[str, Any], Any]) -> None:
    """A freed bay is not zeroed at once: the next adapter's smaller rank and missing layers are."""
    _, _, bays = setup
    bays.acquire("s")    # r=12 on o_proj, down_proj, embed_tokens: bay 0
    bays.release("s")    # bay 0 keeps s's values
    bays.acquire("q")    # r=8, all-linear: o_proj / down_proj ranks 8..11 must be zero again, embed_tokens too
    st = {x.name: x for x in bays.layers.values()}
    assert st["model.layers.0.self_attn.o_proj"].rank() == 12 and st["model.embed_tokens"].stale == [False] * 4
    _check(setup, ["q", "base", "q"], 1)
    _check(setup, ["q", "q"], 10)
    bays.acquire("s")
    bays.release("q")    # s moves into bay 0; bay 1 keeps s's values
    bays.acquire("p")    # r=4 on q_proj / v_proj only: its bay's o_proj, down_proj and embedding are zeroed
    _check(setup, ["p", "s", "base"], 1)
    _check(setup, ["s", "p"], 9)
    bays.release("s")
    bays.release("p")


def test_rows_needs_acquired_adapters(setup: tuple[Any, dict[str, Any], Any]) -> None:
    from lorakit.serve.errors import AdapterLoadError

    model, _, bays = setup
    with pytest.raises(AdapterLoadError, match=r"\['q'\] have no bay"), bays.rows(["q"]):
        pass
    assert "forward" not in dict(lorakit.lora_layers(model))["model.layers.0.self_attn.q_proj"].__dict__
