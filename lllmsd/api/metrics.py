"""Prometheus metrics at ``GET /metrics``, from one CollectorRegistry per app (no global registry, so
every app a test builds counts only its own requests).

Three sources, so the core never imports prometheus_client:
- ``metrics_middleware`` counts every request by route, model and status, and times it (a stream is
  timed to its last byte);
- ``observe_generation`` wraps a text generation's events: time to first token, prompt, generated and
  cached prompt tokens (cache hits), from the engine's Usage event; ``observe_speech`` wraps a speech
  job's events: the seconds of audio produced;
- ``RuntimeCollector`` reads ``runtime.status()`` at scrape time: instances by state, queue depth,
  concurrency in use, download progress, and the load gauges an inference gateway reads (below).

Load gauges, per model, with the meaning of vLLM's that the Gateway API Inference Extension's endpoint
picker and llm-d read (docs/scale-out.md shows the flags that point them at these names):
- ``lllmsd_num_requests_waiting`` (vllm:num_requests_waiting): requests queued for the model;
- ``lllmsd_num_requests_running`` (vllm:num_requests_running): requests an instance is running now (for an
  embedding model, batches);
- ``lllmsd_kv_cache_usage_perc`` (vllm:kv_cache_usage_perc, 0-1): context tokens the model's instances
  hold over the context they could hold: the context window times ``max_instances`` (or the instances
  alive, if more: a retiring configuration's);
- counters ``lllmsd_prompt_tokens_total``, ``lllmsd_cached_prompt_tokens_total`` (served from an instance's
  cache, vllm:prefix_cache_hits_total) and ``lllmsd_evaluated_prompt_tokens_total`` (computed afresh).

``/metrics`` is protected like the API when ``api_keys`` are set (Prometheus sends a bearer token with
``authorization: {credentials_file: ...}`` in its scrape config); see docs/operations.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from lllmsd import __version__
from lllmsd.api.keys import MODEL
from lllmsd.api.middleware import Handler
from lllmsd.core.instance import InstanceState
from lllmsd.core.jobs import GenerationEvent, ReasoningDelta, SpeechAudio, TextDelta, ToolCallDelta, Usage
from lllmsd.core.runtime import Runtime

# Requests to local models take from milliseconds (embeddings, /health) to minutes (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# label for a model name nobody configured: client input must not create new time series
UNKNOWN_MODEL = "(unknown)"
UNMATCHED_ROUTE = "(unmatched)"

STARTED = web.RequestKey("metrics_started", float)


class Metrics:
    """The app's registry and the metrics recorded as requests happen."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lllmsd_requests",
            "HTTP requests answered, by route, model and status.",
            ["route", "model", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "lllmsd_request_duration_seconds",
            "Time from a request's arrival to its response's last byte.",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "lllmsd_time_to_first_token_seconds",
            "Time from a generation request's arrival (queueing and loading included) to its first token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "lllmsd_prompt_tokens", "Prompt tokens evaluated or reused.", ["model"], registry=r
        )
        self.generated_tokens = Counter(
            "lllmsd_generated_tokens", "Completion tokens generated.", ["model"], registry=r
        )
        self.cached_tokens = Counter(
            "lllmsd_cached_prompt_tokens",
            "Prompt tokens an instance already held (prompt cache hits).",
            ["model"],
            registry=r,
        )
        self.evaluated_tokens = Counter(
            "lllmsd_evaluated_prompt_tokens",
            "Prompt tokens evaluated afresh (not served from an instance's cache).",
            ["model"],
            registry=r,
        )
        self.cache_hits = Counter(
            "lllmsd_prompt_cache_hits",
            "Generations that reused at least one cached prompt token.",
            ["model"],
            registry=r,
        )
        self.audio_seconds = Counter(
            "lllmsd_speech_audio_seconds", "Seconds of speech synthesized.", ["model"], registry=r
        )
        r.register(RuntimeCollector(runtime))
        ProcessCollector(registry=r)  # resident memory and CPU time: what loaded models cost

    def model_label(self, model: str | None) -> str:
        if not model:
            return ""
        known = model in self.runtime.pools or any(p.model_id == model for p in self.runtime.retiring)
        return model if known else UNKNOWN_MODEL

    def observe_request(self, request: web.Request, status: int, seconds: float) -> None:
        route = _route_label(request)
        model = self.model_label(request.get(MODEL))
        self.requests.labels(route, model, str(status)).inc()
        self.latency.labels(route, model).observe(seconds)

    def observe_usage(self, model: str, usage: Usage) -> None:
        label = self.model_label(model)
        self.prompt_tokens.labels(label).inc(usage.prompt_tokens)
        self.generated_tokens.labels(label).inc(usage.completion_tokens)
        self.cached_tokens.labels(label).inc(usage.cached_tokens)
        self.evaluated_tokens.labels(label).inc(max(0, usage.prompt_tokens - usage.cached_tokens))
        if usage.cached_tokens:
            self.cache_hits.labels(label).inc()


