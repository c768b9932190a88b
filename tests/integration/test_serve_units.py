"""The endpoint's parts that need Ray's API but no HTTP: the metrics mirror (it records to
ray.util.metrics) and the Serve options that make one replica one ensemble. The pure parts
are unit tests: tests/unit/test_openai_service.py."""

from __future__ import annotations

from consort.deploy.metrics import MetricsMirror
from consort.runtime.config import parse_config
from tests.integration.conftest import tiny_config


def test_the_mirror_records_to_ray_and_renders_prometheus_text() -> None:
    from consort.actors.metrics import EnsembleMetrics

    metrics = EnsembleMetrics("unit")
    mirror = MetricsMirror(replica="r1")
    assert mirror.mirror(metrics) >= 10
    metrics.requests.inc(tags=metrics.tagged(strategy="mean"))
    metrics.ttft.observe(0.02, tags=metrics.tags)
    metrics.queue_depth.set(3, tags=metrics.tags)
    text = mirror.render().decode()
    assert 'consort_requests_total{ensemble="unit",replica="r1",strategy="mean"} 1.0' in text
    assert 'consort_time_to_first_token_seconds_bucket{ensemble="unit",le="0.025",replica="r1"} 1.0' in text
    assert 'consort_queue_depth{ensemble="unit",replica="r1"} 3.0' in text
    assert "_created" not in text


def test_one_replica_is_one_ensemble(ray_cluster: dict[str, object]) -> None:
    from consort.deploy.app import OVERFLOW_HEADROOM, deployment_options

    scaling = {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 2,
        "upscale_delay_s": 1,
        "downscale_delay_s": 5,
    }
    config = parse_config(
        tiny_config(placement="spread", serving={"autoscaling": scaling, "max_ongoing_requests": 9})
    )
    options = deployment_options(config, {"look_back_period_s": 2})
    assert options["placement_group_bundles"] == [{"CPU": 1.0}, {"CPU": 0.5}, {"CPU": 0.5}]
    assert options["placement_group_strategy"] == "SPREAD"
    # Raised to what the coordinator runs and queues, plus headroom, so overload meets its 429 (issue 17).
    assert options["max_ongoing_requests"] == config.max_batch + config.max_queue + OVERFLOW_HEADROOM
    assert options["autoscaling_config"] == {**scaling, "initial_replicas": 1, "look_back_period_s": 2}
