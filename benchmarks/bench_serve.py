"""``lorakit serve`` under load: throughput and latency with 1, 8 and 64 adapters, against the naive baseline.

SmolLM2-135M fp32, adapters all-linear r=16 with random non-zero A and B, prompts of 16-64 tokens,
32 new tokens (greedy), 16 concurrent streaming clients on localhost, a bounded number of requests
per setting (the load generator stops by itself). The server runs as its own process with
``--threads`` torch threads; the baseline (``benchmarks/baseline_serve.py``: FastAPI + PEFT +
``generate``, one request at a time, ``set_adapter``) runs the same load at 8 adapters. Every
request must end with exactly one complete response (a finish reason, then ``[DONE]``) or one
error event; the servers' logs must hold no error. Greedy texts of the baseline's requests are
compared with lorakit's for the same requests. ``--rounds N`` runs the settings N times in turn (1, 8,
64, 1, 8, 64, ...) so that a machine whose load drifts slows every setting alike; each setting's figure
is over all its rounds, and the per-round ratios are printed. The server's CPU seconds (user + system,
``/proc``) per 1,000 generated tokens are reported next to the wall-clock throughput::

    python -m benchmarks.bench_serve --threads 2 --requests 48 --baseline-requests 16 --out /tmp/serve.md
    python -m benchmarks.bench_serve --threads 2 --requests 16 --rounds 3 --baseline-requests 16
    python -m benchmarks.bench_serve --device cuda --dtype bf16 --requests 64 --out runs/gpu/serve.md  # GPU form

``--device`` / ``--dtype`` (default cpu, fp32: the CPU figures) go to both servers: ``lorakit serve
--device --dtype`` and the baseline's model (``baseline_serve.py --device --dtype``); the adapters
are made on the CPU in fp32 either way and cast on load.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

WORDS = ("the model serves many adapters at once while each request picks its own low rank update and the "
         "engine decodes one token for every running row before it admits new prompts into the batch").split()


def make_adapters(model_dir: str, out: Path, n: int, r: int = 16, seed: int = 0) -> None:
    """``out/a0 .. a{n-1}``: all-linear rank-``r`` adapters, A and B random (B non-zero), kept between runs."""
    if all((out / f"a{i}" / "adapter_model.safetensors").is_file() for i in range(n)):
        return
    import torch
    from transformers import AutoModelForCausalLM

    import lorakit

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2 * r, targets="all-linear"))
    layers = [layer for _, layer in lorakit.lora_layers(model)]
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for layer in layers:
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) / layer.lora_A.shape[1] ** 0.5)
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)
        lorakit.save_adapter(model, out / f"a{i}")


def prompts(tokenizer: Any, n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        want = rng.randint(lo, hi)
        words = [rng.choice(WORDS) for _ in range(want * 2)]
        ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:want]
        out.append(tokenizer.decode(ids))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A server subprocess with its log in a file; ``stop()`` sends SIGTERM and returns the exit code."""

    def __init__(self, cmd: list[str], log: Path, threads: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        self.log = log
        self.fh = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.fh, stderr=subprocess.STDOUT, env=env)

    def wait_up(self, url: str, timeout: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not come up")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = -9
        self.fh.close()
        return code

    def errors(self) -> list[str]:
        return [ln for ln in self.log.read_text().splitlines() if "Traceback" in ln or " ERROR " in ln]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``; nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def one_request(client: Any, body: dict[str, Any]) -> dict[str, Any]:
    """Stream one completion; times of the first and every later text chunk, the outcome."""
    t0 = time.perf_counter()
    times, text, finish, usage, error, done = [], [], None, None, None, False
    try:
        with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}: {r.read()[:200]!r}", "t0": t0}
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    error = ev["error"]["message"]
                    continue
                if ev.get("usage"):
                    usage = ev["usage"]
                for c in ev.get("choices", []):
                    if c.get("text"):
                        times.append(time.perf_counter())
                        text.append(c["text"])
                    if c.get("finish_reason"):
                        finish = c["finish_reason"]
    except Exception as exc:  # noqa: BLE001 - a lost request is a result
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "t0": t0}
    ok = done and error is None and finish is not None and usage is not None
    return {"ok": ok, "error": error, "t0": t0, "times": times, "text": "".join(text), "finish": finish,
            "tokens": (usage or {}).get("completion_tokens", 0), "done": done}


