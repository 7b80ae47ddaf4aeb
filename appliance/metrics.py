"""Prometheus metrics, one registry per app (no process-global collectors).

Counters and histograms are fed by serving code; gauges (queue depth, running sequences,
prefix-cache hit ratio, KV use, model memory) are read from the engine at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from appliance.engine.protocol import Engine

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queued = GaugeMetricFamily(
            "appliance_queue_depth", "Requests waiting for a slot", labels=["model"]
        )
        running = GaugeMetricFamily(
            "appliance_running_sequences", "Sequences being generated", labels=["model"]
        )
        hit = GaugeMetricFamily(
            "appliance_prefix_cache_hit_ratio",
            "Prompt tokens reused from the prefix cache / all prompt tokens",
            labels=["model"],
        )
        kv = GaugeMetricFamily(
            "appliance_kv_cache_usage_ratio", "Context cells in use / capacity", labels=["model"]
        )
        memory = GaugeMetricFamily(
            "appliance_model_memory_bytes", "Size of the loaded model weights", labels=["model"]
        )
        for model_id, stats in _loaded_stats(self.engine):
            queued.add_metric([model_id], stats["queued"])
            running.add_metric([model_id], stats["running"])
            hit.add_metric([model_id], stats["hit_ratio"])
            kv.add_metric([model_id], stats["kv_ratio"])
            memory.add_metric([model_id], stats["memory"])
        loaded = GaugeMetricFamily("appliance_models_loaded", "Models resident in memory")
        loaded.add_metric([], len(self.engine.status().loaded))
        yield from (queued, running, hit, kv, memory, loaded)


def _loaded_stats(engine: Engine) -> Iterator[tuple[str, dict[str, float]]]:
    for model in getattr(engine, "_loaded", {}).values():
        scheduler, native = model.scheduler, model.native
        stats = scheduler.stats
        total = stats.prompt_tokens_cached + stats.prompt_tokens_processed
        used = sum(len(slot.tokens) for slot in scheduler.slots)
        capacity = native.n_ctx_seq * len(scheduler.slots)
        yield (
            model.id,
            {
                "queued": stats.queued,
                "running": stats.running,
                "hit_ratio": stats.prompt_tokens_cached / total if total else 0.0,
                "kv_ratio": used / capacity if capacity else 0.0,
                "memory": native.size_bytes,
            },
        )


class Metrics:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "appliance_requests",
            "API requests by endpoint, model and HTTP status",
            ["endpoint", "model", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "appliance_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "appliance_completion_tokens", "Completion tokens generated", ["model"], registry=r
        )
        self.key_tokens = Counter(
            "appliance_key_tokens",
            "Tokens per API key (display prefix only)",
            ["key", "kind"],
            registry=r,
        )
        self.ttft = Histogram(
            "appliance_time_to_first_token_seconds",
            "Time from request to first token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "appliance_inter_token_latency_seconds",
            "Time between streamed tokens",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(engine))

    def request(self, endpoint: str, model: str, status: int) -> None:
        if status >= 400 and model not in self.engine.status().loaded:
            # A failed request's model is whatever the client sent: labelling with it would
            # let anyone grow the scrape without bound (one series per made-up name).
            model = ""
        self.requests.labels(endpoint, model or "-", str(status)).inc()

    def usage(self, model: str, key_prefix: str | None, prompt: int, completion: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt)
        self.completion_tokens.labels(model).inc(completion)
        if key_prefix:
            self.key_tokens.labels(key_prefix, "prompt").inc(prompt)
            self.key_tokens.labels(key_prefix, "completion").inc(completion)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class TokenTimer:
    """Feeds TTFT and inter-token latency for one generation."""

    def __init__(self, metrics: Metrics | None, model: str, started: float) -> None:
        self.metrics = metrics
        self.model = model
        self.last = started
        self.first = True
        # The labelled child, looked up once (labels() takes a lock and builds a key).
        self._itl: Histogram | None = None

    def tick(self, now: float, tokens: int) -> None:
        if self.metrics is None or tokens <= 0:
            return
        gap = now - self.last
        if self.first:
            self.metrics.ttft.labels(self.model).observe(gap)
            self.first = False
        else:
            # Several tokens may arrive in one delta (held-back text): spread the gap.
            per = gap / tokens
            hist = self._itl
            if hist is None:
                hist = self._itl = self.metrics.itl.labels(self.model)
            for _ in range(tokens):
                hist.observe(per)
        self.last = now
