"""Prefix-caching benchmark: run `qwen35 serve` (the embedded demo model unless --model) on loopback twice, with
`--enable-prefix-caching` and with `--no-enable-prefix-caching`, and measure two workloads through the HTTP API.

    python benchmarks/prefix_cache_bench.py [--quick] [--model DIR | --geometry qwen3.5-0.8b] [--conversations 8]
                                            [--turns 6]
                                            [--concurrent] [--batch 16] [--out FILE] [-- extra serve flags]

--geometry builds a random-weight checkpoint of a released model's text geometry (e.g. qwen3.5-0.8b: 24 layers,
18 Gated DeltaNet) with the demo model's tokenizer and vocabulary, so prefill costs what that size costs (the demo
model's TTFT is mostly HTTP and template overhead); its replies are noise, which the workloads do not mind.

1. Multi-turn chat: --conversations chats of --turns turns each. Every turn sends the whole conversation so far (the
   previous assistant replies as the server returned them) plus a new user message of about --user-words words,
   streaming, temperature 0, --max-tokens tokens. A turn round sends turn k of every conversation, one request at a
   time (or all at once with --concurrent). TTFT is measured here, from sending the request to the first chunk that
   carries a token (content, reasoning_content, tool_calls or a logprob: the requests ask for logprobs so that a token
   whose text the server holds back still shows). A reply goes back into the history as its content only, as OpenAI
   clients send it (the chat template drops earlier turns' reasoning anyway). Per round, the server's /metrics give
   the prompt tokens and the prompt tokens served from the cache (computed = prompt - cache hits).
   Baseline "new tokens only": after round k >= 2, for each conversation, one fresh chat request with a single user
   message of words never sent before, sized (with /tokenize) so that its rendered prompt has as many tokens as the
   conversation's prompt grew since round k-1 (this turn's prompt length minus the previous turn's); it is sent alone,
   on the same server, so its TTFT is what prefilling only the new tokens costs. The ratio TTFT(turn k) / TTFT(new
   tokens only) is the issue's target: at most 1.5 from turn 2 on with caching on.
2. Shared system prompt: --batch requests with the same system prompt of about --system-words words and different
   short questions, submitted at once. Reports prompt tokens computed (prompt - cache hits) against the ideal (every
   prompt's unshared part, plus the shared part once, at the cache's 16-token block granularity) and the wall time.

Prints a table per workload and writes a JSON record (command, machine, date, git revision, all raw timings).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 16  # the prefix cache's block size in tokens
MODEL_NAME = "bench"
# Words of the demo model's corpus (Python's documentation), so they encode into few tokens.
WORDS = ("the a list string function returns value object module class method argument keyword default file path "
         "error exception raise dictionary key item index number integer float byte buffer stream iterator "
         "generator sequence tuple set frozenset attribute instance type call name line character encoding decode "
         "encode format option flag time date thread lock queue process signal socket address port read write "
         "open close seek size length empty none true false new old first last next previous count sort reverse "
         "copy deep shallow compare equal greater less print input output result called given when if else with "
         "for each every which that this those how what why does do is are can may should must not only also").split()
ON, OFF = "on", "off"
# Workload sizes: (default, default with --quick).
SIZES = {"conversations": (8, 2), "turns": (6, 2), "max_tokens": (32, 16), "batch": (16, 4), "system_words": (950, 120)}


def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_help() -> str:
    r = subprocess.run([sys.executable, "-m", "qwen35", "serve", "--help"], capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0:
        raise SystemExit(f"`qwen35 serve --help` failed:\n{r.stderr[-2000:]}")
    return r.stdout


class Server:
    """`qwen35 serve` as a child process on a free loopback port; `stop()` always ends it."""

    def __init__(self, flags: list[str], log_dir: Path, tag: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{tag}.log"
        self.cmd = [sys.executable, "-m", "qwen35", "serve", "--port", str(self.port), "--served-model-name",
                    MODEL_NAME, *flags]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                log = self.log_path.read_text()
                if "unrecognized arguments" in log:
                    raise SystemExit(f"`qwen35 serve` refused its flags: {log.strip().splitlines()[-1]}")
                raise SystemExit(f"the server exited with {self.proc.returncode} before it was ready; last lines of "
                                 f"{self.log_path}:\n" + "\n".join(log.splitlines()[-20:]))
            if time.monotonic() > deadline:
                raise SystemExit(f"the server was not ready after {timeout:.0f} s; see {self.log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def read_metrics(client: httpx.Client, url: str) -> dict[str, float]:
    """The server's /metrics as {name (with labels): value}."""
    r = client.get(url + "/metrics")
    r.raise_for_status()
    out = {}
    for line in r.text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?)\s+(\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


PROMPT_METRIC = "qwen35_prompt_tokens_total"
HITS_METRIC = "qwen35_prefix_cache_hits_total"


def token_delta(before: dict, after: dict) -> dict:
    """Prompt tokens and cache-hit tokens between two /metrics reads; hits None when the server has no such metric."""
    prompt = after[PROMPT_METRIC] - before[PROMPT_METRIC]
    hits = after[HITS_METRIC] - before[HITS_METRIC] if HITS_METRIC in after else None
    return {"prompt": int(prompt), "hits": None if hits is None else int(hits),
            "computed": int(prompt - (hits or 0))}


def chat(client: httpx.Client, url: str, messages: list[dict], max_tokens: int, template_kwargs: dict | None) -> dict:
    """One streamed chat request: client-side TTFT, the reply, and the usage the server reports."""
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": True}
    if template_kwargs is not None:
        body["chat_template_kwargs"] = template_kwargs
    content, reasoning, usage, ttft = [], [], None, None
    t0 = time.perf_counter()
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"chat request failed: {r.status_code} {r.read().decode(errors='replace')[:500]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                d = choice.get("delta") or {}
                if ttft is None and (d.get("content") or d.get("reasoning_content") or d.get("tool_calls")
                                     or (choice.get("logprobs") or {}).get("content")):
                    ttft = time.perf_counter() - t0
                content.append(d.get("content") or "")
                reasoning.append(d.get("reasoning_content") or "")
    total = time.perf_counter() - t0
    if usage is None:
        raise RuntimeError("the stream carried no usage chunk")
    details = usage.get("prompt_tokens_details") or {}
    return {"ttft": ttft if ttft is not None else total, "total": total, "content": "".join(content),
            "reasoning": "".join(reasoning), "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"], "cached_tokens": details.get("cached_tokens")}