def run_load(url: str, bodies: list[dict[str, Any]], clients: int) -> tuple[list[dict[str, Any]], float]:
    """``clients`` threads drain the bounded list of requests; (results in request order, wall seconds)."""
    import httpx

    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(bodies)):
        todo.put(i)
    results: list[dict[str, Any]] = [{} for _ in bodies]

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                results[i] = one_request(c, bodies[i])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summarize(label: str, results: list[dict[str, Any]], wall: float, cpu: float = float("nan")) -> dict[str, Any]:
    ok = [r for r in results if r.get("ok")]
    ttft = [r["times"][0] - r["t0"] for r in ok if r["times"]]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:], strict=False)]
    tokens = sum(r["tokens"] for r in ok)
    return {"label": label, "requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
            "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "cpu_s": cpu,
            "cpu_per_1k": 1e3 * cpu / tokens if tokens else float("nan"),
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99),
            "lost": [r.get("error") for r in results if not r.get("ok")][:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the SmolLM2 copy of benchmarks.harness)")
    ap.add_argument("--adapter-dir", default="/tmp/lorakit-bench-adapters")
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 8, 64], help="distinct adapters in the mix")
    ap.add_argument("--requests", type=int, default=48, help="requests per lorakit setting and round")
    ap.add_argument("--rounds", type=int, default=1, help="run the lorakit settings this many times in turn")
    ap.add_argument("--baseline-requests", type=int, default=16, help="requests for the baseline (0: skip it)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, nargs=2, default=[16, 64])
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N: where both servers put the model")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                    help="the servers' weight dtype (lorakit serve --dtype; the baseline's model dtype)")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--logs", default="/tmp/lorakit-bench-logs")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.harness import device_of, smollm2_dir

    device_of(args)  # a clear stop when --device cuda has no GPU, before anything starts
    if args.model is None:
        args.model = smollm2_dir()
    from transformers import AutoTokenizer

    adir, logs = Path(args.adapter_dir), Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    n_adapters = max(args.counts + ([8] if args.baseline_requests else []))
    t0 = time.perf_counter()
    make_adapters(args.model, adir, n_adapters, r=args.rank)
    print(f"{n_adapters} adapters ready in {time.perf_counter() - t0:.0f} s", flush=True)
    tok = AutoTokenizer.from_pretrained(args.model)
    texts = prompts(tok, max(args.requests, args.baseline_requests), *args.prompt_tokens)

    def bodies(k: int, n: int) -> list[dict[str, Any]]:
        return [{"model": f"a{i % k}", "prompt": texts[i], "max_tokens": args.new_tokens, "temperature": 0,
                 "stream": True, "stream_options": {"include_usage": True}} for i in range(n)]

    rows, texts_by = [], {}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    srv = Proc([sys.executable, "-m", "lorakit.serve", "--model", args.model, "--adapter-dir", str(adir),
                "--max-loaded", str(max(args.counts)), "--max-batch", str(args.max_batch), "--threads",
                str(args.threads), "--port", str(port), "--max-queue", "1024", "--log-level", "warning",
                "--device", args.device, "--dtype", args.dtype],
               logs / "lorakit.log", args.threads)
    try:
        srv.wait_up(url)
        print(f"lorakit server up at {url}", flush=True)
        runs: dict[int, list[tuple[list[dict[str, Any]], float, float]]] = {k: [] for k in args.counts}
        for rnd in range(args.rounds):
            for k in args.counts:
                if rnd == 0:
                    warm = [{"model": f"a{i}", "prompt": "warm up", "max_tokens": 2, "stream": True} for i in range(k)]
                    run_load(url, warm, args.clients)  # adapters resident, first-call costs paid
                c0 = cpu_seconds(srv.proc.pid)
                res, wall = run_load(url, bodies(k, args.requests), args.clients)
                runs[k].append((res, wall, cpu_seconds(srv.proc.pid) - c0))
                texts_by.setdefault(k, [r.get("text") for r in res])
                print(json.dumps(summarize(f"round {rnd + 1}, {k} adapter(s)", res, wall, runs[k][-1][2])),
                      flush=True)
        for k in args.counts:
            rows.append(summarize(f"lorakit, {k} adapter(s)", [r for res, _, _ in runs[k] for r in res],
                                  sum(w for _, w, _ in runs[k]), sum(c for _, _, c in runs[k])))
    finally:
        code = srv.stop()
    errs = srv.errors()
    print(f"lorakit server exit {code}; log errors: {len(errs)}", flush=True)

    base_row, same = None, None
    if args.baseline_requests:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        base = Proc([sys.executable, "-m", "benchmarks.baseline_serve", "--model", args.model, "--adapter-dir",
                     str(adir), "--adapters", "8", "--threads", str(args.threads), "--port", str(port),
                     "--device", args.device, "--dtype", args.dtype],
                    logs / "baseline.log", args.threads)
        try:
            base.wait_up(url)
            run_load(url, [{"model": f"a{i}", "prompt": "warm up", "max_tokens": 2, "stream": True}
                           for i in range(8)], args.clients)
            c0 = cpu_seconds(base.proc.pid)
            res, wall = run_load(url, bodies(8, args.baseline_requests), args.clients)
            base_row = summarize("baseline (PEFT + generate, one at a time), 8 adapters", res, wall,
                                 cpu_seconds(base.proc.pid) - c0)
            print(json.dumps(base_row), flush=True)
            if 8 in texts_by:
                same = sum(a == r.get("text") for a, r in zip(texts_by[8], res, strict=False))
        finally:
            base.stop()
        rows.append(base_row)
    anchor = next((r for r in rows if r["label"].startswith("lorakit, 1 ")), rows[0])
    per_round = []
    if 1 in runs and args.rounds > 1:
        for k in args.counts:
            if k != 1:
                rs = [(sum(r.get("tokens", 0) for r in a[0]) / a[1]) / (sum(r.get("tokens", 0) for r in b[0]) / b[1])
                      for a, b in zip(runs[k], runs[1], strict=True)]
                per_round.append(f"{k} ÷ 1 adapter by round: " + ", ".join(f"{x:.2f}x" for x in rs))
    gpu = ""
    if args.device.startswith("cuda"):
        import torch

        gpu = f" ({torch.cuda.get_device_name(torch.device(args.device))})"
    lines = [f"{args.requests} requests per lorakit setting and round, {args.rounds} round(s) "
             f"({args.baseline_requests} for the baseline), "
             f"{args.clients} concurrent streaming clients, prompts {args.prompt_tokens[0]}-{args.prompt_tokens[1]} "
             f"tokens, {args.new_tokens} new tokens (greedy), all-linear r={args.rank}, server threads "
             f"{args.threads}, max batch {args.max_batch}, {args.device} {args.dtype}{gpu}.", "",
             "| setting | ok / requests | tokens/s | vs 1 adapter | server CPU s / 1k tokens | TTFT p50 / p99 (s) "
             "| ITL p50 / p99 (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['ok']} / {r['requests']} | {r['tok_s']:.1f} | "
                     f"{r['tok_s'] / anchor['tok_s']:.2f}x | {r['cpu_per_1k']:.1f} | "
                     f"{r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
                     f"{1e3 * r['itl_p50']:.0f} / {1e3 * r['itl_p99']:.0f} |")
    lines += [""] + per_round if per_round else []
    if base_row is not None:
        k8 = next((r for r in rows if r["label"].startswith("lorakit, 8 ")), None)
        if k8 is not None:
            lines += ["", f"lorakit / baseline throughput at 8 adapters: {k8['tok_s'] / base_row['tok_s']:.2f}x; "
                          f"greedy texts equal to the baseline's for the same requests: {same} / "
                          f"{args.baseline_requests}."]
    lines += ["", f"lorakit server: exit code {code} after SIGTERM, {len(errs)} error lines in its log; "
                  f"requests lost or failed: {sum(r['errors'] for r in rows)}."]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
