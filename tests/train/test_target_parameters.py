"""``lorakit train --target-parameters`` (and the TOML / YAML key): parsed, validated, passed to inject,
saved in the adapter (PEFT's target_parameters) and reloaded by ``lorakit eval``; refused naming the flag
when a name matches no parameter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit.cli import build_parser, main
from lorakit.train.config import TrainConfig
from lorakit.train.errors import TrainConfigError
from lorakit.train.methods import apply_method

from .conftest import tiny_eval_options, tiny_train_args


def parse(*argv: str) -> TrainConfig:
    return TrainConfig.from_sources(build_parser().parse_args(["train", *argv]))


def test_flag_and_config_file_keys(tmp_path: Path) -> None:
    cfg = parse("--target-parameters", "experts.gate_up_proj", "experts.down_proj")
    assert cfg.target_parameters == ["experts.gate_up_proj", "experts.down_proj"]
    assert parse().target_parameters is None
    toml = tmp_path / "run.toml"
    toml.write_text('target_parameters = ["mlp.experts.gate_up_proj"]\n')
    assert parse("--config", str(toml)).target_parameters == ["mlp.experts.gate_up_proj"]
    yml = tmp_path / "run.yaml"
    yml.write_text("target-parameters: [experts.down_proj]\n")
    assert parse("--config", str(yml)).target_parameters == ["experts.down_proj"]
    with pytest.raises(TrainConfigError, match="--target-parameters applies to --method lora, not full"):
        parse("--target-parameters", "x.w", "--method", "full")
    with pytest.raises(TrainConfigError, match="--target-parameters with --use-dora"):
        parse("--target-parameters", "x.w", "--use-dora")


def test_apply_method_adapts_moe_experts_next_to_the_module_targets() -> None:
    from tests.variants.test_param_targets import _tiny_moe

    from lorakit.layers.param import LoraParameter

    model = _tiny_moe("qwen3_moe")
    frozen = sum(p.numel() for p in model.parameters())
    info = apply_method(model, "lora", r=2, alpha=4, targets=["q_proj"],
                        target_parameters=["mlp.experts.gate_up_proj"])
    assert info["target_parameters"] == ["mlp.experts.gate_up_proj"]
    layers = [m for m in model.modules() if isinstance(m, LoraParameter)]
    assert len(layers) == 2  # one per decoder layer
    # trainable = q_proj LoRA (r (in + out)) + experts: PEFT's (r E, in) / (out, r E) per layer
    attn = model.model.layers[0].self_attn.q_proj
    e, two_i, h = model.model.layers[0].mlp.experts.gate_up_proj.shape
    want = 2 * (2 * (attn.in_features + attn.out_features) + 2 * e * (h + two_i))
    assert info["trainable_params"] == want == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert info["total_params"] == frozen + want
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        for m in layers:
            m.lora_B.normal_()
    model(ids).logits.sum().backward()  # gradients reach the experts' A
    assert all(m.lora_A.grad is not None and m.lora_A.grad.abs().sum() > 0 for m in layers)


def test_no_matching_parameter_is_refused_naming_the_flag() -> None:
    from tests.variants.test_param_targets import _tiny_moe

    model = _tiny_moe("qwen3_moe")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(TrainConfigError, match=r"--target-parameters: target_parameters \['experts\.gate_proj'\] "
                                               "match no parameter"):
        apply_method(model, "lora", targets=["q_proj"], target_parameters=["experts.gate_proj"])
    assert not any("lora" in n for n in model.state_dict())  # nothing injected
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_cli_run_saves_and_reloads_parameter_targets(
    tmp_path: Path, tiny_bert: Path, sentiment_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from lorakit.train.commands import run_eval
    from lorakit.train.config import EvalConfig

    run = tmp_path / "run"
    args = tiny_train_args(tiny_bert, sentiment_files, output_dir=run, targets=["query"],
                           target_parameters=["intermediate.dense.weight"])
    assert main(args) == 0
    res = json.loads((run / "results.json").read_text())
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["target_parameters"] == [f"bert.encoder.layer.{i}.intermediate.dense.weight" for i in (0, 1)]
    ev = run_eval(EvalConfig.build(tiny_eval_options(tiny_bert, sentiment_files, adapter=run / "adapter")))
    assert ev["loss"] == pytest.approx(res["final"]["loss"], abs=1e-5)  # the parameter LoRA came back
    capsys.readouterr()
    bad = tiny_train_args(tiny_bert, sentiment_files, output_dir=tmp_path / "bad", targets=["query"],
                          target_parameters=["experts.gate_up_proj"])
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "--target-parameters: target_parameters ['experts.gate_up_proj'] match no parameter" in err