METRICS = web.AppKey("metrics", Metrics)


def _route_label(request: web.Request) -> str:
    # the route's pattern (/v1/models/{model}), never the raw path: paths are client input
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED_ROUTE


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    request[STARTED] = started
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    finally:
        request.app[METRICS].observe_request(request, status, time.perf_counter() - started)


async def observe_generation(
    request: web.Request, model: str, events: AsyncIterator[GenerationEvent]
) -> AsyncIterator[GenerationEvent]:
    """``events`` unchanged, recording time to first token and the token counts on the way."""
    metrics = request.app[METRICS]
    started = request.get(STARTED, time.perf_counter())
    first_token_seen = False
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if not first_token_seen and _is_token(event):
                first_token_seen = True
                metrics.ttft.labels(metrics.model_label(model)).observe(time.perf_counter() - started)
            elif isinstance(event, Usage):
                metrics.observe_usage(model, event)
            yield event


async def observe_speech(
    request: web.Request, model: str, events: AsyncIterator[SpeechAudio]
) -> AsyncIterator[SpeechAudio]:
    """``events`` unchanged, counting the seconds of audio as they are produced (a stream cut short
    counts what was synthesized)."""
    metrics = request.app[METRICS]
    seconds = metrics.audio_seconds.labels(metrics.model_label(model))
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if event.seconds:
                seconds.inc(event.seconds)
            yield event


def _is_token(event: GenerationEvent) -> bool:
    # reasoning is generated text too: a thinking model's first token is its first reasoning
    return isinstance(event, ToolCallDelta) or (isinstance(event, TextDelta | ReasoningDelta) and bool(event.text))


