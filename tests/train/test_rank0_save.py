"""A file that rank 0 writes alone in a 2-rank ``lorakit train`` (``checkpoint.pt``, the final adapter) failing
there: every rank raises :class:`SaveError` at once, naming the file and rank 0's cause, far within
``LORAKIT_DIST_TIMEOUT``, the previous file is left as it was, and ``--resume`` then finishes the run from the
last good checkpoint (issue #18). Worker: rank0_save_worker.py."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import cli_env, tiny_train_args
from .test_fsdp import torchrun

WORKER = Path(__file__).with_name("rank0_save_worker.py")
DIST_TIMEOUT = 300  # a rank left waiting would sit this long; the run must end far sooner
BOUND = 200  # subprocess timeout (s): well under DIST_TIMEOUT; the failing run took 11-23 s on a busy 2-core machine
PREVIOUS = {"adapter_config.json": '{"previous": "run"}', "adapter_model.safetensors": "previous weights"}


def test_rank0_save_in_one_process_raises_the_writers_own_error() -> None:
    """Not distributed: the write runs as before, its own error unchanged and no collective."""
    import torch

    from lorakit.train import distributed as dd

    ctx = dd.DistContext(0, 1, 0, torch.device("cpu"))
    assert dd.rank0_save(ctx, lambda: 7, "writing x", "x") == 7

    def full() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        dd.rank0_save(ctx, full, "writing x", "x")


def test_full_save_error_is_a_save_error() -> None:
    from lorakit.errors import LoraError
    from lorakit.train.errors import FullSaveError, SaveError

    assert issubclass(FullSaveError, SaveError) and issubclass(SaveError, LoraError)


@pytest.mark.slow
@pytest.mark.timeout(2 * BOUND + 60)
@pytest.mark.parametrize(("what", "fsdp"), [("checkpoint", False), ("adapter", True)],
                         ids=["ddp-checkpoint", "fsdp-final-adapter"])
def test_a_save_failing_on_rank_0_stops_every_rank_promptly(what: str, fsdp: bool, tmp_path: Path,
                                                            tiny_bert: Path,
                                                            sentiment_files: tuple[Path, Path]) -> None:
    """``checkpoint``: DDP, the second checkpoint.pt (step 4 of 6) fails (disk full) on rank 0; ``adapter``:
    --fsdp LoRA, the final adapter fails (permission denied) on rank 0 over an earlier run's adapter/."""
    out, record = tmp_path / "run", tmp_path / "record"
    record.mkdir()
    (out / "adapter").mkdir(parents=True)  # an earlier run's adapter (a fresh run leaves it until replaced)
    for name, text in PREVIOUS.items():
        (out / "adapter" / name).write_text(text)
    args = tiny_train_args(tiny_bert, sentiment_files, batch_size=4, save_every=2, fsdp=fsdp, output_dir=out)
    t0 = time.monotonic()
    res = subprocess.run([*torchrun(2), "--max-restarts", "0", str(WORKER), what, str(record), *args],
                         env=cli_env(CUDA_VISIBLE_DEVICES="", LORAKIT_DIST_TIMEOUT=str(DIST_TIMEOUT)),
                         capture_output=True, text=True, timeout=BOUND)
    wall = time.monotonic() - t0
    print(f"{what}: the 2-rank run ended in {wall:.1f} s (LORAKIT_DIST_TIMEOUT={DIST_TIMEOUT})")
    assert res.returncode != 0 and wall < BOUND
    file, cause = (("checkpoint.pt", "No space left on device (injected)") if what == "checkpoint"
                   else ("adapter", "Permission denied (injected)"))
    for rank in (0, 1):
        assert (record / f"rank{rank}.json").is_file(), res.stderr[-3000:]
        r = json.loads((record / f"rank{rank}.json").read_text())
        assert r["type"] == "SaveError" and "LoraError" in r["mro"], r
        assert r["message"].startswith(f"rank {rank}: ") and "failed on rank 0" in r["message"], r
        assert str(out / file) in r["message"] and cause in r["message"], r
        assert f"lorakit train: error: rank {rank}: " in res.stderr  # what the CLI prints on each rank
    assert {p.name: p.read_text() for p in (out / "adapter").iterdir()} == PREVIOUS  # left as it was
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name or ".old-" in p.name]  # nothing torn left
    import torch

    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == (2 if what == "checkpoint" else 4)  # the last good checkpoint
    assert not (out / "results.json").exists()
    # the documented recovery: once the disk is fixed, --resume finishes the run from that checkpoint
    res = subprocess.run([*torchrun(2), "--max-restarts", "0", "-m", "lorakit", *args, "--resume"],
                         env=cli_env(CUDA_VISIBLE_DEVICES="", LORAKIT_DIST_TIMEOUT="120"), capture_output=True,
                         text=True, timeout=BOUND)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["steps_run"] == 6 - state["step"]
    from safetensors.torch import load_file

    assert load_file(str(out / "adapter" / "adapter_model.safetensors"))  # the run's adapter replaced the old
    assert (out / "adapter" / "adapter_config.json").read_text() != PREVIOUS["adapter_config.json"]
    assert not (out / "checkpoint.pt").exists()
