"""Consort's metrics, recorded inside Ray processes with `ray.util.metrics`.

Ray exports them on each node's metrics export port beside its own `ray_serve_*`
metrics, prefixed `ray_` (so `consort_requests_total` is scraped as
`ray_consort_requests_total`); `/metrics` on the endpoint renders the same values.
"""

from __future__ import annotations

from ray.util import metrics

LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
STEP_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]


class EnsembleMetrics:
    """One set per process; every series carries the ensemble's name."""

    def __init__(self, ensemble: str) -> None:
        self.tags = {"ensemble": ensemble}
        keys = ("ensemble",)
        self.requests = metrics.Counter("consort_requests", "Requests admitted.", tag_keys=(*keys, "strategy"))
        self.errors = metrics.Counter("consort_errors", "Requests failed, by error type.", tag_keys=(*keys, "type"))
        self.tokens = metrics.Counter("consort_tokens_generated", "Pieces emitted by the ensemble.", tag_keys=keys)
        self.steps = metrics.Counter("consort_steps", "Sequence-steps taken.", tag_keys=keys)
        self.fused_steps = metrics.Counter("consort_fused_steps", "Sequence-steps that fused members.", tag_keys=keys)
        self.draws = metrics.Counter("consort_member_draws", "Steps a member was drawn (me).", tag_keys=(*keys, "member"))
        self.routed = metrics.Counter(
            "consort_routed_requests", "Requests the route strategy sent to a member.", tag_keys=(*keys, "member")
        )
        self.ttft = metrics.Histogram(
            "consort_time_to_first_token_seconds", "Time to first token.", LATENCY_BOUNDARIES, tag_keys=keys
        )
        self.itl = metrics.Histogram(
            "consort_inter_token_latency_seconds", "Time between tokens of a stream.", LATENCY_BOUNDARIES, tag_keys=keys
        )
        self.member_step = metrics.Histogram(
            "consort_member_step_seconds", "One member's batched step, as the coordinator waits for it.",
            STEP_BOUNDARIES, tag_keys=(*keys, "member"),
        )
        self.fusion = metrics.Histogram(
            "consort_fusion_seconds", "Fusion, inversion and sampling of one step.", STEP_BOUNDARIES, tag_keys=keys
        )
        self.queue_depth = metrics.Gauge("consort_queue_depth", "Sequences waiting for admission.", tag_keys=keys)
        self.running = metrics.Gauge("consort_running_sequences", "Sequences being stepped.", tag_keys=keys)

    def tagged(self, **extra: str) -> dict[str, str]:
        return {**self.tags, **extra}
