"""FSDP2 training (``--fsdp``) under torchrun on CPU/gloo against a single unsharded process.

The references are a plain 1-process run (no FSDP, same global batch and seed) for losses and the
saved adapter, and the model's own module classes for the block choice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import cli_env, run_cli, tiny_train_args, train_losses

# Every collective gives up after this long, so a broken run fails instead of hanging the suite.
ENV = {"CUDA_VISIBLE_DEVICES": "", "LORAKIT_DIST_TIMEOUT": "60"}
# Measured: 2-rank FSDP vs 1 process differ by <= 1e-7 relative in the loss and 1e-7 absolute in the
# adapter tensors (the reduce-scatter averages two half-batch sums where one process sums once).
LOSS_REL, ADAPTER_ATOL = 1e-5, 1e-6


def torchrun(n: int) -> list[str]:
    exe = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    return [exe, "--standalone", "--nproc_per_node", str(n)]


def run_worker(name: str, out: Path, timeout: int, **env: str) -> list[dict]:
    """``torchrun`` 2 gloo ranks of ``tests/train/<name>`` writing ``<out>/rank<R>.json``: their results."""
    worker = Path(__file__).with_name(name)
    res = subprocess.run([*torchrun(2), str(worker), str(out)], env=cli_env(**{**ENV, **env}), capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = adapter(a), adapter(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert (ta[k] - tb[k]).abs().max() <= ADAPTER_ATOL, k
    assert json.loads((a / "adapter/adapter_config.json").read_text()) == json.loads(
        (b / "adapter/adapter_config.json").read_text()
    )


# --- in-process: launch and block errors -----------------------------------------------------------
def test_fsdp_without_torchrun_says_how_to_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.train.config import TrainConfig
    from lorakit.train.errors import FSDPLaunchError, TrainConfigError

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(FSDPLaunchError, match="torchrun --standalone --nproc_per_node"):
        TrainConfig.build({"fsdp": True})
    with pytest.raises(TrainConfigError, match="--fsdp-block: only meaningful with --fsdp"):
        TrainConfig.build({"fsdp_block": "BertLayer"})
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert TrainConfig.build({"fsdp": True}).fsdp
    assert TrainConfig.build({"fsdp": True, "method": "full"}).method == "full"  # test_fsdp_full.py


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=2))


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=3, num_attention_heads=2))


def test_block_class_found_from_the_model() -> None:
    from lorakit.train.fsdp import find_blocks

    llama, bert = _tiny_llama(), _tiny_bert()
    assert [type(m).__name__ for m in find_blocks(llama)] == ["LlamaDecoderLayer"] * 3  # _no_split_modules
    assert list(find_blocks(llama)) == list(llama.model.layers)
    # BERT declares BertEmbeddings and BertLayer; without a declaration, the longest ModuleList's class.
    assert list(find_blocks(bert)) == [bert.bert.embeddings, *bert.bert.encoder.layer]
    bert._no_split_modules = None
    assert list(find_blocks(bert)) == list(bert.bert.encoder.layer)
    assert list(find_blocks(bert, "BertAttention")) == [b.attention for b in bert.bert.encoder.layer]


def test_nonexistent_block_class_is_a_typed_error() -> None:
    from lorakit.errors import LoraError
    from lorakit.train.errors import FSDPBlockError
    from lorakit.train.fsdp import find_blocks

    with pytest.raises(FSDPBlockError, match=r"'LlamaBlock'.*LlamaDecoderLayer") as err:
        find_blocks(_tiny_llama(), "LlamaBlock")
    assert isinstance(err.value, LoraError)


# --- torchrun: 2 ranks vs 1 process, kill -9 and resume on 1 rank ---------------------------------
COMMON = {"max_eval_examples": 16, "max_steps": 24, "save_every": 3}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, sentiment_files: tuple[Path, Path]) -> Path:
    """An unsharded 1-process run with global batch 8."""
    out = tmp_path_factory.mktemp("fsdp") / "single"
    res = run_cli(*tiny_train_args(tiny_bert, sentiment_files, **COMMON, batch_size=8, output_dir=out), env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


@pytest.mark.slow
def test_two_rank_fsdp_sharded_lora_matches_single_process(
    tmp_path: Path, reference: Path, tiny_bert: Path, sentiment_files: tuple[Path, Path]
) -> None:
    out = tmp_path / "fsdp"  # LoRA sharded with its block here; replicated (the default) in the kill test
    res = run_cli(
        *tiny_train_args(tiny_bert, sentiment_files, **COMMON, batch_size=4, fsdp=True, output_dir=out),
        launcher=torchrun(2), env={**ENV, "LORAKIT_FSDP_LORA": "sharded"}, timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = train_losses(reference), train_losses(out)
    assert len(a) == len(b) == COMMON["max_steps"]
    assert b == pytest.approx(a, rel=LOSS_REL)
    assert_same_adapter(reference, out)
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["final"]["loss"] == pytest.approx(json.loads((reference / "results.json").read_text())["final"]
                                                     ["loss"], rel=LOSS_REL)
    assert not (out / "checkpoint.pt").exists() and not list(out.glob("checkpoint-*.dcp"))


def _workers(parent: int) -> list[int]:
    """PIDs whose parent is ``parent`` (torchrun's agent -> its rank processes)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == parent:
                out.append(int(d.name))
    return out


# Rank 1 of ``lorakit train`` stops inside its first optimizer step after ``checkpoint.pt`` exists (under FSDP
# rank 0 has written it before that step's collectives) and writes its PID: the kill lands one step after the
# first checkpoint on any machine (polling for the file raced a run of a few short steps).
HALT_RANK_1 = (
    "import os, sys, time, torch\n"
    "from pathlib import Path\n"
    "ckpt, pid_file = Path(os.environ['HALT_AFTER']), Path(os.environ['HALT_PID_FILE'])\n"
    "orig = torch.optim.AdamW.step\n"
    "def halting(self, *a, **k):\n"
    "    if os.environ.get('RANK') == '1' and ckpt.is_file():\n"
    "        pid_file.with_suffix('.tmp').write_text(str(os.getpid()))\n"
    "        pid_file.with_suffix('.tmp').replace(pid_file)\n"
    "        time.sleep(600)\n"
    "    return orig(self, *a, **k)\n"
    "torch.optim.AdamW.step = halting\n"
    "from lorakit.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def kill_a_rank_at_first_checkpoint(args: list[str], out: Path, env: dict[str, str], wait_s: float) -> None:
    """``lorakit train args`` on 2 ranks; one step after ``out/checkpoint.pt`` exists, kill -9 rank 1: the run
    fails."""
    script, pid_file = out.parent / f"{out.name}-halt.py", out.parent / f"{out.name}-rank1.pid"
    script.write_text(HALT_RANK_1)
    env = {**env, "HALT_AFTER": str(out / "checkpoint.pt"), "HALT_PID_FILE": str(pid_file)}
    proc = subprocess.Popen([*torchrun(2), str(script), *args], env=cli_env(**env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + wait_s
        while not pid_file.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid_file.is_file() and proc.poll() is None, "the run ended before its first checkpoint"
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        assert proc.wait(timeout=wait_s) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's rank processes through /proc")
def test_kill_a_rank_then_resume_on_one_rank(
    tmp_path: Path, reference: Path, tiny_bert: Path, sentiment_files: tuple[Path, Path]
) -> None:
    import torch

    out = tmp_path / "killed"
    args = tiny_train_args(tiny_bert, sentiment_files, **COMMON, batch_size=4, fsdp=True, output_dir=out)
    kill_a_rank_at_first_checkpoint(args, out, ENV, wait_s=90)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and 3 <= state["step"] < COMMON["max_steps"]
    assert (out / state["dcp"] / ".metadata").is_file()
    # A save torn by the crash (a later step's directory without its metadata) must not be used.
    torn = out / f"checkpoint-{state['step'] + 3:08d}.dcp"
    torn.mkdir(exist_ok=True)
    (torn / "__0_0.distcp").write_bytes(b"torn")

    # 2 ranks x 4 -> 1 rank x 8: the same global batch; DCP reshards the trainable state.
    res = run_cli(
        *tiny_train_args(tiny_bert, sentiment_files, **COMMON, batch_size=8, fsdp=True, output_dir=out,
                         resume=True),
        launcher=torchrun(1), env=ENV, timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert train_losses(out) == pytest.approx(train_losses(reference), rel=LOSS_REL)
    assert_same_adapter(reference, out)
    assert not torn.exists()


# --- merged export as sharded safetensors ----------------------------------------------------------
def test_streamed_export_loads_in_transformers_and_equals_merge_and_unload(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import lorakit
    from lorakit.train.sharded_export import export

    torch.manual_seed(0)
    base = _tiny_llama()
    base.save_pretrained(tmp_path / "base")
    lorakit.inject(base, lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(base):
            layer.lora_B.normal_(0, 0.1)
    lorakit.save_adapter(base, tmp_path / "adapter")
    x = torch.randint(0, 64, (2, 7))
    expected = lorakit.merge_and_unload(base).eval()(input_ids=x).logits

    out = export(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", max_shard_size=20_000,
                 config_updates={})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    from safetensors import safe_open

    for f in files:  # each shard within the limit, unless it holds one tensor larger than the limit
        with safe_open(str(out / f), "pt") as fh:
            n = len(list(fh.keys()))
        assert n == 1 or (out / f).stat().st_size <= 20_000 + 4096, f
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(loaded(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_lorakit_merge_sharded_equals_plain_merge(tmp_path: Path, reference: Path, tiny_bert: Path) -> None:
    """The trained run's adapter (LoRA + classifier head): streamed sharded export vs ``lorakit merge``."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from lorakit.train.commands import run_merge
    from lorakit.train.config import MergeConfig

    common = {"adapter": str(reference / "adapter"), "model": str(tiny_bert)}
    run_merge(MergeConfig.build({**common, "output": str(tmp_path / "plain")}))
    run_merge(MergeConfig.build({**common, "output": str(tmp_path / "sharded"), "max_shard_size": "100KB"}))
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    x = torch.randint(0, 1000, (2, 9))
    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain").eval()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "sharded").eval()
    torch.testing.assert_close(b(input_ids=x).logits, a(input_ids=x).logits, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "sharded" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_library_api_on_a_sharded_model(tmp_path: Path) -> None:
    """forward, disable_adapters, merge / unmerge (bit-exact), save_adapter, load_adapter on DTensor parameters
    (2 gloo ranks) against an unsharded copy of the same model; two named adapters switched, the second trained
    3 SGD steps (each rank half the batch vs the whole batch unsharded) and saved by name (worker:
    fsdp_api_worker.py)."""
    for r in run_worker("fsdp_api_worker.py", tmp_path, timeout=120):
        assert r["forward"] == 0.0 and r["disabled_vs_base"] == 0.0 and r["unmerged"] == 0.0
        assert r["merged"] < 1e-6 and r["merge_changed_weight"] and r["unmerge_bits"]
        assert r["saved_same_keys"] and r["saved"] == 0.0
        assert r["loaded"] == 0.0
        # named adapters (ignored_params=fsdp.adapter_params): switching, training "b", saving it by name
        assert r["named_forward"] == 0.0
        assert r["named_loss_rel"] < 1e-5 and r["named_saved"] < 1e-6 and r["named_saved_keys"]
        assert r["named_trained"] > 1e-4
        assert "ignored_params=lorakit.train.fsdp.adapter_params(model)" in r["named_unignored"]
        assert not r["named_unignored_wrote"]