def tokenize(client: httpx.Client, url: str, messages: list[dict], template_kwargs: dict | None) -> list[int]:
    body = {"model": MODEL_NAME, "messages": messages, "add_generation_prompt": True}
    if template_kwargs is not None:
        body["chat_template_kwargs"] = template_kwargs
    r = client.post(url + "/tokenize", json=body)
    r.raise_for_status()
    return r.json()["tokens"]


def sized_message(client, url, rng: random.Random, target: int, template_kwargs) -> tuple[list[dict], int]:
    """A single fresh user message whose rendered chat prompt has as close to `target` tokens as words allow."""
    n, best = max(1, target), None
    for _ in range(6):
        msgs = [{"role": "user", "content": words(random.Random(rng.random()), n)}]
        length = len(tokenize(client, url, msgs, template_kwargs))
        if best is None or abs(length - target) < abs(best[1] - target):
            best = (msgs, length)
        if length == target:
            break
        # Words encode into about the same number of tokens each: step by the error, scaled.
        per_word = max(0.5, (length - 8) / n)
        n = max(1, n + round((target - length) / per_word))
    return best


def run_all(fns: list) -> list:
    """Call each function in its own thread, all at once; their results in order (the first error re-raised)."""
    results: list = [None] * len(fns)
    errors: list = []
    start = threading.Barrier(len(fns))

    def work(i, fn):
        try:
            start.wait()
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, fn), daemon=True) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def multi_turn(url: str, args, template_kwargs) -> list[dict]:
    """Workload 1 on one server: a record per turn round."""
    conversations: list[list[dict]] = [[] for _ in range(args.conversations)]
    prompt_lens: list[list[int]] = [[] for _ in range(args.conversations)]
    previous_ids: list[list[int]] = [[] for _ in range(args.conversations)]
    rounds = []
    with httpx.Client(timeout=600) as client:
        for k in range(1, args.turns + 1):
            for c, msgs in enumerate(conversations):
                msgs.append({"role": "user", "content": f"Question {k} of chat {c}: "
                             + words(random.Random(f"user {c} {k}"), args.user_words) + "?"})
            # How much of this turn's prompt repeats the previous turn's: the most a prefix cache could reuse.
            ids = [tokenize(client, url, msgs, template_kwargs) for msgs in conversations]
            common = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                      for x, y in zip(ids, previous_ids)]
            previous_ids = ids
            before = read_metrics(client, url)
            if args.concurrent:
                clients = [httpx.Client(timeout=600) for _ in conversations]
                try:
                    replies = run_all([lambda cl=cl, m=list(msgs): chat(cl, url, m, args.max_tokens, template_kwargs)
                                       for cl, msgs in zip(clients, conversations)])
                finally:
                    for cl in clients:
                        cl.close()
            else:
                replies = [chat(client, url, list(msgs), args.max_tokens, template_kwargs) for msgs in conversations]
            tokens = token_delta(before, read_metrics(client, url))
            for c, reply in enumerate(replies):
                if reply["prompt_tokens"] != len(ids[c]):  # then the "repeat" column measured another prompt
                    raise RuntimeError(f"/tokenize gave {len(ids[c])} tokens for chat {c} turn {k}, the request "
                                       f"{reply['prompt_tokens']}")
                conversations[c].append({"role": "assistant", "content": reply["content"]})
                prompt_lens[c].append(reply["prompt_tokens"])
            record = {"turn": k, "ttft": [r["ttft"] for r in replies],
                      "prompt_tokens": [r["prompt_tokens"] for r in replies],
                      "cached_tokens_usage": [r["cached_tokens"] for r in replies], "tokens": tokens,
                      "common_prefix_with_previous": common}
            if k >= 2:
                base, lens, targets = [], [], []
                before = read_metrics(client, url)
                for c in range(args.conversations):
                    target = prompt_lens[c][-1] - prompt_lens[c][-2]
                    msgs, length = sized_message(client, url, random.Random(f"new {c} {k}"), target, template_kwargs)
                    base.append(chat(client, url, msgs, args.max_tokens, template_kwargs)["ttft"])
                    lens.append(length)
                    targets.append(target)
                record["new_tokens"] = targets
                record["baseline_prompt_tokens"] = lens
                record["baseline_ttft"] = base
                record["baseline_tokens"] = token_delta(before, read_metrics(client, url))
            rounds.append(record)
            print(f"  turn {k}: mean TTFT {mean(record['ttft']) * 1000:.1f} ms, prompt {tokens['prompt']}, "
                  f"computed {tokens['computed']}", flush=True)
    return rounds


