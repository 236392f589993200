"""Mixed-adapter batches (issue 6): each row its own adapter in one forward, training and generate."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.adapters.batched import plan_rows

NAMES = ["default", "b", "base", "c", "b", "default", "c", "b"]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 20)
        self.fc2 = nn.Linear(20, 20)
        self.head = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    model = lorakit.inject(MLP(), LoraConfig(r=4, alpha=8, targets=["fc1", "fc2", "head"], init="random"))
    lorakit.add_adapter(model, "b", LoraConfig(r=2, alpha=3, targets=["fc2"], init="random"))
    lorakit.add_adapter(model, "c", LoraConfig(r=6, alpha=6, targets=["fc1", "head"], init="random"))
    return model


def per_row(model: nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    rows = []
    for i, n in enumerate(names):
        if n == "base":
            with lorakit.disable_adapters(model):
                rows.append(model(x[i:i + 1]))
        else:
            with lorakit.use_adapter(model, n):
                rows.append(model(x[i:i + 1]))
    return torch.cat(rows)


def mixed_and_separate_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor
                             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Gradients of a squared-error step over the NAMES batch: mixed in one backward, and each
    adapter trained on its own rows alone (all three adapters active and trainable)."""
    lorakit.set_adapter(model, ["default", "b", "c"])
    with lorakit.batch_adapters(model, NAMES):
        ((model(x) - y) ** 2).sum().backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for name in ["default", "b", "c"]:
        rows = [i for i, n in enumerate(NAMES) if n == name]
        with lorakit.use_adapter(model, name):
            ((model(x[rows]) - y[rows]) ** 2).sum().backward()
    separate = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return mixed, separate


def test_plan_rows_contiguous_and_scattered() -> None:
    p = plan_rows(["a", "a", "b", "b"], ("a", "b"), torch.device("cpu"))
    assert p is not None and p.gather is None and p.m == 2
    p = plan_rows(["b", "base", "a", "b"], ("a", "b"), torch.device("cpu"))
    assert p is not None and p.groups == ("a", "b") and p.m == 2
    assert p.gather.tolist() == [2, 2, 0, 3] and p.src.tolist() == [0, 2, 3] and p.dst.tolist() == [2, 0, 3]
    assert plan_rows(["base"], ("a",), torch.device("cpu")) is None


def test_mixed_rows_equal_single_rows_mlp() -> None:
    model = mlp()
    x = torch.randn(len(NAMES), 3, 12)
    want = per_row(model, x, NAMES)
    with torch.no_grad(), lorakit.batch_adapters(model, NAMES):
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # merged model: unmerged for the block, re-merged after, same results
    lorakit.merge(model)
    with torch.no_grad(), lorakit.batch_adapters(model, NAMES):
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
    assert model.fc1.merged


