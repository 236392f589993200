"""``--fsdp`` composed with gradient accumulation, gradient checkpointing and ``--fsdp-offload``, the
multi-node launch form (two torchrun agents, ``--nnodes 2``, c10d rendezvous on 127.0.0.1) and
meta-device loading (each rank materialises only its shard).

Reference: a plain 1-process run without FSDP on the same global batch (8) and seed; the 2-rank runs
must reproduce its loss at every step (``LOSS_REL``, measured <= 1e-7 in test_fsdp.py) and its adapter.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from .conftest import cli_env, run_cli, tiny_train_args, train_losses
from .test_fsdp import ENV, LOSS_REL, assert_same_adapter, run_worker, torchrun

SHORT = {"max_train_examples": 48, "max_eval_examples": 8, "max_steps": 6, "save_every": 100}


@pytest.fixture(scope="module")
def short_reference(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path,
                    sentiment_files: tuple[Path, Path]) -> Path:
    out = tmp_path_factory.mktemp("fsdp_compose") / "single"
    res = run_cli(*tiny_train_args(tiny_bert, sentiment_files, **SHORT, batch_size=8, output_dir=out), env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("combo", [
    {"batch_size": 2, "grad_accum": 2},  # 2 ranks x 2 x 2 micro-batches = 8
    {"batch_size": 4, "gradient_checkpointing": True},
    {"batch_size": 4, "fsdp_offload": True},
], ids=["grad-accum", "gradient-checkpointing", "offload"])
def test_fsdp_composes(combo: dict, tmp_path: Path, short_reference: Path, tiny_bert: Path,
                       sentiment_files: tuple[Path, Path]) -> None:
    out = tmp_path / "run"
    res = run_cli(*tiny_train_args(tiny_bert, sentiment_files, **SHORT, **combo, fsdp=True, output_dir=out),
                  launcher=torchrun(2), env=ENV, timeout=360)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = train_losses(short_reference), train_losses(out)
    assert len(a) == len(b) == SHORT["max_steps"]
    assert b == pytest.approx(a, rel=LOSS_REL)
    assert_same_adapter(short_reference, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_nodes_on_localhost(tmp_path: Path, short_reference: Path, tiny_bert: Path,
                                sentiment_files: tuple[Path, Path]) -> None:
    """``torchrun --nnodes 2 --nproc_per_node 1`` twice (node 0 hosts the c10d store): one 2-rank run."""
    out = tmp_path / "nodes"
    exe = torchrun(1)[0]
    args = tiny_train_args(tiny_bert, sentiment_files, **SHORT, batch_size=4, fsdp=True, output_dir=out)
    endpoint = f"127.0.0.1:{_free_port()}"
    procs = []
    try:
        for node in (0, 1):
            cmd = [exe, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node), "--max-restarts", "0",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "lorakit-test",
                   "--rdzv-conf", f"is_host={int(node == 0)},join_timeout=60,read_timeout=60",
                   "-m", "lorakit", *args]
            procs.append(subprocess.Popen(cmd, env=cli_env(**ENV), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          text=True))
        errs = [p.communicate(timeout=150)[1] for p in procs]
    finally:
        for p in procs:  # bounded and self-stopping: nothing outlives the test
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-1500:] for e in errs)
    assert train_losses(out) == pytest.approx(train_losses(short_reference), rel=LOSS_REL)
    assert_same_adapter(short_reference, out)


# --- meta-device loading: in-process against the full load -----------------------------------------
def _tiny_llama_dir(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["classification", "generation"])
def test_meta_skeleton_equals_full_load(tmp_path: Path, kind: str) -> None:
    """Skeleton + LoRA + materialise == ``load_model`` + LoRA, bit for bit: the base from the file, the
    classifier head the checkpoint lacks (initialised with the same RNG draws) and the LoRA init."""
    import torch

    from lorakit.train import meta_load
    from lorakit.train.methods import apply_method
    from lorakit.train.models import ModelSource, load_model

    src = ModelSource(_tiny_llama_dir(tmp_path / "llama"))
    torch.manual_seed(3)
    ref = load_model(src, kind, 2)
    apply_method(ref, "lora", r=4, targets=["q_proj", "v_proj"])
    torch.manual_seed(3)
    sk = meta_load.skeleton(src, kind, 2, SimpleNamespace(local_rank=0, rank=0))
    assert meta_load.is_skeleton(sk)
    assert sk.model.layers[0].self_attn.k_proj.weight.is_meta
    apply_method(sk, "lora", r=4, targets=["q_proj", "v_proj"])
    meta_load.real_trainables(sk)
    meta_load.materialise(sk, torch.device("cpu"))
    a, b = ref.state_dict(), sk.state_dict()
    assert sorted(a) == sorted(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert all(torch.equal(x, y) for x, y in zip(ref.buffers(), sk.buffers(), strict=True))  # rotary inv_freq
    if kind == "classification":
        assert "score.weight" in a  # absent from the file: initialised, not loaded


def test_fsdp_quantize_defers_the_float_rest_to_the_shard_reads(tmp_path: Path) -> None:
    """``--fsdp --quantize``: the skeleton's linear layers quantized from the file, everything else left on meta
    for ``materialise`` (each rank its rows, after fully_shard); bit for bit the model of ``--quantize`` alone
    (streamed quantize, rest read whole), LoRA init included."""
    pytest.importorskip("bitsandbytes")
    import torch

    from lorakit.train import meta_load
    from lorakit.train.methods import apply_method
    from lorakit.train.models import ModelSource, quantize_for_training

    src = ModelSource(_tiny_llama_dir(tmp_path / "llama"))
    ctx = SimpleNamespace(local_rank=0, rank=0)
    torch.manual_seed(3)
    ref = meta_load.skeleton(src, "generation", 2, ctx)
    quantize_for_training(ref, "nf4")
    apply_method(ref, "lora", r=4, targets=["q_proj", "v_proj"])
    torch.manual_seed(3)
    sk = meta_load.skeleton(src, "generation", 2, ctx)
    meta_load.defer_rest(sk)
    quantize_for_training(sk, "nf4")
    assert sk.model.embed_tokens.weight.is_meta and sk.model.norm.weight.is_meta  # never read whole
    q = sk.model.layers[0].self_attn.k_proj.weight
    assert not q.is_meta and q.dtype == torch.uint8  # packed NF4, from the file
    plan = getattr(sk, meta_load.PLAN_ATTR)
    assert "model.layers.0.self_attn.k_proj.weight" not in plan and "model.embed_tokens.weight" in plan
    apply_method(sk, "lora", r=4, targets=["q_proj", "v_proj"])
    meta_load.real_trainables(sk)
    meta_load.materialise(sk, torch.device("cpu"))
    assert not meta_load.is_skeleton(sk) and not hasattr(sk, meta_load.DEFER_REST)
    a, b = ref.state_dict(), sk.state_dict()
    assert sorted(a) == sorted(b)
    assert [k for k in a if isinstance(a[k], torch.Tensor) and not torch.equal(a[k], b[k])] == []
    x = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        assert torch.equal(ref(input_ids=x).logits, sk(input_ids=x).logits)


def test_meta_skeleton_refuses_a_wrong_shape(tmp_path: Path) -> None:
    import json

    from lorakit.errors import LoraError
    from lorakit.train import meta_load
    from lorakit.train.errors import ModelLoadError
    from lorakit.train.models import ModelSource

    d = _tiny_llama_dir(tmp_path / "llama")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(ModelLoadError, match=r"mlp\.(gate|up|down)_proj\.weight.*shape") as err:
        meta_load.skeleton(ModelSource(d), "generation", 2, SimpleNamespace(local_rank=0, rank=0))
    assert isinstance(err.value, LoraError)


def test_meta_loading_applies_only_where_it_can() -> None:
    from lorakit.train.meta_load import applies
    from lorakit.train.models import ModelSource

    here = ModelSource(Path(sys.prefix))  # no safetensors there
    gguf = ModelSource(Path("."), "x.gguf")
    cfg = SimpleNamespace(fsdp=True, quantize=None)
    assert applies(cfg, gguf) and not applies(cfg, here)
    assert not applies(SimpleNamespace(fsdp=False, quantize=None), gguf)
    assert applies(SimpleNamespace(fsdp=True, quantize="nf4"), gguf)  # streamed quantize, rest read per shard
    assert not applies(SimpleNamespace(fsdp=True, quantize="nf4"), here)


@pytest.mark.slow
def test_fsdp_composes_with_a_quantized_base(tmp_path: Path, tiny_bert: Path,
                                             sentiment_files: tuple[Path, Path]) -> None:
    """``--fsdp --quantize nf4`` on 2 ranks = ``--quantize nf4`` in one process (same global batch)."""
    pytest.importorskip("bitsandbytes")
    ref, out = tmp_path / "single", tmp_path / "fsdp"
    res = run_cli(*tiny_train_args(tiny_bert, sentiment_files, **SHORT, batch_size=8, quantize="nf4",
                                   output_dir=ref), env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli(*tiny_train_args(tiny_bert, sentiment_files, **SHORT, batch_size=4, quantize="nf4", fsdp=True,
                                   output_dir=out), launcher=torchrun(2), env=ENV, timeout=480)
    assert res.returncode == 0, res.stderr[-3000:]
    assert train_losses(out) == pytest.approx(train_losses(ref), rel=LOSS_REL)
    assert_same_adapter(ref, out)


@pytest.mark.slow
def test_sharding_frees_the_wrapped_base_weights(tmp_path: Path) -> None:
    """``fsdp.shard`` on 2 gloo ranks, NF4 and float bases (worker: fsdp_quant_worker.py): the base modules the
    LoRA layers keep (``_lora_original``) must not hold a whole weight, so a rank's resident base is ~1/2 of
    the unsharded copy's (measured 0.511 NF4 with its replicated absmax, 0.500 float; 0.771 / 0.868 when
    they kept the originals), and one training step equals the unsharded copy's on the whole batch."""
    pytest.importorskip("bitsandbytes")
    for r in run_worker("fsdp_quant_worker.py", tmp_path, timeout=180):
        for kind, bound in (("nf4", 0.52), ("float", 0.501)):
            assert not r[kind]["bases_whole"], kind
            assert r[kind]["resident_of_full"] <= bound, (kind, r[kind])
            assert r[kind]["loss_rel"] < 1e-6 and r[kind]["grad"] <= 1e-6 < r[kind]["grad_scale"], (kind, r[kind])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_merge_unmerge_on_a_sharded_nf4_base(tmp_path: Path) -> None:
    """merge / unmerge / disable_adapters of LoRA on an NF4 base under ``fsdp.shard`` (2 gloo ranks, worker:
    fsdp_quant_merge_worker.py) vs the same model unsharded in one process: merge changes the output exactly as
    the single-process quantized merge does (same requantized codes), unmerge restores each rank's packed bytes
    and the absmax bit for bit; merged without a kept copy, unmerge requantizes as the unsharded layer does;
    LoRA injected after fully_shard on the NF4 base forwards and merges as the unsharded model."""
    pytest.importorskip("bitsandbytes")
    for r in run_worker("fsdp_quant_merge_worker.py", tmp_path, timeout=220, LORAKIT_DIST_TIMEOUT="120"):
        assert r["local_rows_of_ref"]  # each rank holds its chunk of the same packed bytes
        assert r["forward"] == 0.0 and r["disabled"] == 0.0 and r["disabled_changes"] > 1e-2
        assert r["merge_moved_output"] > 1e-2 and r["merged_vs_ref_merged"] == 0.0
        assert r["merge_changed_bytes"] > 0 and r["merge_changed_absmax"]
        assert r["unmerge_bits"] and r["unmerged_vs_start"] == 0.0
        assert r["requant_unmerge_vs_ref"] == 0.0 and r["requant_unmerge_vs_start"] > 0.0
        # the same LoRA injected after fully_shard on the sharded NF4 base (lorakit.sharded_inject)
        assert r["late_layers"] == 6 and r["late_forward"] == 0.0 and r["late_merged"] == 0.0