def shared_prefix(url: str, args, template_kwargs) -> dict:
    """Workload 2 on one server: --batch requests sharing one system prompt, all submitted at once."""
    system = "You answer questions about Python. " + words(random.Random("system"), args.system_words) + "."
    batches = [[{"role": "system", "content": system},
                {"role": "user", "content": f"Question {i}: " + words(random.Random(f"q {i}"), 12) + "?"}]
               for i in range(args.batch)]
    clients = [httpx.Client(timeout=600) for _ in batches]
    try:
        ids = [tokenize(clients[0], url, m, template_kwargs) for m in batches[:2]]
        common = next((i for i, (a, b) in enumerate(zip(*ids)) if a != b), min(map(len, ids)))
        before = read_metrics(clients[0], url)
        t0 = time.perf_counter()
        replies = run_all([lambda cl=cl, m=m: chat(cl, url, m, args.max_tokens, template_kwargs)
                           for cl, m in zip(clients, batches)])
        wall = time.perf_counter() - t0
        tokens = token_delta(before, read_metrics(clients[0], url))
    finally:
        for cl in clients:
            cl.close()
    shared = common // BLOCK * BLOCK
    prompts = [r["prompt_tokens"] for r in replies]
    return {"requests": args.batch, "shared_prefix_tokens": common, "shared_cacheable_tokens": shared,
            "prompt_tokens": prompts, "ideal_computed": sum(prompts) - (len(prompts) - 1) * shared,
            "tokens": tokens, "wall_s": wall, "ttft": [r["ttft"] for r in replies],
            "cached_tokens_usage": [r["cached_tokens"] for r in replies]}


