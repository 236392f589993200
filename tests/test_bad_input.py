"""Bad input (issue 19 §1): every public entry point refuses it with a typed error and changes nothing.

* an output path of the wrong kind (a regular file where an adapter directory goes, a directory
  where a file goes, a file among the parents) is refused before anything is written;
* tensors holding NaN or inf are refused wherever lorakit reads weights, naming the tensor, unless
  the caller opts out with ``allow_nonfinite=True``;
* something that is not an ``nn.Module`` (or not a path) raises a typed error saying what was expected.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.atomic import atomic_dir, atomic_write
from lorakit.errors import LoraError


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(6, 6)
        self.v = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(torch.relu(self.q(x)))


CFG = LoraConfig(r=2, alpha=4, targets=["q", "v"], init="random")


def adapted(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return lorakit.inject(Tiny(), CFG)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root`` (hidden ones included) with its bytes (None for directories)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def model_bits(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_model(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


# --- output paths of the wrong kind ---------------------------------------------------------------
def test_save_adapter_onto_a_regular_file_refuses_and_touches_nothing(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    target.write_bytes(b"precious bytes")
    before = snapshot(tmp_path)
    with pytest.raises(lorakit.errors.OutputPathError, match="adapter") as info:
        lorakit.save_adapter(adapted(), target)
    assert isinstance(info.value, LoraError) and "directory" in str(info.value)
    assert snapshot(tmp_path) == before  # no .adapter.old-PID, no .adapter.tmp-*, the file intact


def test_save_adapter_below_a_regular_file_refuses(tmp_path: Path) -> None:
    (tmp_path / "runs").write_text("not a directory")
    before = snapshot(tmp_path)
    with pytest.raises(lorakit.errors.OutputPathError, match="runs"):
        lorakit.save_adapter(adapted(), tmp_path / "runs" / "adapter")
    assert snapshot(tmp_path) == before


def test_named_save_onto_a_file_refuses(tmp_path: Path) -> None:
    model = adapted()
    lorakit.add_adapter(model, "other", CFG)
    target = tmp_path / "other.bin"
    target.write_bytes(b"x")
    before = snapshot(tmp_path)
    with pytest.raises(lorakit.errors.OutputPathError):
        lorakit.save_adapter(model, target, name="other")
    assert snapshot(tmp_path) == before


def test_save_adapter_still_replaces_an_adapter_directory(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    lorakit.save_adapter(adapted(0), target)
    model = adapted(1)
    lorakit.save_adapter(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no sibling left behind
    saved = load_file(str(target / "adapter_model.safetensors"))
    assert torch.equal(saved["base_model.model.q.lora_A.weight"], model.q.lora_A.detach())


def test_atomic_dir_onto_a_file_refuses_before_filling(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("keep")
    calls: list[Path] = []
    with pytest.raises(lorakit.errors.OutputPathError):
        atomic_dir(tmp_path / "out", calls.append)
    assert calls == [] and snapshot(tmp_path) == {"out": b"keep"}


def test_atomic_write_onto_a_directory_refuses_before_writing(tmp_path: Path) -> None:
    (tmp_path / "ckpt.pt").mkdir()
    (tmp_path / "ckpt.pt" / "inside").write_text("keep")
    before = snapshot(tmp_path)
    calls: list[Any] = []
    with pytest.raises(lorakit.errors.OutputPathError, match="ckpt.pt"):
        atomic_write(tmp_path / "ckpt.pt", calls.append)
    assert calls == [] and snapshot(tmp_path) == before


def test_atomic_write_below_a_file_refuses(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("keep")
    with pytest.raises(lorakit.errors.OutputPathError, match="a"):
        atomic_write(tmp_path / "a" / "b" / "c.json", lambda fh: fh.write(b"{}"))
    assert snapshot(tmp_path) == {"a": b"keep"}


def test_analysis_out_dir_that_is_a_file_refuses(tmp_path: Path) -> None:
    from lorakit.analysis import analyze

    sd = {"base_model.model.q.lora_A.weight": torch.randn(2, 6), "base_model.model.q.lora_B.weight": torch.randn(6, 2)}
    (tmp_path / "report").write_text("keep")
    with pytest.raises(lorakit.errors.OutputPathError, match="report"):
        analyze(sd, out_dir=tmp_path / "report")
    assert snapshot(tmp_path) == {"report": b"keep"}


# --- non-finite tensors -----------------------------------------------------------------------------
def poisoned_adapter(tmp_path: Path, value: float, key: str = "base_model.model.v.lora_B.weight") -> Path:
    path = tmp_path / "poisoned"
    lorakit.save_adapter(adapted(3), path)
    st = path / "adapter_model.safetensors"
    tensors = load_file(str(st))
    from safetensors import safe_open

    with safe_open(str(st), framework="pt") as f:
        meta = f.metadata()
    tensors[key] = tensors[key].clone()
    tensors[key][1, 0] = value
    save_file(tensors, str(st), meta)
    return path


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_load_adapter_refuses_non_finite_tensors_naming_them(tmp_path: Path, value: float) -> None:
    path = poisoned_adapter(tmp_path, value)
    for model in (adapted(), Tiny()):  # into existing layers, and injecting them
        before = model_bits(model)
        with pytest.raises(lorakit.errors.NonFiniteTensorError, match=r"v\.lora_B\.weight") as info:
            lorakit.load_adapter(model, path)
        assert isinstance(info.value, lorakit.AdapterFormatError) and "allow_nonfinite" in str(info.value)
        assert_same_model(model, before)


def test_load_adapter_into_a_plain_model_injects_nothing_when_refused(tmp_path: Path) -> None:
    path = poisoned_adapter(tmp_path, math.nan)
    model = Tiny()
    with pytest.raises(lorakit.errors.NonFiniteTensorError):
        lorakit.load_adapter(model, path)
    assert list(lorakit.lora_layers(model)) == []


def test_allow_nonfinite_loads_the_tensor_as_it_is(tmp_path: Path) -> None:
    path = poisoned_adapter(tmp_path, math.inf)
    model = lorakit.load_adapter(Tiny(), path, allow_nonfinite=True)
    assert model.v.lora_B[1, 0].item() == math.inf
    _, tensors = lorakit.read_adapter(path, allow_nonfinite=True)
    assert tensors["base_model.model.v.lora_B.weight"][1, 0].item() == math.inf


def test_read_adapter_refuses_non_finite(tmp_path: Path) -> None:
    path = poisoned_adapter(tmp_path, math.nan, key="base_model.model.q.lora_A.weight")
    with pytest.raises(lorakit.errors.NonFiniteTensorError, match=r"q\.lora_A\.weight.*1 of 12"):
        lorakit.read_adapter(path)


def test_named_load_refuses_non_finite(tmp_path: Path) -> None:
    path = poisoned_adapter(tmp_path, math.nan)
    model = adapted()
    before = model_bits(model)
    with pytest.raises(lorakit.errors.NonFiniteTensorError):
        lorakit.load_adapter(model, path, name="second")
    assert lorakit.list_adapters(model) == ["default"]
    assert_same_model(model, before)
    lorakit.load_adapter(model, path, name="second", allow_nonfinite=True)
    assert "second" in lorakit.list_adapters(model)


@pytest.mark.parametrize("via", ["load_loralib_checkpoint", "load_adapter"])
def test_loralib_checkpoint_refuses_non_finite(tmp_path: Path, via: str) -> None:
    src = adapted(4)
    sd = lorakit.lora_state_dict(src)
    sd["q.lora_B"] = sd["q.lora_B"].clone()
    sd["q.lora_B"][0, 0] = math.nan
    torch.save(sd, tmp_path / "lora.pt")
    model = adapted(5)
    before = model_bits(model)
    load: Callable[..., Any] = getattr(lorakit, via)
    with pytest.raises(lorakit.errors.NonFiniteTensorError, match=r"q\.lora_B"):
        load(model, tmp_path / "lora.pt")
    assert_same_model(model, before)
    load(model, tmp_path / "lora.pt", allow_nonfinite=True)
    assert math.isnan(model.q.lora_B[0, 0].item())


# --- not a module / not a path ----------------------------------------------------------------------
def _entry_points() -> list[tuple[str, Callable[[Any], Any]]]:
    def enter(cm: Callable[..., Any], *args: Any) -> Callable[[Any], Any]:
        def run(m: Any) -> None:
            with cm(m, *args):
                pass
        return run

    return [
        ("inject", lambda m: lorakit.inject(m, CFG)),
        ("plan", lambda m: lorakit.plan(m, CFG)),
        ("unwrap", lorakit.unwrap),
        ("lora_layers", lambda m: list(lorakit.lora_layers(m))),
        ("merge", lorakit.merge),
        ("unmerge", lorakit.unmerge),
        ("merge_and_unload", lorakit.merge_and_unload),
        ("save_adapter", lambda m: lorakit.save_adapter(m, "never-written")),
        ("load_adapter", lambda m: lorakit.load_adapter(m, "never-read")),
        ("load_loralib_checkpoint", lambda m: lorakit.load_loralib_checkpoint(m, "never-read.pt")),
        ("add_adapter", lambda m: lorakit.add_adapter(m, "x", CFG)),
        ("delete_adapter", lambda m: lorakit.delete_adapter(m, "x")),
        ("set_adapter", lambda m: lorakit.set_adapter(m, "default")),
        ("use_adapter", enter(lorakit.use_adapter, "default")),
        ("disable_adapters", enter(lorakit.disable_adapters)),
        ("batch_adapters", enter(lorakit.batch_adapters, ["default"])),
        ("list_adapters", lorakit.list_adapters),
        ("active_adapters", lorakit.active_adapters),
        ("combine", lambda m: lorakit.combine(m, {"default": 1.0})),
        ("lora_state_dict", lorakit.lora_state_dict),
        ("mark_only_lora_as_trainable", lorakit.mark_only_lora_as_trainable),
        ("trainable_parameters", lorakit.trainable_parameters),
        ("quantize_base", lorakit.quantize_base),
        ("loraplus_param_groups", lambda m: lorakit.loraplus_param_groups(m, 1e-3)),
        ("initial_state", lorakit.initial_state),
    ]


ENTRY_POINTS = _entry_points()


@pytest.mark.parametrize("bad", ["not a model", None, {"q": torch.zeros(2)}, Tiny],
                         ids=["str", "None", "dict", "class"])
@pytest.mark.parametrize(("name", "call"), ENTRY_POINTS, ids=[n for n, _ in ENTRY_POINTS])
def test_not_a_module_is_a_typed_error(name: str, call: Callable[[Any], Any], bad: Any, tmp_path: Path) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(lorakit.errors.NotAModuleError) as info:
            call(bad)
    finally:
        os.chdir(cwd)
    msg = str(info.value)
    assert isinstance(info.value, TypeError) and isinstance(info.value, LoraError)
    assert name in msg and "torch.nn.Module" in msg, msg
    if bad is Tiny:
        assert "instance" in msg, msg  # the class itself was passed: say to build one
    assert list(tmp_path.iterdir()) == []


def test_every_public_function_taking_a_model_is_covered() -> None:
    """A public function whose first parameter is ``model`` must be in the table above."""
    import inspect

    covered = {n for n, _ in ENTRY_POINTS}
    takes_model = {n for n in lorakit.__all__ if inspect.isfunction(getattr(lorakit, n))
                   and next(iter(inspect.signature(getattr(lorakit, n)).parameters), None) == "model"}
    assert takes_model - covered == set()


@pytest.mark.parametrize("bad_path", [123, None, ["a", "b"]], ids=["int", "None", "list"])
@pytest.mark.parametrize("call", ["save_adapter", "load_adapter", "read_adapter", "load_loralib_checkpoint"])
def test_a_path_that_is_not_a_path_is_a_typed_error(call: str, bad_path: Any) -> None:
    model = adapted()
    before = model_bits(model)
    fn = getattr(lorakit, call)
    with pytest.raises(lorakit.errors.LoraError, match=r"path") as info:
        fn(bad_path) if call == "read_adapter" else fn(model, bad_path)
    assert isinstance(info.value, TypeError) and call in str(info.value)
    assert_same_model(model, before)


def test_register_layer_checks_its_arguments() -> None:
    with pytest.raises(lorakit.errors.NotAModuleError, match="register_layer"):
        lorakit.register_layer("Linear", lambda m, s: m)  # type: ignore[arg-type]
    with pytest.raises(lorakit.errors.LoraError, match="register_layer.*callable"):
        lorakit.register_layer(nn.Linear, "not callable")  # type: ignore[arg-type]


def test_a_config_that_is_not_a_lora_config_is_a_typed_error() -> None:
    model = Tiny()
    before = model_bits(model)
    for call in (lorakit.inject, lorakit.plan, lambda m, c: lorakit.add_adapter(m, "x", c)):
        with pytest.raises(lorakit.LoraConfigError, match="LoraConfig"):
            call(model, {"r": 2, "targets": ["q"]})
    assert_same_model(model, before)
    assert list(lorakit.lora_layers(model)) == []


def test_the_check_is_cheap_on_the_hot_switch() -> None:
    """set_adapter is timed against PEFT: the check must add well under a microsecond."""
    import timeit

    model = adapted()
    lorakit.add_adapter(model, "b", CFG)
    with contextlib.suppress(Exception):
        lorakit.set_adapter(model, "b")
    checked = lorakit.set_adapter
    raw = getattr(checked, "__wrapped__", checked)
    n = 2000
    t_checked = min(timeit.repeat(lambda: checked(model, "b"), number=n, repeat=5)) / n
    t_raw = min(timeit.repeat(lambda: raw(model, "b"), number=n, repeat=5)) / n
    assert t_checked - t_raw < 1.5e-6, (t_checked, t_raw)


def test_atomic_dir_whose_swap_fails_keeps_the_previous_directory(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The rename of the new directory into place fails after the previous one was moved aside (e.g. the
    disk went read-only): the previous directory is put back, nothing else is left."""
    import os

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "w").write_text("previous")
    before = snapshot(tmp_path)
    real = os.replace

    def swap_fails(src: Any, dst: Any) -> None:
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError(30, "Read-only file system (injected)")
        real(src, dst)

    monkeypatch.setattr(os, "replace", swap_fails)
    with pytest.raises(OSError, match="injected"):
        atomic_dir(tmp_path / "out", lambda d: (d / "w").write_text("new"))
    assert snapshot(tmp_path) == before
