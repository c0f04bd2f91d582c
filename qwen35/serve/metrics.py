"""Prometheus metrics of the server: request counts by outcome, token counters, engine gauges (running and waiting
requests, KV blocks, state slots, state snapshots), the prefix cache's counters and latency histograms (time to first
token, inter-token latency)."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [f"# TYPE {name} histogram"], 0
        for le, n in zip(self.buckets, self.counts):
            acc += n
            out.append(f'{name}_bucket{{le="{le}"}} {acc}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self):
        self.requests: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram((0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.itl = Histogram((0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

    def render(self, engine) -> str:
        """The Prometheus text format; `engine` is the AsyncEngine."""
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
        return "\n".join(lines) + "\n"