def test_mixed_batch_gradients_equal_separate_training() -> None:
    mixed, separate = mixed_and_separate_grads(mlp(), torch.randn(len(NAMES), 12), torch.randn(len(NAMES), 5))
    assert set(mixed) == set(separate) and len(mixed) == 2 * (3 + 1 + 2)
    for n in mixed:
        torch.testing.assert_close(mixed[n], separate[n], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    model = transformers.LlamaForCausalLM(cfg).eval()
    lorakit.inject(model, LoraConfig(r=8, alpha=16, targets="all-linear", init="random"))
    lorakit.add_adapter(model, "b", LoraConfig(r=4, alpha=4, targets=["q_proj", "v_proj"], init="random"))
    lorakit.add_adapter(model, "c", LoraConfig(r=16, alpha=8, targets=["down_proj", "o_proj"], init="random"))
    with torch.no_grad():  # make the adapters matter
        for _, layer in lorakit.lora_layers(model):
            for s in layer._lora_slots.values():
                s.B.mul_(20)
    return model


LNAMES = ["b", "default", "base", "c"]


def test_llama_forward_and_kwarg_path(llama: nn.Module) -> None:
    ids = torch.randint(0, 100, (4, 9))
    want = torch.cat([_row_logits(llama, ids[i:i + 1], n) for i, n in enumerate(LNAMES)])
    with torch.no_grad(), lorakit.batch_adapters(llama, LNAMES):
        got = llama(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(llama(ids, adapter_names=LNAMES).logits, want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(llama(ids).logits, want, atol=1e-3)  # the hook is gone afterwards


def _row_logits(model: nn.Module, ids: torch.Tensor, name: str) -> torch.Tensor:
    with torch.no_grad():
        if name == "base":
            with lorakit.disable_adapters(model):
                return model(ids).logits
        with lorakit.use_adapter(model, name):
            return model(ids).logits


def _row_generate(model: nn.Module, ids: torch.Tensor, name: str, **kw: object) -> torch.Tensor:
    if name == "base":
        with lorakit.disable_adapters(model):
            return model.generate(ids, **kw)
    with lorakit.use_adapter(model, name):
        return model.generate(ids, **kw)


@pytest.mark.parametrize("beams", [1, 2])
def test_llama_generate_mixed(llama: nn.Module, beams: int) -> None:
    torch.manual_seed(1)
    ids = torch.randint(1, 100, (4, 5))
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=beams, pad_token_id=0)
    want = torch.cat([_row_generate(llama, ids[i:i + 1], n, **kw) for i, n in enumerate(LNAMES)])
    with lorakit.batch_adapters(llama, LNAMES):
        got = llama.generate(ids, **kw)
    assert torch.equal(got, want)
    assert torch.equal(llama.generate(ids, adapter_names=LNAMES, **kw), want)


def test_llama_mixed_train_step(llama: nn.Module) -> None:
    model = copy.deepcopy(llama).train()
    lorakit.set_adapter(model, ["default", "b", "c"])
    ids = torch.randint(0, 100, (4, 7))
    with lorakit.batch_adapters(model, LNAMES):
        model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(("lora_" in n) for n in grads)
    assert any(n.endswith(".b") for n in grads) and any(n.endswith(".c") for n in grads)


# --- both strategies (grouped rows for short rows, per-row weights for long ones), caching ----------
@pytest.mark.parametrize("tokens", [1, 3, 10])
def test_mixed_rows_equal_single_rows_any_length(tokens: int) -> None:
    model = mlp()
    x = torch.randn(len(NAMES), tokens, 12)
    want = per_row(model, x, NAMES)
    with torch.no_grad(), lorakit.batch_adapters(model, NAMES):
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
    with lorakit.batch_adapters(model, NAMES):  # grad mode, frozen adapters: out of place
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
    grouped = ["b", "b", "c", "c"]  # contiguous equal groups: no gather / scatter
    want = per_row(model, x[:4], grouped)
    with torch.no_grad(), lorakit.batch_adapters(model, grouped):
        torch.testing.assert_close(model(x[:4]), want, rtol=1e-5, atol=1e-6)


def test_mixed_long_rows_gradients_equal_separate_training() -> None:
    mixed, separate = mixed_and_separate_grads(mlp(), torch.randn(len(NAMES), 9, 12),
                                               torch.randn(len(NAMES), 9, 5))
    assert set(mixed) == set(separate)
    for n in mixed:
        torch.testing.assert_close(mixed[n], separate[n], rtol=1e-5, atol=1e-5)


def test_cached_stacks_follow_optimizer_steps_and_restore_layers() -> None:
    model = mlp()
    x = torch.randn(len(NAMES), 2, 12)
    layer = model.fc2
    before = (layer.r, layer.scaling, layer.lora_dropout, layer.__dict__.get("_lora_sel"))
    with torch.no_grad(), lorakit.batch_adapters(model, NAMES):
        model(x)
        assert "forward" in layer.__dict__  # the block's per-layer forward
    assert "forward" not in layer.__dict__
    assert (layer.r, layer.scaling, layer.lora_dropout, layer.__dict__.get("_lora_sel")) == before
    # train "b" and "c" one SGD step (in-place updates of the Parameters) outside the block
    lorakit.set_adapter(model, ["b", "c"])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x).sum().backward()
    opt.step()
    lorakit.set_adapter(model, "default")
    with torch.no_grad(), lorakit.batch_adapters(model, NAMES):
        got = model(x)
    torch.testing.assert_close(got, per_row(model, x, NAMES), rtol=1e-5, atol=1e-6)
    # and inside one block, between two forwards
    with torch.no_grad(), lorakit.batch_adapters(model, NAMES):
        model(x)
        model.fc1.lora_named_A["c"].mul_(3)
        got = model(x)
    torch.testing.assert_close(got, per_row(model, x, NAMES), rtol=1e-5, atol=1e-6)


def test_nested_blocks_inner_names_win() -> None:
    model = mlp()
    x = torch.randn(4, 2, 12)
    outer, inner = ["b", "c", "base", "default"], ["c", "default", "b", "c"]
    want_outer, want_inner = per_row(model, x, outer), per_row(model, x, inner)
    with torch.no_grad(), lorakit.batch_adapters(model, outer):
        with lorakit.batch_adapters(model, inner):
            torch.testing.assert_close(model(x), want_inner, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x), want_outer, rtol=1e-5, atol=1e-6)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_one_adapter_on_every_row_uses_the_layer_forward() -> None:
    model = mlp()
    x = torch.randn(4, 10, 12)
    for name in ["b", "c", "default"]:
        with torch.no_grad(), lorakit.batch_adapters(model, [name] * 4):
            got = model(x)
        torch.testing.assert_close(got, per_row(model, x, [name] * 4), rtol=1e-5, atol=1e-6)
    assert model.fc2.scaling == 2.0 and lorakit.active_adapters(model) == ["default"]


# --- fused projections (MergedLinear) and embeddings --------------------------------------------
class Tok(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 12, padding_idx=0)
        self.qkv = nn.Linear(12, 36)
        self.head = nn.Linear(36, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.qkv(self.emb(ids))))


