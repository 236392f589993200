"""Where the quantized-base step's RSS goes (issue 15 §5): RSS, anonymous / file RSS and ``VmHWM`` at
each phase of one ``bench_quant`` variant (import, build, each step's forward and backward), the
storages and bytes autograd saves in the first step's forward besides parameters, and the
live malloc bytes (glibc ``mallinfo2``: in-use heap chunks + mmapped chunks) at rest and at their
maximum over all module boundaries of two steps. Live bytes vs RSS separates tensors that are alive
from freed memory the allocator keeps. Not timed: run it beside anything.

    PYTHONPATH=. python benchmarks/quant_rss_phases.py lorakit-nf4 --threads 2
    MALLOC_MMAP_THRESHOLD_=131072 PYTHONPATH=. python benchmarks/quant_rss_phases.py lorakit-fp32

The peak is ``VmHWM`` reset (``/proc/self/clear_refs``) after ``malloc_trim`` once the first step ran,
as ``bench_quant`` does. Each step also prints where its RSS peaked among the module boundaries
(the sampled maximum; ``VmHWM`` can sit a little above it, inside a module). ``--trim forward`` /
``--trim layers`` is an experiment, not lorakit's behaviour: ``malloc_trim(0)`` in a forward hook on the
model (after the loss) / also on every decoder layer, to see how much of the step's peak is freed heap
glibc keeps.
"""

from __future__ import annotations

import argparse
import ctypes
from pathlib import Path

_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
           "keepcost")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in _FIELDS]


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _MallInfo2


def status() -> dict[str, int]:
    """VmRSS / RssAnon / RssFile / VmHWM of this process in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(val.split()[0]) // 1024
    return out


def live_mib() -> float:
    """Bytes in use by malloc (heap chunks of the main arena + every mmapped chunk), MiB."""
    m = _LIBC.mallinfo2()
    return (m.uordblks + m.hblkhd) / 2**20


def main() -> None:
    marks: list[tuple[str, dict[str, int]]] = [("start", status())]
    import torch

    marks.append(("torch", status()))
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", help="a bench_quant step variant, e.g. lorakit-fp32, lorakit-nf4, peft-nf4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trim", choices=("none", "forward", "layers"), default="none",
                    help="malloc_trim(0) after the model's forward / also after each decoder layer's")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from benchmarks import bench_quant as BQ

    model = BQ._build(a.variant, argparse.Namespace(smoke=False))
    marks.append(("built", status()))
    ids = torch.randint(0, model.config.vocab_size, (BQ.BATCH, BQ.SEQ))
    params = [p for p in model.parameters() if p.requires_grad]
    top = {"live": 0.0}
    peak: dict[str, object] = {"rss": 0, "at": ""}

    def sample(m: object, *_: object) -> None:
        top["live"] = max(top["live"], live_mib())
        rss = status()["VmRSS"]
        if rss > peak["rss"]:
            peak.update(rss=rss, at=f"#{peak['n']} {type(m).__name__}")
        peak["n"] = int(peak.get("n", 0)) + 1

    for m in model.modules():
        m.register_forward_hook(sample)
        if not list(m.children()):
            m.register_full_backward_hook(sample)
    trims = [model] if a.trim != "none" else []
    if a.trim == "layers":
        trims += [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for m in trims:  # registered after the samplers: each boundary is sampled before the trim
        m.register_forward_hook(lambda *_: (_LIBC.malloc_trim(0), None)[1])

    own = {t.untyped_storage().data_ptr() for t in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:  # what autograd saves, besides the model's parameters
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def step(tag: str) -> None:
        peak.update(rss=0, at="", n=0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids, labels=ids)
        marks.append((f"{tag} forward", status()))
        out.loss.backward()
        marks.append((f"{tag} backward", status()))
        print(f"{a.variant} {tag}: RSS peaked at boundary {peak['at']} of {peak['n']}: {peak['rss']} MiB")
        del out
        for p in params:
            p.grad = None

    step("s1")
    print(f"{a.variant}: autograd saved {len(saved)} storages, {sum(saved.values()) / 2**20:.1f} MiB in one "
          "forward, besides parameters")
    _LIBC.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    rest = live_mib()
    marks.append(("reset", status()))
    top["live"] = 0.0
    for i in (2, 3):
        step(f"s{i}")
    print(f"{a.variant}: live malloc MiB at rest {rest:.0f}, max over the steps {top['live']:.0f} "
          f"(+{top['live'] - rest:.0f})")
    for name, d in marks:
        print(f"{name:12s} rss {d['VmRSS']:5d}  anon {d['RssAnon']:5d}  file {d['RssFile']:4d}  hwm {d['VmHWM']:5d}")


if __name__ == "__main__":
    main()