async def metrics_handler(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup_metrics(app: web.Application, runtime: Runtime) -> None:
    """Create the app's metrics and route; the middleware is listed with the others in create_app."""
    app[METRICS] = Metrics(runtime)
    app.router.add_get("/metrics", metrics_handler)


class RuntimeCollector:
    """Gauges read from the runtime when Prometheus scrapes, so they are never stale."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        status = self.runtime.status()
        instances = GaugeMetricFamily(
            "lllmsd_instances", "Model instances by state (retiring ones included).", labels=["model", "state"]
        )
        queue = GaugeMetricFamily("lllmsd_queue_depth", "Requests waiting for an instance.", labels=["model"])
        counts: dict[str, dict[str, int]] = {}
        waiting: dict[str, int] = {}
        pools = [(model_id, model) for model_id, model in status["models"].items()]
        pools += [(pool["model"], pool) for pool in status.get("retiring", [])]
        for model_id, pool in pools:
            by_state = counts.setdefault(model_id, dict.fromkeys((s.value for s in InstanceState), 0))
            for instance in pool["instances"]:
                by_state[instance["state"]] = by_state.get(instance["state"], 0) + 1
            waiting[model_id] = waiting.get(model_id, 0) + pool["waiting"]
        for model_id, by_state in counts.items():
            for state, count in by_state.items():
                instances.add_metric([model_id, state], count)
            queue.add_metric([model_id], waiting[model_id])
        yield instances
        yield queue
        yield from _load_metrics(pools)
        yield GaugeMetricFamily(
            "lllmsd_concurrency_in_use",
            "Engine tasks running now, across all models.",
            value=status["concurrency"]["in_use"],
        )
        yield GaugeMetricFamily(
            "lllmsd_concurrency_limit", "Engine tasks that may run at once.", value=status["concurrency"]["limit"]
        )
        yield from _download_metrics(status.get("downloads", []))
        yield from _memory_metrics(status["memory"], pools)
        info = GaugeMetricFamily("lllmsd_build_info", "The daemon's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info


def _load_metrics(pools: list[tuple[str, dict[str, Any]]]) -> Iterator[Metric]:
    """The gauges an inference gateway picks endpoints by (see the module's docstring), per model; a model's
    retiring configuration counts with its current one."""
    waiting = GaugeMetricFamily(
        "lllmsd_num_requests_waiting", "Requests queued for the model (vllm:num_requests_waiting).", labels=["model"]
    )
    running = GaugeMetricFamily(
        "lllmsd_num_requests_running",
        "Requests the model's instances run now; batches for an embedding model (vllm:num_requests_running).",
        labels=["model"],
    )
    usage = GaugeMetricFamily(
        "lllmsd_kv_cache_usage_perc",
        "Context tokens the model's instances hold over the context they could hold, 0-1 (vllm:kv_cache_usage_perc).",
        labels=["model"],
    )
    totals: dict[str, dict[str, int]] = {}
    for model_id, pool in pools:
        total = totals.setdefault(model_id, {"waiting": 0, "running": 0, "held": 0, "window": 0, "slots": 0})
        live = [i for i in pool["instances"] if i["state"] in _LIVE_STATES]
        total["waiting"] += pool["waiting"]
        total["running"] += sum(i["active_requests"] for i in live)  # an instance with slots runs several
        total["held"] += sum(i["context_tokens"] for i in live)
        total["window"] = max([total["window"], *(i["context_size"] or 0 for i in live)])
        per_instance = max((i["slots"] for i in live), default=1)  # sequences (llama-cpp slots) per instance
        total["slots"] += max(pool["max_instances"], len(live)) * per_instance
    for model_id, total in totals.items():
        waiting.add_metric([model_id], total["waiting"])
        running.add_metric([model_id], total["running"])
        capacity = total["window"] * total["slots"]
        usage.add_metric([model_id], min(1.0, total["held"] / capacity) if capacity else 0.0)
    yield waiting
    yield running
    yield usage


_LIVE_STATES = frozenset(s.value for s in (InstanceState.LOADING, InstanceState.IDLE, InstanceState.BUSY))


def _download_metrics(downloads: list[dict[str, Any]]) -> Iterator[Metric]:
    done = GaugeMetricFamily(
        "lllmsd_download_bytes", "Bytes fetched so far by the model store, per model.", labels=["model"]
    )
    total = GaugeMetricFamily(
        "lllmsd_download_size_bytes",
        "Bytes the model store's downloads will fetch in all, per model.",
        labels=["model"],
    )
    fetched: dict[str, float] = {}
    sizes: dict[str, float] = {}
    for entry in downloads:  # one dict per file (ModelStore.status())
        model = str(entry.get("model") or "")
        fetched[model] = fetched.get(model, 0) + _number(entry.get("bytes_done"))
        sizes[model] = sizes.get(model, 0) + _number(entry.get("bytes_total"))  # None: size not known yet
    for model, value in fetched.items():
        done.add_metric([model], value)
        total.add_metric([model], sizes[model])
    yield done
    yield total


def _memory_metrics(memory: dict[str, Any], pools: list[tuple[str, dict[str, Any]]]) -> Iterator[Metric]:
    """The memory budget (core/budget.py) and what each instance holds in it, in RAM and on a device."""
    yield GaugeMetricFamily(
        "lllmsd_memory_budget_bytes",
        "Memory all instances may take together (memory_budget).",
        value=memory["budget_bytes"],
    )
    yield GaugeMetricFamily(
        "lllmsd_memory_reserved_bytes",
        "The estimates of every instance loaded, loading or being disposed.",
        value=memory["used_bytes"],
    )
    yield GaugeMetricFamily(
        "lllmsd_memory_loads_waiting", "Instance loads waiting for room in the budget.", value=memory["loads_waiting"]
    )
    yield CounterMetricFamily(
        "lllmsd_memory_evictions", "Idle instances disposed to make room for another load.", value=memory["evictions"]
    )
    estimate = GaugeMetricFamily(
        "lllmsd_instance_memory_estimate_bytes",
        "The memory the budget holds for an instance (its estimate, or what it was measured to take).",
        labels=["model", "instance"],
    )
    resident = GaugeMetricFamily(
        "lllmsd_instance_resident_bytes",
        "Resident memory of an instance's worker process.",
        labels=["model", "instance"],
    )
    device = GaugeMetricFamily(
        "lllmsd_instance_device_memory_bytes",
        "Memory an instance holds on a GPU, as its library reports it.",
        labels=["model", "instance"],
    )
    for model_id, pool in pools:
        for instance in pool["instances"]:
            labels = [model_id, instance["id"]]
            if instance.get("memory_estimate_bytes") is not None:
                estimate.add_metric(labels, instance["memory_estimate_bytes"])
            if (instance.get("worker") or {}).get("rss_bytes") is not None:
                resident.add_metric(labels, instance["worker"]["rss_bytes"])
            if (instance.get("placement") or {}).get("device_memory") is not None:
                device.add_metric(labels, instance["placement"]["device_memory"])
    yield estimate
    yield resident
    yield device


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
