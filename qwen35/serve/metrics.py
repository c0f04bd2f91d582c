"""Prometheus metrics of the server, under vLLM's names (`vllm:*`, labelled with `model_name`, with vLLM's histogram
buckets) so existing vLLM dashboards work, and under qwen35's own (`qwen35_*`): request counts by outcome, token
counters, engine gauges (running and waiting requests, KV-cache usage, KV blocks, state slots, state snapshots),
preemptions, the prefix cache's counters and latency histograms (time to first token, inter-token latency,
end-to-end latency, prompt and generation lengths)."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter

# vLLM's bucket boundaries, so its dashboards' quantiles read the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
FINISHED_REASONS = ("stop", "length", "abort", "error")


def buckets_1_2_5(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's token-count buckets for a max_model_len of `limit`)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


def label_value(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "", help: str | None = None) -> list[str]:
        """`labels`: the series' labels as `k="v",` pairs, each followed by a comma."""
        out, acc = ([f"# HELP {name} {help}"] if help else []) + [f"# TYPE {name} histogram"], 0
        for le, n in zip(self.buckets, self.counts):
            acc += n
            out.append(f'{name}_bucket{{{labels}le="{float(le)}"}} {acc}')
        out += [f'{name}_bucket{{{labels}le="+Inf"}} {self.count}']
        plain = f"{{{labels.rstrip(',')}}}" if labels else ""
        out += [f"{name}_sum{plain} {self.sum}", f"{name}_count{plain} {self.count}"]
        return out


class Metrics:
    def __init__(self, model_name: str = "", max_model_len: int = 1 << 20):
        self.model_name = model_name
        self.requests: Counter[str] = Counter()
        self.finished: Counter[str] = Counter({r: 0 for r in FINISHED_REASONS})  # completions by finish reason
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.request_prompt_tokens = Histogram(buckets_1_2_5(max_model_len))
        self.request_generation_tokens = Histogram(buckets_1_2_5(max_model_len))

    def finish(self, seconds: float, num_prompt: int, num_generated: int, reasons: list[str]) -> None:
        """One request ended after `seconds`; `reasons`: its completions' finish reasons."""
        self.e2e.observe(seconds)
        self.request_prompt_tokens.observe(num_prompt)
        self.request_generation_tokens.observe(num_generated)
        self.finished.update(reasons)

    def render(self, engine) -> str:
        """The Prometheus text format; `engine` is the AsyncEngine."""
        return "\n".join(self._qwen35_lines(engine) + self._vllm_lines(engine)) + "\n"

    def _vllm_lines(self, engine) -> list[str]:
        e = engine.engine
        pc = e.prefix_cache_stats
        lab = f'model_name="{label_value(self.model_name)}"'
        kv_usage = (e.blocks.num_blocks - e.blocks.num_free) / max(1, e.blocks.num_blocks)
        lines = []

        def one(name, kind, help, value):
            lines.extend([f"# HELP vllm:{name} {help}", f"# TYPE vllm:{name} {kind}", f"vllm:{name}{{{lab}}} {value}"])

        one("num_requests_running", "gauge", "Number of requests in model execution batches.", engine.num_running)
        one("num_requests_waiting", "gauge", "Number of requests waiting to be processed.", engine.num_waiting)
        one("kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", kv_usage)
        one("gpu_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage (the older name of "
            "vllm:kv_cache_usage_perc; qwen35 reports its CPU or GPU KV cache here).", kv_usage)
        one("num_preemptions_total", "counter", "Cumulative number of preemptions from the engine.",
            e.scheduler_preemptions)
        one("prompt_tokens_total", "counter", "Number of prefill tokens processed.", self.prompt_tokens)
        one("generation_tokens_total", "counter", "Number of generation tokens processed.", self.generation_tokens)
        one("prefix_cache_queries_total", "counter", "Prefix cache queries, in terms of number of queried tokens.",
            pc.queried_tokens)
        one("prefix_cache_hits_total", "counter", "Prefix cache hits, in terms of number of cached tokens.",
            pc.hit_tokens)
        sd = e.spec_stats
        if sd.num_speculative_tokens:  # with speculative decoding on, as vLLM reports it
            one("spec_decode_num_drafts_total", "counter", "Number of spec decoding drafts.", sd.num_drafts)
            one("spec_decode_num_draft_tokens_total", "counter", "Number of draft tokens.", sd.num_draft_tokens)
            one("spec_decode_num_accepted_tokens_total", "counter", "Number of accepted tokens.",
                sd.num_accepted_tokens)
            lines += ["# HELP vllm:spec_decode_num_accepted_tokens_per_pos_total Accepted tokens per draft position.",
                      "# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_total counter"]
            lines += [f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{{lab},position="{i}"}} {n}'
                      for i, n in enumerate(sd.accepted_per_pos)]
        lines += ["# HELP vllm:request_success_total Count of successfully processed requests.",
                  "# TYPE vllm:request_success_total counter"]
        lines += [f'vllm:request_success_total{{finished_reason="{label_value(r)}",{lab}}} {n}'
                  for r, n in sorted(self.finished.items())]
        lab += ","
        for name, hist, help in (
                ("time_to_first_token_seconds", self.ttft, "Histogram of time to first token in seconds."),
                ("inter_token_latency_seconds", self.itl, "Histogram of inter-token latency in seconds."),
                ("time_per_output_token_seconds", self.itl, "Histogram of time per output token in seconds (the "
                 "older name of vllm:inter_token_latency_seconds)."),
                ("e2e_request_latency_seconds", self.e2e, "Histogram of e2e request latency in seconds."),
                ("request_prompt_tokens", self.request_prompt_tokens, "Number of prefill tokens processed."),
                ("request_generation_tokens", self.request_generation_tokens,
                 "Number of generation tokens processed.")):
            lines += hist.lines(f"vllm:{name}", lab, help)
        return lines

    def _qwen35_lines(self, engine) -> list[str]:
        e = engine.engine
        lines = ["# TYPE qwen35_requests_total counter"]
        lines += [f'qwen35_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
        lines += ["# TYPE qwen35_prompt_tokens_total counter", f"qwen35_prompt_tokens_total {self.prompt_tokens}",
                  "# TYPE qwen35_generation_tokens_total counter",
                  f"qwen35_generation_tokens_total {self.generation_tokens}"]
        pc = e.prefix_cache_stats  # queries/hits in tokens, as vLLM's prefix_cache_queries/hits; then in requests
        for name, value in (("prefix_cache_queries", pc.queried_tokens), ("prefix_cache_hits", pc.hit_tokens),
                            ("prefix_cache_requests", pc.queries), ("prefix_cache_request_hits", pc.hits)):
            lines += [f"# TYPE qwen35_{name}_total counter", f"qwen35_{name}_total {value}"]
        gauges = {"num_requests_running": engine.num_running, "num_requests_waiting": engine.num_waiting,
                  "kv_blocks_total": e.blocks.num_blocks, "kv_blocks_used": e.blocks.num_blocks - e.blocks.num_free,
                  "kv_blocks_cached": e.blocks.num_cached,
                  "state_slots_total": e.slots.num_slots, "state_slots_used": e.slots.num_slots - e.slots.num_free,
                  "state_snapshots_total": e.snapshots.num_slots, "state_snapshots_used": e.snapshots.num_used}
        for name, value in gauges.items():
            lines += [f"# TYPE qwen35_{name} gauge", f"qwen35_{name} {value}"]
        lines += self.ttft.lines("qwen35_time_to_first_token_seconds")
        lines += self.itl.lines("qwen35_inter_token_latency_seconds")
        return lines
