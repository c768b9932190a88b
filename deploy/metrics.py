"""GET /metrics: the coordinator's consort_* metrics as Prometheus text, rendered in the replica.

Choice (of the two the design allows): the replica renders the values itself
with prometheus_client rather than proxying Ray's metrics export. Every
`ray.util.metrics` object on the coordinator's `EnsembleMetrics` is wrapped in a
`Mirrored` metric that records each value twice: to Ray (exported cluster-wide
on every node's metrics export port as `ray_consort_*`, beside `ray_serve_*`)
and to a local prometheus_client registry that /metrics renders. Why: the local
copy is exact and immediate (Ray's export is delayed by its reporting period and
lives on another port and process), needs no network call to the node's agent,
and works when the dashboard/agent is disabled. The price: /metrics shows the
replica that answered it (series carry a `replica` label); for the whole
deployment, scrape Ray's export port (k8s/ PodMonitor) and sum `ray_consort_*`.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge
from prometheus_client import Histogram as PromHistogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from ray.util import metrics as ray_metrics

CONTENT_TYPE = CONTENT_TYPE_LATEST
REPLICA_LABEL = "replica"


class Mirrored:
    """A Ray metric plus its prometheus_client twin; exposes the Ray API (inc/observe/set with tags)."""

    def __init__(self, metric: ray_metrics.Metric, registry: CollectorRegistry, replica: str) -> None:
        self.ray_metric = metric
        info = metric.info
        self.tag_keys: tuple[str, ...] = tuple(info["tag_keys"])
        self.default_tags: dict[str, str] = dict(info["default_tags"])
        self.replica = replica
        labels = [*self.tag_keys, REPLICA_LABEL]
        name, help_text = info["name"], info["description"] or info["name"]
        self.prom: Any
        if isinstance(metric, ray_metrics.Counter):
            self.prom = PromCounter(name, help_text, labels, registry=registry)
        elif isinstance(metric, ray_metrics.Histogram):
            self.prom = PromHistogram(name, help_text, labels, registry=registry, buckets=info["boundaries"])
        elif isinstance(metric, ray_metrics.Gauge):
            self.prom = PromGauge(name, help_text, labels, registry=registry)
        else:
            raise TypeError(f"cannot mirror metric {name!r} of type {type(metric).__name__}")

    def _child(self, tags: dict[str, str] | None) -> Any:
        merged = {**self.default_tags, **(tags or {})}
        return self.prom.labels(*(merged.get(k, "") for k in self.tag_keys), self.replica)

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.ray_metric.inc(value, tags=tags)  # type: ignore[attr-defined]
        self._child(tags).inc(value)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.ray_metric.observe(value, tags=tags)  # type: ignore[attr-defined]
        self._child(tags).observe(value)

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.ray_metric.set(value, tags=tags)  # type: ignore[attr-defined]
        self._child(tags).set(value)

    def set_default_tags(self, default_tags: dict[str, str]) -> None:
        self.ray_metric.set_default_tags(default_tags)
        self.default_tags = dict(default_tags)


class MetricsMirror:
    """The replica's registry, fed by mirroring a metrics holder's Ray metrics in place."""

    def __init__(self, replica: str) -> None:
        # `*_created` series double the output and mean nothing to Ray's side of the same metrics.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.replica = replica

    def mirror(self, holder: object) -> int:
        """Replace every Ray metric attribute of `holder` (an EnsembleMetrics) by a Mirrored one."""
        count = 0
        for attr, value in list(vars(holder).items()):
            if isinstance(value, ray_metrics.Metric):
                setattr(holder, attr, Mirrored(value, self.registry, self.replica))
                count += 1
        return count

    def render(self) -> bytes:
        return generate_latest(self.registry)
