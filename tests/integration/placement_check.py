"""Multi-node placement on a fake 3-node cluster (each node: 1 fake GPU); run as its own process.

A separate process because `ray.cluster_utils.Cluster` needs a driver of its own,
and the integration session already holds one. Prints one JSON line of findings.
"""

from __future__ import annotations

import asyncio
import json
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray
from ray.cluster_utils import Cluster
from ray.exceptions import RayActorError

from consort.runtime.config import parse_config

TINY = ["tiny:smollm2-135m-instruct", "tiny:gemma3-270m", "tiny:smollm2-135m-instruct@1"]


def config(placement: str, members: int, num_gpus: float = 1.0) -> dict:
    return {
        "members": [
            {"name": f"m{i}", "model": TINY[i % len(TINY)], "num_cpus": 0.5, "num_gpus": num_gpus}
            for i in range(members)
        ],
        "strategy": "mean",
        "placement": placement,
    }


PROMPT = "The capital of France is"
TOKENS = 12


def nodes_of(raw: dict, placement_timeout_s: float = 120.0, generate: bool = False) -> dict:
    """Where the members landed; with `generate`, also the greedy text through the coordinator."""
    from consort.actors.client import complete
    from consort.actors.coordinator import CoordinatorActor
    from consort.runtime.prompts import Prompt
    from consort.runtime.sampling import SamplingParams

    actor = CoordinatorActor.remote(parse_config(raw), placement_timeout_s=placement_timeout_s)
    try:
        found = ray.get(actor.member_nodes.remote(), timeout=300)
        if generate:
            params = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)
            found["text"] = asyncio.run(complete(actor, Prompt(text=PROMPT), params)).text
        return found
    finally:
        try:
            ray.get(actor.shutdown.remote(), timeout=60)
        except RayActorError:
            pass
        ray.kill(actor)


def in_process_text(raw: dict) -> str:
    from consort.runtime.loop import EnsembleLoop
    from consort.runtime.prompts import Prompt
    from consort.runtime.sampling import SamplingParams

    loop = EnsembleLoop.from_config(parse_config(raw), device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)
    return loop.generate([Prompt(text=PROMPT)], params)[0].text


def main() -> None:
    from consort.runtime.testing.tiny import save_tiny

    for reference in TINY:
        save_tiny(reference)  # the member actors load these folders (kept when already saved)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    findings: dict = {}
    try:
        # Members on three nodes: the compiled graph's channels and plain calls both cross nodes.
        for transport in ("compiled_graph", "actor_calls"):
            raw = {**config("strict_spread", 3), "transport": transport}
            findings[f"strict_spread_{transport}"] = nodes_of(raw, generate=True)
        findings["in_process_text"] = in_process_text(config("strict_spread", 3))
        findings["pack_fractional"] = nodes_of(config("pack", 2, num_gpus=0.5))
        try:
            nodes_of(config("strict_spread", 4), placement_timeout_s=5)
            findings["impossible"] = "placed"
        except RayActorError as error:
            findings["impossible"] = str(error)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("FINDINGS " + json.dumps(findings))


if __name__ == "__main__":
    main()
