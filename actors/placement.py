"""Where an ensemble's members run: one placement group per ensemble, one bundle per member."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from consort.runtime.config import EnsembleConfig, MemberConfig
from consort.runtime.errors import ConsortError

STRATEGY = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}
MODEL_SLOT = "model_slot"  # custom resource on GPU worker pods (KubeRay), one per GPU


class PlacementError(ConsortError):
    """The cluster cannot host the ensemble as configured."""

    http_status = 503
    error_type = "service_unavailable"


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def use_gpus(config: EnsembleConfig) -> bool:
    if config.device == "cpu":
        return False
    if config.device == "cuda":
        return True
    return cluster_has_gpus()


def member_bundle(member: MemberConfig, gpus: bool) -> dict[str, float]:
    if gpus:
        bundle = {"GPU": member.num_gpus, "CPU": member.num_cpus}
        if ray.cluster_resources().get(MODEL_SLOT, 0) > 0:
            bundle[MODEL_SLOT] = member.num_gpus
        return bundle
    return {"CPU": member.num_cpus}


def member_bundles(config: EnsembleConfig) -> list[dict[str, float]]:
    gpus = use_gpus(config)
    return [member_bundle(m, gpus) for m in config.members]


@dataclass
class Placement:
    """A placement group and the bundle index of each member in it."""

    group: PlacementGroup
    member_bundle: dict[str, int]
    gpus: bool
    owned: bool  # created here (removed with the ensemble) or the Serve replica's own

    def strategy_for(self, member: str) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=self.member_bundle[member]
        )

    def remove(self) -> None:
        if self.owned:
            remove_placement_group(self.group)


def reserve(config: EnsembleConfig, timeout_s: float = 60.0) -> Placement:
    """Create the ensemble's placement group and wait for it, failing clearly if it cannot be placed."""
    bundles = member_bundles(config)
    group = placement_group(bundles, strategy=STRATEGY[config.placement], name="")
    ready = group.ready()
    done, _ = ray.wait([ready], timeout=timeout_s)
    if not done:
        remove_placement_group(group)
        raise PlacementError(
            f"cannot place {len(bundles)} members {bundles} with placement={config.placement!r} within "
            f"{timeout_s:.0f} s; the cluster has {_describe_cluster()}. Add nodes/GPUs, use placement 'pack' "
            "or 'spread', or give members fractional num_gpus"
        )
    return Placement(group, {m.name: i for i, m in enumerate(config.members)}, use_gpus(config), owned=True)


def from_current_group(config: EnsembleConfig) -> Placement:
    """Inside a Serve replica: bundle 0 is the replica's own, members take bundles 1..N."""
    group = ray.util.get_current_placement_group()
    if group is None:
        raise PlacementError("the Serve replica has no placement group; deploy it through deploy.app.build_app")
    return Placement(group, {m.name: i + 1 for i, m in enumerate(config.members)}, use_gpus(config), owned=False)


def _describe_cluster() -> str:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    parts: list[str] = []
    for node in nodes:
        resources: dict[str, Any] = node.get("Resources", {})
        parts.append(
            f"{node.get('NodeManagerAddress')}: "
            + ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU", MODEL_SLOT))
        )
    return f"{len(nodes)} node(s) [" + "; ".join(parts) + "]"
