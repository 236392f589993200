"""``lorakit train --quantize`` and ``lorakit merge --dtype / --quantize-output`` on a tiny BERT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.train.conftest import make_tiny_bert, tiny_train_args, write_sentiment_files

from lorakit.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_sentiment_files(tmp_path_factory.mktemp("sent"))


def test_train_quantized_then_merge_to_bf16_and_to_nf4(tmp_path: Path, files: tuple[Path, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForSequenceClassification

    import lorakit
    from lorakit.quant import backend as QB
    from lorakit.train.commands import load_for_task

    bert = make_tiny_bert(tmp_path / "bert")
    run = tmp_path / "run"
    assert main(tiny_train_args(bert, files, max_train_examples=32, max_steps=3, lr=1e-2, output_dir=run,
                                quantize="nf4")) == 0
    capsys.readouterr()
    rec = json.loads((run / "adapter" / "adapter_config.json").read_text())["lorakit_quantization"]
    assert rec["quant_type"] == "nf4" and rec["double_quant"] is True and rec["modules"] > 0
    adapted, tok = load_for_task(str(bert), "classification", 2, str(run / "adapter"))  # quantized as recorded
    assert any(QB.is_quantized(getattr(m, "quant_base", m)) for _, m in lorakit.lora_layers(adapted))
    batch = tok(["a fine film", "dreadful service"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = adapted(**batch).logits
    for extra, dtype in ((["--dtype", "bf16"], torch.bfloat16), ([], torch.float32)):
        out = tmp_path / f"merged-{dtype}"
        assert main(["merge", "--adapter", str(run / "adapter"), "--output", str(out), *extra]) == 0
        merged = AutoModelForSequenceClassification.from_pretrained(out, dtype=dtype).eval()
        lin = merged.bert.encoder.layer[0].attention.self.query
        assert type(lin) is torch.nn.Linear and lin.weight.dtype == dtype
        with torch.no_grad():
            got = merged(**batch).logits.float()
        assert (got - want).abs().max() < (3e-2 if dtype == torch.bfloat16 else 1e-5)
    q_out = tmp_path / "merged-nf4"
    assert main(["merge", "--adapter", str(run / "adapter"), "--output", str(q_out), "--quantize-output", "nf4"]) == 0
    reloaded = AutoModelForSequenceClassification.from_pretrained(q_out)
    assert QB.is_4bit(reloaded.bert.encoder.layer[0].attention.self.query)
    assert main(["merge", "--adapter", str(run / "adapter"), "--output", str(tmp_path / "x"),
                 "--quantize-output", "nf4", "--dtype", "bf16"]) == 2
    with pytest.raises(SystemExit):  # argparse names the valid choices
        main(["train", "--quantize", "nf2", "--output-dir", str(tmp_path / "y")])
    assert "invalid choice: 'nf2' (choose from 'nf4', 'fp4', 'int8')" in capsys.readouterr().err


def test_e2e_train_quantized_from_a_toml_config_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``quantize = "nf4"`` in a TOML config, task E2E (a causal LM): the base is streamed and quantized
    (every adapted layer a bitsandbytes ``Linear4bit``), and ``lorakit eval`` requantizes the base as the
    adapter records."""
    from tests.train.conftest import make_tiny_llama
    from tests.train.test_cli import E2E_LINES

    from lorakit.train import e2e_metrics, meta_load

    monkeypatch.setattr(e2e_metrics, "java_missing", lambda: "no jar (tested in tests/train)")
    llama = tmp_path / "llama"
    make_tiny_llama(llama)
    data = tmp_path / "e2e.txt"
    data.write_text(E2E_LINES)
    conf = tmp_path / "q.toml"
    conf.write_text(f'task = "e2e"\nmodel = "{llama}"\nquantize = "nf4"\ntrain_file = "{data}"\n'
                    'e2e_dev_fraction = 0.25\nmax_steps = 2\nbatch_size = 4\nlr = 1e-2\nmax_new_tokens = 4\n'
                    'num_beams = 1\n')
    kinds: list[str] = []
    quantize = meta_load.applies
    monkeypatch.setattr(meta_load, "applies", lambda cfg, src: kinds.append(cfg.quantize) or quantize(cfg, src))
    run = tmp_path / "run"
    assert main(["train", "--config", str(conf), "--output-dir", str(run), "--no-progress"]) == 0
    assert kinds == ["nf4"]
    rec = json.loads((run / "adapter" / "adapter_config.json").read_text())["lorakit_quantization"]
    assert rec["quant_type"] == "nf4" and rec["modules"] == 2 * 2  # the default targets q_proj, v_proj per layer
    res = json.loads((run / "results.json").read_text())
    assert res["final"]["n_mrs"] == 3 and 0 <= res["final"]["bleu"] <= 100
    capsys.readouterr()
    assert main(["eval", "--task", "e2e", "--model", str(llama), "--adapter", str(run / "adapter"),
                 "--eval-file", str(data), "--max-eval-examples", "2", "--num-beams", "1",
                 "--max-new-tokens", "4"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["n_mrs"] == 2 and abs(ev["loss"] - res["final"]["loss"]) < 10