def warm_up(url: str, args, template_kwargs) -> None:
    """Two short requests, not measured: the first calls of a fresh process are slower."""
    with httpx.Client(timeout=600) as client:
        for i in range(2):
            msgs = [{"role": "user", "content": f"Warm-up {i}: " + words(random.Random(f"warm {i}"), 20)}]
            chat(client, url, msgs, args.max_tokens, template_kwargs)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None

    def git(*a):
        r = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_rev": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "-uno")),
            "python": sys.version.split()[0]}


def summarize(turns: list[dict], batch: dict) -> dict:
    """The figures the issue's targets are about, per run."""
    ratios = [t["ratio"] for t in turns if "ratio" in t]
    return {"ttft_ms_per_turn": [round(mean(t["ttft"]) * 1000, 2) for t in turns],
            "new_only_ttft_ms_per_turn": [round(mean(t["baseline_ttft"]) * 1000, 2) if "baseline_ttft" in t else None
                                          for t in turns],
            "ratio_per_turn": [round(t["ratio"], 3) if "ratio" in t else None for t in turns],
            "max_ratio_from_turn_2": round(max(ratios), 3) if ratios else None,
            "chat_prompt_tokens": sum(t["tokens"]["prompt"] for t in turns),
            "chat_computed_tokens": sum(t["tokens"]["computed"] for t in turns),
            "batch_prompt_tokens": batch["tokens"]["prompt"], "batch_computed_tokens": batch["tokens"]["computed"],
            "batch_ideal_computed": batch["ideal_computed"], "batch_wall_s": round(batch["wall_s"], 3)}


