"""How long an ensemble takes to serve again after a member process dies, and where the time goes.

    python -m bench.recovery [--member gemma3]

A coordinator actor over the packaged pair (CPU). A member is killed (Ray restarts it);
new requests meanwhile must fail at once with MemberLost; the record gives the time the
first of them took to fail, the time until a request succeeds again, and how long a
fresh member takes to load its model (the floor of any recovery).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import ray

from bench.common import machine
from consort.actors.client import complete, connect, start_coordinator
from consort.runtime.config import pair_config, parse_config
from consort.runtime.errors import MemberLost
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--member", default="gemma3")
    parser.add_argument("--out")
    args = parser.parse_args()
    config = parse_config({**pair_config("mean").model_dump(), "transport": "actor_calls"})
    connect(None, min_cpus=4)
    started = time.monotonic()
    coordinator = start_coordinator(config)
    first_start_s = time.monotonic() - started
    params = SamplingParams(temperature=0.0, max_tokens=3)
    prompt = Prompt(text="The capital of France is")
    asyncio.run(complete(coordinator, prompt, params))
    member = ray.get(coordinator.member_actor.remote(args.member))
    ray.kill(member, no_restart=False)
    killed = time.monotonic()
    first_failure_s: float | None = None
    failures = 0
    while True:
        asked = time.monotonic()
        try:
            asyncio.run(complete(coordinator, prompt, params))
            break
        except MemberLost:
            failures += 1
            if first_failure_s is None:
                first_failure_s = time.monotonic() - asked
            time.sleep(0.2)
    record = {
        "machine": machine(),
        "killed": args.member,
        "coordinator_start_with_both_members_s": first_start_s,
        "first_request_after_kill_failed_in_s": first_failure_s,
        "requests_refused_during_recovery": failures,
        "serving_again_after_s": time.monotonic() - killed,
        "recovery_logged_s": ray.get(coordinator.__ray_call__.remote(lambda self: self.last_recovery_s)),
    }
    print(json.dumps(record, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=2)
    ray.get(coordinator.shutdown.remote())


if __name__ == "__main__":
    main()
