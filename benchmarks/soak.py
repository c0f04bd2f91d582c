"""Soak: run `qwen35 serve` (the embedded demo model unless --model) on loopback under moderate mixed load for a
fixed time, sample the server's resident memory, and report whether it grows.

    python benchmarks/soak.py [--duration 600] [--warmup 60] [--concurrency 4] [--out benchmarks/results/soak.json]
                              [--env MALLOC_ARENA_MAX=2] [--tracemalloc] [-- extra serve flags]

The load: chat and completions, streaming and not, clients that drop a stream after two chunks, and bad requests
(each should be a 4xx). It stops by itself after --duration seconds. The summary gives RSS at start, after the
warm-up and at the end, the slope after the warm-up (a least-squares fit of RSS against requests served, per request
and per minute), the count of 5xx answers and client errors. --tracemalloc also samples the server's Python heap
(tracemalloc slows the server down, so use it to tell Python from native growth, not for the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

# Runs the server with a thread that writes the traced Python heap to a file every second.
TRACED_SERVER = r"""
import sys, threading, time, tracemalloc
tracemalloc.start()
path = sys.argv[1]
def report():
    while True:
        with open(path, "w") as f:
            f.write(str(tracemalloc.get_traced_memory()[0]))
        time.sleep(1)
threading.Thread(target=report, daemon=True).start()
from qwen35.cli import main
sys.exit(main(sys.argv[2:]))
"""

WORDS = "the quick brown fox jumps over a lazy dog while seven small robots sing about memory and time".split()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def num_threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Load:
    """Worker threads sending a random mix of requests until `stop` is set; counts per kind and per status."""

    def __init__(self, url: str, model: str, seed: int):
        self.url, self.model = url, model
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.done = 0
        self.counts: dict[str, int] = {}
        self.server_errors: list[str] = []
        self.client_errors: list[str] = []

    def text(self, rng: random.Random) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 120)))

    def one(self, client: httpx.Client, rng: random.Random) -> str:
        kind = rng.choices(["chat", "chat-stream", "completion", "completion-stream", "abort", "bad"],
                           weights=[3, 3, 2, 2, 1, 1])[0]
        max_tokens = rng.randint(1, 48)
        sampling = {"max_tokens": max_tokens, "temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randint(0, 99)}
        if kind.startswith("chat") or kind == "abort":
            path = "/v1/chat/completions"
            body = {"model": self.model, "messages": [{"role": "user", "content": self.text(rng)}], **sampling,
                    "chat_template_kwargs": {"enable_thinking": rng.random() < 0.5}}
        else:
            path = "/v1/completions"
            body = {"model": self.model, "prompt": self.text(rng), **sampling, "logprobs": rng.choice([None, 2])}
        if kind == "bad":
            body[rng.choice(["temperature", "max_tokens", "top_p", "n"])] = -5
        body["stream"] = kind.endswith("stream") or kind == "abort"
        if not body["stream"]:
            r = client.post(self.url + path, json=body)
            self.check(kind, r.status_code, r.text, bad=kind == "bad")
            return kind
        with client.stream("POST", self.url + path, json=body) as r:
            if r.status_code != 200:
                self.check(kind, r.status_code, r.read().decode(errors="replace"))
                return kind
            for k, _ in enumerate(r.iter_lines()):
                if kind == "abort" and k >= 2:
                    break  # leaving the block closes the connection mid-stream
        return kind

    def check(self, kind: str, status: int, text: str, bad: bool = False) -> None:
        if status >= 500:
            with self.lock:
                self.server_errors.append(f"{kind} {status} {text[:200]}")
        elif (status != 200) != bad:
            with self.lock:
                self.client_errors.append(f"{kind} {status} {text[:200]}")

    def worker(self, k: int) -> None:
        rng = random.Random(self.rng.random() + k)
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                try:
                    kind = self.one(client, rng)
                except httpx.HTTPError as e:
                    with self.lock:
                        self.client_errors.append(f"{type(e).__name__}: {e}")
                    continue
                with self.lock:
                    self.done += 1
                    self.counts[kind] = self.counts.get(kind, 0) + 1


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y against x."""
    if len(points) < 3:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return None if sxx == 0 else sum((x - mx) * (y - my) for x, y in points) / sxx


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--duration", type=float, default=600, help="seconds of load, warm-up included")
    p.add_argument("--warmup", type=float, default=60, help="seconds before the slope is measured")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--sample-every", type=float, default=2.0, help="seconds between RSS samples")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="server environment variable")
    p.add_argument("--tracemalloc", action="store_true", help="also sample the server's Python heap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the JSON summary here")
    p.add_argument("serve_args", nargs="*", help="extra `qwen35 serve` flags (after --)")
    args = p.parse_args(argv)
    if not 0 <= args.warmup < args.duration:
        p.error("--warmup must be below --duration")

    port = free_port()
    serve = ["serve", "--port", str(port), "--served-model-name", "soak", *args.serve_args]
    if args.model:
        serve += ["--model", args.model]
    env = {**os.environ, **dict(kv.split("=", 1) for kv in args.env)}
    tmp = Path(tempfile.mkdtemp(prefix="qwen35-soak-"))
    heap_file = tmp / "heap"
    cmd = ([sys.executable, "-c", TRACED_SERVER, str(heap_file), *serve] if args.tracemalloc
           else [sys.executable, "-m", "qwen35", *serve])
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    samples: list[dict] = []
    load = Load(url, "soak", args.seed)
    threads: list[threading.Thread] = []
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start; see {log.name}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        start = time.monotonic()
        rss_start = rss_bytes(proc.pid)
        threads = [threading.Thread(target=load.worker, args=(k,), daemon=True) for k in range(args.concurrency)]
        for t in threads:
            t.start()
        while (elapsed := time.monotonic() - start) < args.duration:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}; see {log.name}")
            sample = {"t": round(elapsed, 1), "requests": load.done, "rss": rss_bytes(proc.pid),
                      "threads": num_threads(proc.pid)}
            if args.tracemalloc and heap_file.exists():
                sample["py_heap"] = int(heap_file.read_text() or 0)
            samples.append(sample)
            print(f"{elapsed:7.1f} s  {load.done:6d} requests  RSS {sample['rss'] / 2**20:8.1f} MiB  "
                  f"threads {sample['threads']}" + (f"  py heap {sample['py_heap'] / 2**20:.1f} MiB"
                                                     if "py_heap" in sample else ""), flush=True)
            time.sleep(args.sample_every)
    finally:
        load.stop.set()
        for t in threads:
            t.join(150)
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

    steady = [s for s in samples if s["t"] >= args.warmup]
    per_request = slope([(s["requests"], s["rss"]) for s in steady])
    per_second = slope([(s["t"], s["rss"]) for s in steady])
    requests_after_warmup = steady[-1]["requests"] - steady[0]["requests"] if steady else 0
    summary = {
        "duration_s": args.duration, "warmup_s": args.warmup, "concurrency": args.concurrency, "env": args.env,
        "serve_args": args.serve_args, "requests": load.done, "by_kind": load.counts,
        "requests_per_s": round(load.done / args.duration, 2), "server_errors_5xx": len(load.server_errors),
        "client_errors": len(load.client_errors), "first_errors": (load.server_errors + load.client_errors)[:5],
        "rss_start_mib": round(rss_start / 2**20, 1),
        "rss_after_warmup_mib": round(steady[0]["rss"] / 2**20, 1) if steady else None,
        "rss_end_mib": round(samples[-1]["rss"] / 2**20, 1) if samples else None,
        "rss_max_mib": round(max(s["rss"] for s in samples) / 2**20, 1) if samples else None,
        "growth_after_warmup_mib": round((steady[-1]["rss"] - steady[0]["rss"]) / 2**20, 1) if steady else None,
        "requests_after_warmup": requests_after_warmup,
        "slope_kib_per_request": None if per_request is None else round(per_request / 1024, 2),
        "slope_mib_per_minute": None if per_second is None else round(per_second * 60 / 2**20, 2),
        "threads_end": samples[-1]["threads"] if samples else None,
        "samples": samples,
    }
    if any("py_heap" in s for s in steady):
        heap = [s for s in steady if "py_heap" in s]
        summary["py_heap_after_warmup_mib"] = round(heap[0]["py_heap"] / 2**20, 1)
        summary["py_heap_end_mib"] = round(heap[-1]["py_heap"] / 2**20, 1)
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    return 1 if load.server_errors else 0


if __name__ == "__main__":
    sys.exit(main())
