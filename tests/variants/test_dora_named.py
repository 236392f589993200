"""DoRA with named adapters: two DoRA adapters (each its own magnitude) against the real PEFT in both
directions, set_adapter / merge / delete, and the refusals (several active DoRA adapters, combine)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.errors import AdapterMismatchError, UnsupportedModuleError
from lorakit.inject import lora_layers

from .test_dora import CASES, _perturb

peft = pytest.importorskip("peft", reason="peft is needed to compare DoRA with the reference implementation")

NAMED_CASES = ["mlp", "gpt2_conv1d", "embedding", "conv2d"]


def _peft_two(base: nn.Module, targets: list[str]) -> nn.Module:
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=5, target_modules=targets, use_dora=True, init_lora_weights=False), adapter_name="sql")
    pm.add_adapter("chat", peft.LoraConfig(r=3, lora_alpha=4, target_modules=targets, use_dora=True,
                                        init_lora_weights=False))
    _perturb(pm)  # both adapters: magnitudes off the norm, random B
    return pm


@pytest.mark.parametrize("case", NAMED_CASES)
def test_peft_two_dora_adapters_load_by_name_with_peft_outputs(case: str, tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(3)
    build, targets, inp = CASES[case]
    base = build()
    pm = _peft_two(base, targets).eval()
    pm.save_pretrained(tmp_path / "p", selected_adapters=["sql", "chat"])  # a -> p/a? PEFT: default dir + subdirs
    dirs = {n: (tmp_path / "p" / n if (tmp_path / "p" / n).is_dir() else tmp_path / "p") for n in ("sql", "chat")}
    ours = copy.deepcopy(base)
    lorakit.load_adapter(ours, dirs["sql"], name="sql")
    lorakit.load_adapter(ours, dirs["chat"], name="chat")
    ours.eval()
    x = inp()
    outs = {}
    for n in ("sql", "chat", "sql"):
        pm.set_adapter(n)
        lorakit.set_adapter(ours, n)
        want, got = pm(x), ours(x)
        assert (got - want).abs().max().item() < 1e-5, n
        outs[n] = got
    assert (outs["sql"] - outs["chat"]).abs().max().item() > 1e-2  # the two adapters really differ
    assert (outs["sql"] - base(x)).abs().max().item() > 1e-2
    lorakit.set_adapter(ours, "chat")
    lorakit.merge(ours)  # merged "chat": same outputs, switching re-merges with "sql"
    assert all(m.merged for _, m in lora_layers(ours))
    assert (ours(x) - outs["chat"]).abs().max().item() < 1e-5
    lorakit.set_adapter(ours, "sql")
    assert (ours(x) - outs["sql"]).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", NAMED_CASES)
def test_lorakit_named_dora_adapters_load_in_peft_with_our_outputs(case: str, tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(4)
    build, targets, inp = CASES[case]
    base = build()
    ours = lorakit.inject(copy.deepcopy(base), LoraConfig(r=2, alpha=5, targets=targets, use_dora=True))
    lorakit.add_adapter(ours, "b", LoraConfig(r=3, alpha=4, targets=targets, use_dora=True))
    _perturb(ours)
    with torch.no_grad():  # the named adapter's B too (_perturb matches "lora_B" only)
        for n, p in ours.named_parameters():
            if "lora_named_B" in n:
                p.normal_(0, 0.3)
    sd = ours.state_dict()
    assert any(".lora_named_magnitude.b" in k for k in sd)
    ours.eval()
    x = inp()
    want = {}
    for n in ("default", "b"):
        lorakit.set_adapter(ours, n)
        want[n] = ours(x)
        lorakit.save_adapter(ours, tmp_path / n, name=n)
    assert (want["default"] - want["b"]).abs().max().item() > 1e-2
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "default")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    pm.eval()
    for n in ("default", "b"):
        pm.set_adapter(n)
        assert (pm(x) - want[n]).abs().max().item() < 1e-5, n
    # a reload of the saved files by name gives the same outputs (lorakit -> lorakit)
    again = copy.deepcopy(base)
    lorakit.load_adapter(again, tmp_path / "b", name="b")
    assert (again.eval()(x) - want["b"]).abs().max().item() < 1e-6


def test_named_dora_initial_magnitude_is_the_norm_and_only_the_active_trains() -> None:
    torch.manual_seed(5)
    lin = nn.Sequential(nn.Linear(6, 5))
    model = lorakit.inject(copy.deepcopy(lin), LoraConfig(r=2, targets=["0"]))
    lorakit.add_adapter(model, "d", LoraConfig(r=2, targets=["0"], use_dora=True))
    layer = model[0]
    m = layer.lora_named_magnitude["d"]
    assert torch.allclose(m, lin[0].weight.norm(dim=1))  # B = 0: the norm of W0, as PEFT
    assert not m.requires_grad
    x = torch.randn(3, 6)
    lorakit.set_adapter(model, "d")
    assert m.requires_grad and not layer._parameters["lora_A"].requires_grad
    assert torch.allclose(model(x), lin(x), atol=1e-6)  # m = ||W0||, B = 0: the base output
    with torch.no_grad():
        m.mul_(1.5)
        layer.lora_named_B["d"].normal_()
    W0 = lin[0].weight.double()
    A, B = layer.lora_named_A["d"].double(), layer.lora_named_B["d"].double()
    full = W0 + layer.scaling * B @ A
    Wp = m.double()[:, None] * full / full.norm(dim=1, keepdim=True)
    want = x.double() @ Wp.t() + lin[0].bias.double()
    assert (model(x).double() - want).abs().max().item() < 1e-5
    lorakit.set_adapter(model, "default")  # the plain adapter: no DoRA on the layer
    assert lorakit.variant_of(layer) is None and not m.requires_grad
    lorakit.delete_adapter(model, "d")
    assert "d" not in layer.lora_named_magnitude


@pytest.mark.parametrize("case", NAMED_CASES)
def test_several_active_dora_adapters_sum_their_updates_as_peft(case: str, tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(8)
    build, targets, inp = CASES[case]
    base = build()
    pm = _peft_two(base, targets)
    pm.add_adapter("plain", peft.LoraConfig(r=2, lora_alpha=3, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".plain" in n and ("lora_B" in n or "lora_embedding_B" in n):
                p.normal_(0, 0.3)
    pm.eval()
    for n in ("sql", "chat", "plain"):
        d = tmp_path / n
        pm.save_pretrained(tmp_path, selected_adapters=[n])
        assert d.is_dir() or n == "default"
    ours = copy.deepcopy(base)
    for n in ("sql", "chat", "plain"):
        lorakit.load_adapter(ours, tmp_path / n, name=n)
    ours.eval()
    x = inp()
    for names in (["sql", "chat"], ["chat", "plain"], ["sql", "chat", "plain"]):
        pm.base_model.set_adapter(names)
        lorakit.set_adapter(ours, names)
        with torch.no_grad():
            want, got = pm(x), ours(x)
        assert (got - want).abs().max().item() < 1e-5, names
    with pytest.raises(UnsupportedModuleError, match="cannot be merged"):
        lorakit.merge(ours)
    assert not any(m.merged for _, m in lora_layers(ours))
    lorakit.set_adapter(ours, "chat")  # back to one adapter: merge works again
    pm.set_adapter("chat")
    lorakit.merge(ours)
    with torch.no_grad():
        assert (ours(x) - pm(x)).abs().max().item() < 1e-5
    with pytest.raises(UnsupportedModuleError, match="merged"):
        lorakit.set_adapter(ours, ["sql", "chat"])  # refused before anything changes
    assert lorakit.active_adapters(ours) == ["chat"]


def test_combine_of_dora_adapters_is_refused() -> None:
    model = lorakit.inject(nn.Sequential(nn.Linear(6, 6)), LoraConfig(r=2, targets=["0"], use_dora=True))
    lorakit.add_adapter(model, "b", LoraConfig(r=2, targets=["0"], use_dora=True))
    for method in ("linear", "cat", "svd", "ties"):
        with pytest.raises(UnsupportedModuleError, match="DoRA"):
            lorakit.combine(model, {"default": 1.0, "b": 1.0}, method=method, name="x", rank=2, density=0.5)
    assert lorakit.list_adapters(model) == ["default", "b"]


def _as_peft_file(path, use_dora: bool) -> None:  # noqa: ANN001
    """Rewrite a saved adapter as PEFT writes it (no lorakit metadata) with ``use_dora`` in its config."""
    import json

    from safetensors.torch import load_file, save_file

    save_file(load_file(path / "adapter_model.safetensors"), path / "adapter_model.safetensors")
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["use_dora"] = use_dora
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_named_file_magnitude_mismatch_is_refused(tmp_path) -> None:  # noqa: ANN001
    lin = nn.Sequential(nn.Linear(6, 5))
    src = lorakit.inject(copy.deepcopy(lin), LoraConfig(r=2, targets=["0"], use_dora=True))
    with torch.no_grad():
        src[0].lora_B.normal_()
        src[0].lora_magnitude_vector.mul_(1.3)
    lorakit.save_adapter(src, tmp_path / "d")
    _as_peft_file(tmp_path / "d", use_dora=True)
    plain = lorakit.inject(copy.deepcopy(lin), LoraConfig(r=2, targets=["0"]))
    lorakit.save_adapter(plain, tmp_path / "p")
    model = lorakit.inject(copy.deepcopy(lin), LoraConfig(r=2, targets=["0"]))
    lorakit.load_adapter(model, tmp_path / "d", name="x")
    lorakit.set_adapter(model, "x")
    x = torch.randn(2, 6)
    assert lorakit.variant_of(model[0]) is not None and torch.allclose(model(x), src(x), atol=1e-6)
    _as_peft_file(tmp_path / "p", use_dora=True)  # the config says DoRA, the file has no magnitude
    with pytest.raises(AdapterMismatchError, match="lora_magnitude_vector: missing"):
        lorakit.load_adapter(model, tmp_path / "p", name="y")
    _as_peft_file(tmp_path / "d", use_dora=False)  # a magnitude, but the config says plain LoRA
    with pytest.raises(AdapterMismatchError, match="lora_magnitude_vector: unexpected"):
        lorakit.load_adapter(model, tmp_path / "d", name="z")
    assert lorakit.list_adapters(model) == ["default", "x"]