def fmt(x, scale=1000.0, digits=1) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def print_tables(results: dict) -> None:
    modes = [m for m in (ON, OFF) if m in results["runs"]]
    print("\nMulti-turn chat (TTFT in ms, means over conversations; tokens summed over conversations)")
    head = f"{'turn':>4} {'prompt':>7} {'new':>6} {'repeat':>6}"
    for m in modes:
        head += f" | {m + ': TTFT':>9} {'computed':>8} {'hits':>6} {'new-only':>8} {'ratio':>5}"
    print(head)
    turns = results["runs"][modes[0]]["multi_turn"]
    for i, t in enumerate(turns):
        row = (f"{t['turn']:>4} {t['tokens']['prompt']:>7} {sum(t.get('new_tokens', t['prompt_tokens'])):>6} "
               f"{sum(t['common_prefix_with_previous']):>6}")
        for m in modes:
            r = results["runs"][m]["multi_turn"][i]
            hits = r["tokens"]["hits"]
            row += (f" | {fmt(mean(r['ttft'])):>9} {r['tokens']['computed']:>8} {'-' if hits is None else hits:>6}"
                    f" {fmt(mean(r.get('baseline_ttft', []))):>8} {fmt(r.get('ratio'), 1, 2):>5}")
        print(row)
    print("(new: the prompt growth since the previous turn; repeat: the prompt's tokens equal to the previous turn's "
          "prompt, the most a cache can reuse; new-only: TTFT of a fresh prompt of that many tokens; "
          "ratio: TTFT / new-only, target <= 1.5 with caching on from turn 2)")
    print("\nShared system prompt batch (all submitted at once)")
    print(f"{'mode':>4} {'requests':>8} {'prompt':>7} {'computed':>8} {'ideal':>6} {'hits':>6} {'wall s':>7} "
          f"{'TTFT ms':>8}")
    for m in modes:
        b = results["runs"][m]["shared_prefix"]
        hits = b["tokens"]["hits"]
        print(f"{m:>4} {b['requests']:>8} {b['tokens']['prompt']:>7} {b['tokens']['computed']:>8} "
              f"{b['ideal_computed']:>6} {'-' if hits is None else hits:>6} {b['wall_s']:>7.2f} "
              f"{fmt(mean(b['ttft'])):>8}")
    b = results["runs"][modes[0]]["shared_prefix"]
    print(f"(shared prefix {b['shared_prefix_tokens']} tokens, {b['shared_cacheable_tokens']} in whole blocks; ideal: "
          "every prompt minus the shared blocks, plus them once)")
    for m in modes:
        s = results["runs"][m]["summary"]
        print(f"caching {m}: chat prompt tokens {s['chat_prompt_tokens']}, computed {s['chat_computed_tokens']}; "
              f"worst TTFT / new-only from turn 2: {fmt(s['max_ratio_from_turn_2'], 1, 2)}; batch computed "
              f"{s['batch_computed_tokens']} of {s['batch_prompt_tokens']} (ideal {s['batch_ideal_computed']})")
    for note in results["notes"]:
        print("NOTE:", note)