def tok() -> nn.Module:
    torch.manual_seed(0)
    fused = {"qkv": [True, False, True]}
    model = lorakit.inject(Tok(), LoraConfig(r=4, alpha=8, targets=["emb", "qkv", "head"], fused=fused,
                                             init="random"))
    lorakit.add_adapter(model, "b", LoraConfig(r=2, alpha=3, targets=["emb", "qkv"], fused=fused, init="random"))
    lorakit.add_adapter(model, "c", LoraConfig(r=6, alpha=6, targets=["qkv", "head"], fused=fused, init="random"))
    return model


@pytest.mark.parametrize("tokens", [1, 3, 10])
def test_mixed_merged_linear_and_embedding_equal_single_rows(tokens: int) -> None:
    from lorakit.layers import Embedding, MergedLinear
    model = tok()
    assert isinstance(model.qkv, MergedLinear) and isinstance(model.emb, Embedding)
    ids = torch.randint(0, 30, (len(NAMES), tokens))
    ids[:, 0] = 0  # padding_idx
    want = per_row(model, ids, NAMES)
    with torch.no_grad(), lorakit.batch_adapters(model, NAMES):
        torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-5)
    with lorakit.batch_adapters(model, NAMES):
        torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-5)
    lorakit.merge(model)
    with torch.no_grad(), lorakit.batch_adapters(model, NAMES):
        torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-5)
    assert model.qkv.merged and model.emb.merged
    for name in ["b", "c"]:  # one adapter on every row: the layers' own forwards, pointed at it
        want = per_row(model, ids, [name] * len(NAMES))
        with torch.no_grad(), lorakit.batch_adapters(model, [name] * len(NAMES)):
            torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [3, 10])
def test_mixed_merged_linear_and_embedding_gradients(tokens: int) -> None:
    ids = torch.randint(0, 30, (len(NAMES), tokens))
    ids[:, 0] = 0
    mixed, separate = mixed_and_separate_grads(tok(), ids, torch.randn(len(NAMES), tokens, 5))
    assert set(mixed) == set(separate) and any("emb.lora_named_A" in n for n in mixed)
    for n in mixed:
        torch.testing.assert_close(mixed[n], separate[n], rtol=1e-5, atol=1e-5)


def test_mixed_batch_refuses_convolutions() -> None:
    from lorakit.errors import MixedBatchError
    model = lorakit.inject(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()),
                           LoraConfig(r=2, alpha=2, targets=["0"], init="random"))
    with pytest.raises(MixedBatchError, match="Conv2d"):
        with lorakit.batch_adapters(model, ["default", "base"]):
            pass
    assert "forward" not in model[0].__dict__


def test_gpt2_fused_c_attn_forward_generate_and_train() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    fused = {"c_attn": [True, False, True]}
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["c_attn", "c_fc", "wte"], fused=fused, init="random"))
    lorakit.add_adapter(model, "b", LoraConfig(r=8, alpha=8, targets=["c_attn"], fused=fused, init="random"))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for s in layer._lora_slots.values():
                s.B.mul_(20)
    names = ["b", "default", "base", "b"]
    ids = torch.randint(1, 100, (4, 9))
    want = torch.cat([_row_logits(model, ids[i:i + 1], n) for i, n in enumerate(names)])
    with torch.no_grad(), lorakit.batch_adapters(model, names):
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    gen = torch.cat([_row_generate(model, ids[i:i + 1], n, **kw) for i, n in enumerate(names)])
    assert torch.equal(model.generate(ids, adapter_names=names, **kw), gen)
    train = copy.deepcopy(model).train()
    lorakit.set_adapter(train, ["default", "b"])
    with lorakit.batch_adapters(train, names):
        train(ids, labels=ids).loss.backward()
    assert train.transformer.h[0].attn.c_attn.lora_named_B["b"].grad.abs().sum() > 0


def test_mixed_training_with_dropout_runs_and_routes_gradients() -> None:
    torch.manual_seed(0)
    model = lorakit.inject(MLP(), LoraConfig(r=4, alpha=8, targets=["fc1", "fc2"], dropout=0.1, init="random"))
    lorakit.add_adapter(model, "b", LoraConfig(r=2, alpha=3, targets=["fc2"], dropout=0.3, init="random"))
    lorakit.set_adapter(model, ["default", "b"])
    model.train()
    names = ["default", "b", "base", "b"]
    for tokens in (2, 9):  # grouped rows, per-row weights
        model.zero_grad()
        with lorakit.batch_adapters(model, names):
            model(torch.randn(4, tokens, 12)).sum().backward()
        slots = model.fc2._lora_slots
        assert slots["b"].B.grad.abs().sum() > 0 and slots["default"].B.grad.abs().sum() > 0
    with lorakit.batch_adapters(model, ["base"] * 4):  # no row uses an adapter: nothing to train
        assert not model(torch.randn(4, 9, 12)).requires_grad
