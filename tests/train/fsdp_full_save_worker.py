"""Run by test_fsdp_full.py under torchrun: ``fsdp_full.save_model`` of a tiny fully sharded Llama, then the
same save with a failure injected on rank 0 only (an output file's write, the tokenizer, a wrong output
path). Every rank must raise ``FullSaveError`` at that step (before the fix the other rank sat in the next
all-gather until LORAKIT_DIST_TIMEOUT), the previous output must be left as it was, and a later save must
still work (the ranks' collectives stayed in step).

Writes ``<out>/rank<R>.json`` (the test asserts on it).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


class Tokenizer:
    """What save_model asks of a tokenizer; ``fail`` raises on this rank."""

    fail = False

    def save_pretrained(self, d: Path) -> None:
        if self.fail:
            raise PermissionError(13, "Permission denied (injected)", str(d))
        (Path(d) / "tokenizer_config.json").write_text("{}")


def snapshot(d: Path) -> dict[str, str]:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.rglob("*"))
            if f.is_file()}


def main(out: Path) -> None:
    import safetensors.torch as st
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.train import fsdp_full
    from lorakit.train.distributed import DistContext
    from lorakit.train.errors import FullSaveError

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=int(os.environ["LORAKIT_DIST_TIMEOUT"])))
    rank = dist.get_rank()
    ctx = DistContext(rank, 2, rank, torch.device("cpu"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=2))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    tok, dest, size = Tokenizer(), out / "model", 8 * 1024  # several output files
    res: dict[str, object] = {}
    fsdp_full.save_model(model, tok, dest, "{}", ctx, max_shard_size=size)
    before = snapshot(dest)
    res["files"] = sorted(before)
    real_save = st.save_file
    calls = {"n": 0}

    def disk_full_at_second_file(*a: object, **kw: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device (injected)")
        real_save(*a, **kw)  # type: ignore[arg-type]

    def failing(name: str, where: Path) -> None:
        try:
            fsdp_full.save_model(model, tok, where, "{}", ctx, max_shard_size=size)
            res[name] = "no error"
        except FullSaveError as exc:
            res[name] = f"FullSaveError: {exc}"
        except Exception as exc:  # noqa: BLE001 - recorded: the test names what was raised instead
            res[name] = f"{type(exc).__name__}: {exc}"

    if rank == 0:
        st.save_file = disk_full_at_second_file  # type: ignore[assignment]
    failing("file_write", dest)
    st.save_file = real_save  # type: ignore[assignment]
    res["file_write_left_output"] = snapshot(dest) == before
    tok.fail = rank == 0
    failing("tokenizer", dest)
    tok.fail = False
    res["tokenizer_left_output"] = snapshot(dest) == before
    (out / "a_file").write_text("x")
    failing("output_path", out / "a_file")  # rank 0's atomic_dir refuses a file where the directory goes
    res["leftovers"] = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    dist.barrier()  # rank 0's next save must not start (its temporary directory) before rank 1 has looked
    fsdp_full.save_model(model, tok, dest, "{}", ctx, max_shard_size=size)
    res["saved_again_same"] = snapshot(dest) == before
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
