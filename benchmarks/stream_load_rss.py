"""Peak RSS of the streamed quantized load (``lorakit train --quantize``, with ``--fsdp`` the float rest deferred):
VmRSS / RssFile (mapped checkpoint pages) / RssAnon / VmHWM after building the skeleton, every 40 quantized
layers and at the end, in one process (no training)::

    OMP_NUM_THREADS=1 python benchmarks/stream_load_rss.py --model smollm2 --defer --mmap-threshold
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch


def status(tag: str) -> None:
    with open("/proc/self/status") as fh:
        d = dict(line.split(":", 1) for line in fh if ":" in line)
    print(f"{tag:<12} " + "  ".join(f"{k} {int(d[k].split()[0]) / 1024:7.1f} MiB"
                                    for k in ("VmRSS", "RssFile", "RssAnon", "VmHWM")), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--quantize", default="nf4")
    ap.add_argument("--defer", action="store_true", help="leave the float rest on meta, as --fsdp does")
    ap.add_argument("--mmap-threshold", action="store_true",
                    help="serve >= 1 MiB allocations by mmap, as --fsdp on CPU does from the load on")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from lorakit.quant import streaming as QS
    from lorakit.train import distributed, meta_load
    from lorakit.train.models import quantize_for_training, resolve

    if args.mmap_threshold:
        distributed.return_freed_host_memory()
    status("start")
    model = meta_load.skeleton(resolve(args.model), "classification", 2, SimpleNamespace(local_rank=0, rank=0))
    status("skeleton")
    if args.defer:
        meta_load.defer_rest(model)
    read = QS.float_weights

    def traced(m, found):  # noqa: ANN001, ANN202
        for i, item in enumerate(read(m, found)):
            if i % 40 == 0:
                status(f"layer {i}")
            yield item

    QS.float_weights = traced
    quantize_for_training(model, args.quantize)
    status("quantized")


if __name__ == "__main__":
    main()
