"""Run by test_rank0_save.py under torchrun: ``lorakit train ARGS`` with one write failing on rank 0 only.

``rank0_save_worker.py WHAT RECORD_DIR ARGS...``; WHAT is ``checkpoint`` (the second ``checkpoint.pt``:
disk full) or ``adapter`` (the final adapter: permission denied). Each rank writes the exception that ended
its run (type, its classes, message) to ``RECORD_DIR/rank<R>.json``, then the CLI reports it as usual.
Before lorakit.train.distributed.rank0_save, rank 0 raised alone and the other rank waited in the barrier
(or the next collective) until LORAKIT_DIST_TIMEOUT.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def inject(what: str) -> None:
    import lorakit
    from lorakit.train import checkpoint

    if what == "checkpoint":
        real = checkpoint.atomic_save

        def disk_full_at_second_checkpoint(obj: Any, path: Any) -> None:
            if Path(path).name == checkpoint.CHECKPOINT and Path(path).is_file():
                raise OSError(28, "No space left on device (injected)")
            real(obj, path)

        checkpoint.atomic_save = disk_full_at_second_checkpoint  # type: ignore[assignment]
    elif what == "adapter":

        def denied(*a: Any, **kw: Any) -> None:
            raise PermissionError(13, "Permission denied (injected)")

        lorakit.save_adapter = denied  # type: ignore[assignment]
    else:
        raise SystemExit(f"unknown failure {what!r}")


def main() -> int:
    what, record, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    rank = os.environ["RANK"]
    if rank == "0":
        inject(what)
    from lorakit.train import loop

    run = loop.Trainer.run

    def recording(self: Any) -> Any:
        try:
            return run(self)
        except BaseException as exc:
            info = {"type": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__], "message": str(exc)}
            (record / f"rank{rank}.json").write_text(json.dumps(info))
            raise

    loop.Trainer.run = recording  # type: ignore[method-assign]
    from lorakit.cli import main as cli

    return cli(args)


if __name__ == "__main__":
    sys.exit(main())
