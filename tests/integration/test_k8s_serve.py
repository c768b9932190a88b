"""The RayService manifests' serveConfigV2 against Ray Serve itself (its schema, its app builder).

The rest of the manifest checks are in tests/unit/test_k8s.py; these two need Ray's Python
API (no cluster), so they run with the integration tests.
"""

from __future__ import annotations

import importlib.util
import typing
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from tests.unit.test_k8s import (
    SERVICE_SOURCES,
    cluster_offer,
    cluster_spec,
    fits,
    parse_ensemble,
    pod_offer,
    scaled,
    serve_config,
    services_of,
)


def _models_in(annotation: Any) -> Iterator[type]:
    """Pydantic model classes inside a field annotation (Optional[X], List[X], X)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    if typing.get_origin(annotation) is dict:
        return  # free-form maps (args, runtime_env) are checked elsewhere or not at all
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


def unknown_keys(model: type, data: Any, where: str) -> list[str]:
    """Keys that a pydantic model does not define, recursively.

    Ray Serve's deploy schema accepts unknown keys on purpose (older Serve versions ignore
    newer options), so a misspelt option would be dropped without a word.
    """
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    known = set(fields) | {f.alias for f in fields.values() if f.alias}
    problems = [f"{where}.{key}" for key in data if key not in known]
    for name, field in fields.items():
        value = data.get(field.alias, data.get(name)) if field.alias else data.get(name)
        for sub in _models_in(field.annotation):
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                problems += unknown_keys(
                    sub, item, f"{where}.{name}" + (f"[{i}]" if isinstance(value, list) else "")
                )
    return problems


@pytest.mark.parametrize("source", SERVICE_SOURCES)
def test_serve_config_parses_with_serve_schema(source: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    from consort.runtime.config import parse_config

    services = services_of(source)
    assert services
    for service in services:
        raw = serve_config(service)
        schema = ServeDeploySchema.model_validate(raw)
        assert not unknown_keys(ServeDeploySchema, raw, "serveConfigV2")
        (app,) = schema.applications
        assert app.import_path == "consort.deploy.app:build_app"
        config = parse_config(app.args["config"])  # EnsembleConfig forbids unknown keys itself
        # Serve's route prefix is the one that counts; keep the ensemble's own in step.
        assert app.route_prefix == config.serving.route_prefix
        assert schema.http_options.port == 8000


@pytest.mark.parametrize("source", SERVICE_SOURCES)
def test_serve_import_path_builds_application(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Needs deploy/app.py: does what Serve's controller does with serveConfigV2.

    Import the builder, call it with the args, build the application graph, then check that
    the placement group one replica reserves fits the pods this manifest makes: each bundle
    in one pod, min_replicas ensembles at rest and max_replicas at full scale.

    The builder asks the running cluster what it has (GPUs, model slots). Serve builds on the
    target cluster, so stand in for it with the one this manifest describes at full scale,
    rather than starting a local Ray that would see this machine instead.
    """
    from ray._common.utils import import_attr
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app
    from ray.serve.schema import ServeDeploySchema

    if importlib.util.find_spec("consort.deploy.app") is None:
        pytest.fail("deploy/app.py does not exist: serveConfigV2's consort.deploy.app:build_app cannot build")
    for service in services_of(source):
        at_peak = cluster_offer(service, "maxReplicas")
        at_rest = cluster_offer(service, "minReplicas")
        pods = [pod_offer(g) for g in cluster_spec(service)["workerGroupSpecs"]]
        monkeypatch.setattr(ray, "is_initialized", lambda: True)
        monkeypatch.setattr(ray, "cluster_resources", lambda at_peak=at_peak: dict(at_peak))

        (app,) = ServeDeploySchema.model_validate(serve_config(service)).applications
        built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
        assert isinstance(built, Application), type(built)
        graph = build_app(built, name=app.name, route_prefix=app.route_prefix)
        assert graph.deployments, "the application has no deployments"

        scaling = parse_ensemble(service).serving.autoscaling
        for deployment in graph.deployments:
            # Private, but it is what Serve hands to the placement group (Ray is pinned).
            bundles = deployment._replica_config.placement_group_bundles or [
                {"CPU": 1.0, **(deployment.ray_actor_options or {}).get("resources", {})}
            ]
            strategy = deployment._replica_config.placement_group_strategy
            for bundle in bundles:
                assert any(fits(bundle, pod) for pod in pods), f"{source}: bundle {bundle} fits no pod {pods}"
            replica = {r: sum(b.get(r, 0.0) for b in bundles) for r in {r for b in bundles for r in b}}
            if strategy == "STRICT_PACK":
                assert any(fits(replica, pod) for pod in pods), f"{source}: {replica} fits no single pod"
            assert fits(scaled(replica, scaling.min_replicas), at_rest), (
                f"{source}: {replica} at rest {at_rest}"
            )
            assert fits(scaled(replica, scaling.max_replicas), at_peak), (
                f"{source}: {replica} at peak {at_peak}"
            )
            if parse_ensemble(service).device == "cuda":
                gpu_bundles = [b for b in bundles if b.get("GPU")]
                assert len(gpu_bundles) == len(parse_ensemble(service).members), bundles
                assert all(b.get("model_slot") == b["GPU"] for b in gpu_bundles), bundles
