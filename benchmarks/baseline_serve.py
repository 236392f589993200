"""The naive baseline of ``bench_serve.py``: what a user writes today without a serving engine.

A FastAPI endpoint around PEFT + transformers ``generate``: one request at a time (a lock), the
request's adapter picked with ``set_adapter``, streaming through ``TextIteratorStreamer``. It speaks
enough of ``/v1/completions`` (model, prompt, max_tokens, temperature 0, stream, stream_options)
for the same load generator::

    python -m benchmarks.baseline_serve --model DIR --adapter-dir DIR --adapters 8 --port 8001 --threads 2
    python -m benchmarks.baseline_serve ... --device cuda --dtype bf16    # the model (and the adapters) on a GPU

PEFT loads the adapters onto the device of the base layers they wrap.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DTYPES = ("fp32", "bf16", "fp16")


def build_app(model_dir: str, adapter_dir: str, names: list[str], device: str = "cpu", dtype: str = "fp32") -> Any:
    import torch
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    tok = AutoTokenizer.from_pretrained(model_dir)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device=device, dtype=dt).eval()
    model = PeftModel.from_pretrained(base, str(Path(adapter_dir) / names[0]), adapter_name=names[0]).eval()
    for n in names[1:]:
        model.load_adapter(str(Path(adapter_dir) / n), adapter_name=n)
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions")
    def completions(body: dict[str, Any]) -> Any:
        ids = tok(body["prompt"], return_tensors="pt").to(device)
        n_new = int(body.get("max_tokens", 16))

        def run(streamer: Any = None) -> list[int]:
            model.set_adapter(body["model"])
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=n_new, do_sample=False, streamer=streamer)
            return out[0, ids["input_ids"].shape[1]:].tolist()

        def usage(gen: list[int]) -> dict[str, int]:
            p = ids["input_ids"].shape[1]
            return {"prompt_tokens": p, "completion_tokens": len(gen), "total_tokens": p + len(gen)}

        if not body.get("stream"):
            with lock:
                gen = run()
            return JSONResponse({"object": "text_completion", "model": body["model"], "usage": usage(gen),
                                 "choices": [{"index": 0, "text": tok.decode(gen, skip_special_tokens=True),
                                              "finish_reason": "length"}]})

        def events() -> Iterator[str]:
            with lock:
                streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
                holder: dict[str, list[int]] = {}
                th = threading.Thread(target=lambda: holder.setdefault("ids", run(streamer)))
                th.start()
                for text in streamer:
                    if text:
                        yield _data({"object": "text_completion", "choices": [{"index": 0, "text": text,
                                                                               "finish_reason": None}]})
                th.join()
            yield _data({"object": "text_completion", "choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
            yield _data({"object": "text_completion", "choices": [], "usage": usage(holder.get("ids", []))})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter-dir", required=True)
    ap.add_argument("--adapters", type=int, default=8, help="load adapters a0 .. a{N-1}")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N: where the model and the inputs go")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32", help="the base model's weight dtype")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.harness import device_of

    device_of(args)  # a clear stop when --device cuda has no GPU
    import torch
    import uvicorn

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    app = build_app(args.model, args.adapter_dir, [f"a{i}" for i in range(args.adapters)], args.device, args.dtype)
    print(f"baseline ready in {time.perf_counter() - t0:.1f} s", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