def random_checkpoint(geometry: str) -> Path:
    """A random-weight text checkpoint of the preset's geometry with the demo model's vocabulary and tokenizer,
    written once into a temporary folder kept between runs."""
    import shutil

    from qwen35.demo import DEMO_DIR, write_random_checkpoint
    from qwen35.presets import preset

    path = Path(tempfile.gettempdir()) / f"qwen35-prefix-bench-{geometry}"
    if (path / "model.safetensors").is_file():
        return path
    demo = json.loads((DEMO_DIR / "config.json").read_text())
    geo = preset(geometry)
    config = {k: v for k, v in demo.items() if k != "vision_config"}
    config.update(model_type=geo["model_type"], architectures=geo["architectures"],
                  tie_word_embeddings=geo.get("tie_word_embeddings", False))
    config["text_config"] = dict(geo["text_config"], vocab_size=demo["text_config"]["vocab_size"],
                                 eos_token_id=demo["text_config"]["eos_token_id"])
    path.mkdir(parents=True, exist_ok=True)
    write_random_checkpoint(path, config)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "vocab_map.json"):
        if (DEMO_DIR / f).is_file():
            shutil.copy(DEMO_DIR / f, path / f)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--geometry", help="a random-weight checkpoint of this preset's text geometry (e.g. qwen3.5-0.8b) "
                   "with the demo tokenizer, instead of --model")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 2 conversations x 2 turns, 16 new tokens, 4 batch requests, a ~150-token system "
                   "prompt (flags given explicitly still apply)")
    p.add_argument("--conversations", type=positive, help="chats in the multi-turn workload (default 8; 2 quick)")
    p.add_argument("--turns", type=positive, help="turns per chat (default 6; 2 quick)")
    p.add_argument("--user-words", type=positive, default=30, help="words in each new user message (default 30)")
    p.add_argument("--max-tokens", type=positive, help="tokens generated per request (default 32; 16 quick)")
    p.add_argument("--concurrent", action="store_true",
                   help="send a turn round's requests all at once (default: one at a time, so TTFT has no queueing)")
    p.add_argument("--batch", type=positive, help="requests in the shared-system-prompt batch (default 16; 4 quick)")
    p.add_argument("--system-words", type=positive,
                   help="words in the shared system prompt (default 950, ~1000 tokens with the demo model; 120 quick)")
    p.add_argument("--chat-template-kwargs", type=json.loads, default=None, metavar="JSON",
                   help='sent with every request, e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--modes", nargs="+", choices=[ON, OFF], default=[ON, OFF], help="which servers to run")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/prefix-cache.json"))
    p.add_argument("serve_args", nargs="*", help="extra `qwen35 serve` flags (after --)")
    args = p.parse_args(argv)
    for name, (full, quick) in SIZES.items():  # --quick changes the defaults; flags given still win
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.batch < 2:
        p.error("--batch must be at least 2 (the shared prefix is measured between two requests)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks stop the servers
    if args.geometry:
        if args.model:
            p.error("--geometry and --model are exclusive")
        args.model = str(random_checkpoint(args.geometry))

    notes = []
    has_flag = "--no-enable-prefix-caching" in serve_help()
    if not has_flag:
        msg = ("this `qwen35 serve` has no --enable-prefix-caching / --no-enable-prefix-caching flag (no prefix "
               "caching in this build): the caching-on run is skipped, and the caching-off run uses no flag")
        print("WARNING:", msg, file=sys.stderr)
        notes.append(msg)
    modes = [m for m in args.modes if has_flag or m == OFF]
    if not modes:
        raise SystemExit("nothing to run: " + notes[0])
    results = {"command": [sys.executable, *sys.argv] if argv is None else ["prefix_cache_bench.py", *argv],
               "machine": machine(), "model": args.model or "embedded demo model",
               "settings": {k: getattr(args, k) for k in ("conversations", "turns", "user_words", "max_tokens",
                                                           "concurrent", "batch", "system_words",
                                                           "chat_template_kwargs", "serve_args")},
               "metrics_read": [PROMPT_METRIC, HITS_METRIC], "runs": {}, "notes": notes}
    log_dir = Path(tempfile.mkdtemp(prefix="qwen35-prefix-bench-"))
    for mode in modes:
        flags = ([] if not has_flag else ["--enable-prefix-caching" if mode == ON else "--no-enable-prefix-caching"])
        flags += (["--model", args.model] if args.model else []) + args.serve_args
        print(f"caching {mode}: qwen35 serve {' '.join(flags)}", flush=True)
        server = Server(flags, log_dir, mode)
        try:
            server.wait_ready()
            warm_up(server.url, args, args.chat_template_kwargs)
            with httpx.Client() as client:
                if HITS_METRIC not in read_metrics(client, server.url):
                    notes.append(f"caching {mode}: /metrics has no {HITS_METRIC}; cache hits counted as 0")
            print(" multi-turn chat", flush=True)
            turns = multi_turn(server.url, args, args.chat_template_kwargs)
            print(" shared system prompt batch", flush=True)
            batch = shared_prefix(server.url, args, args.chat_template_kwargs)
        finally:
            server.stop()
        for t in turns:
            if t.get("baseline_ttft"):
                t["ratio"] = mean(t["ttft"]) / mean(t["baseline_ttft"])
                if t["baseline_tokens"]["hits"]:
                    notes.append(f"caching {mode}, turn {t['turn']}: the new-tokens-only requests had "
                                 f"{t['baseline_tokens']['hits']} cache-hit tokens (they should have none)")
        results["runs"][mode] = {"serve_flags": flags, "summary": summarize(turns, batch), "multi_turn": turns,
                                 "shared_prefix": batch}
    print_tables(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if has_flag else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the servers are already stopped (finally blocks)
        print("interrupted; no results written", file=sys.stderr)
        sys.exit(130)
