"""The distributed runtime on a local Ray cluster: same results as in process, batching, failures, cancellation."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest
import ray

from consort.actors.client import complete, start_coordinator, stream
from consort.runtime.config import parse_config
from consort.runtime.errors import MemberLost
from consort.runtime.loop import EnsembleLoop
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import RequestOptions
from tests.integration.conftest import tiny_config

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPTS = [Prompt(text="The capital of France is"), Prompt(messages=[{"role": "user", "content": "Say hi"}])]


@pytest.fixture(scope="module")
def config():
    return parse_config(tiny_config(strategy="deepen", deepen={"min_anchors": 10, "max_anchors": 1024}, max_batch=16))


@pytest.fixture(scope="module")
def coordinator(ray_cluster, config):
    actor = start_coordinator(config)
    yield actor
    ray.get(actor.shutdown.remote())
    ray.kill(actor)


@pytest.fixture(scope="module")
def local_loop(config):
    return EnsembleLoop.from_config(config, device="cpu")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.mark.parametrize(
    ("strategy", "params"),
    [
        ("mean", GREEDY),
        ("deepen", GREEDY),
        ("me", SamplingParams(temperature=0.0, max_tokens=10, seed=7, ignore_eos=True)),
        ("me", SamplingParams(temperature=0.9, max_tokens=10, seed=11, ignore_eos=True)),
    ],
)
def test_actors_give_the_in_process_result(coordinator, local_loop, strategy: str, params: SamplingParams) -> None:
    options = RequestOptions(strategy=strategy)
    expected = [c.text for c in local_loop.generate(PROMPTS, params, options)]
    got = [run(complete(coordinator, p, params, options)).text for p in PROMPTS]
    assert got == expected


def test_concurrent_requests_are_batched_and_match_their_solo_text(coordinator, local_loop) -> None:
    prompts = [Prompt(text="word " * (i + 1) + "and") for i in range(16)]
    params = [SamplingParams(temperature=0.0, max_tokens=4 + i % 5, ignore_eos=True) for i in range(16)]
    options = RequestOptions(strategy="mean")
    alone = [local_loop.generate([p], sp, options)[0].text for p, sp in zip(prompts, params, strict=True)]

    async def all_at_once() -> list[str]:
        results = await asyncio.gather(*(complete(coordinator, p, sp, options) for p, sp in zip(prompts, params, strict=True)))
        return [c.text for c in results]

    assert run(all_at_once()) == alone
    stats = ray.get(coordinator.member_stats.remote())
    assert all(s["max_batch_size"] > 1 for s in stats.values()), stats


def test_step_profile_separates_member_compute_from_the_loop(coordinator) -> None:
    before = ray.get(coordinator.member_stats.remote())
    ray.get(coordinator.step_profile.remote())
    completion = run(complete(coordinator, PROMPTS[0], GREEDY, RequestOptions(strategy="deepen")))
    records = ray.get(coordinator.step_profile.remote())["recent"]
    after = ray.get(coordinator.member_stats.remote())
    assert completion.finish_reason == "length"
    assert len(records) == GREEDY.max_tokens  # one record a step, one step a token
    for record in records:
        # The loop waited for every member's reply and the inverse search after them.
        assert 0 < record["critical_member_seconds"] <= record["loop_seconds"]
        assert set(record["member_compute_seconds"]) == set(after)
        assert set(record["invert_compute_seconds"]) == {"smollm2"}  # deepen inverts in the main member only
        assert record["rounds"] == 1  # ... within its step: one round trip
    for name in after:
        reported = sum(r["member_compute_seconds"][name] + r["invert_compute_seconds"].get(name, 0.0) for r in records)
        timed_inside = (after[name]["step_seconds"] - before[name]["step_seconds"]) + (
            after[name]["invert_seconds"] - before[name]["invert_seconds"]
        )
        assert reported == pytest.approx(timed_inside, rel=1e-6)


def test_cancelled_requests_free_member_state(coordinator) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)

    async def cancel_many() -> None:
        for _ in range(100):
            async for _delta in stream(coordinator, PROMPTS[0], params, RequestOptions(strategy="mean")):
                break  # the caller goes away after the first delta

    run(cancel_many())
    deadline = time.time() + 20
    while time.time() < deadline:
        stats = ray.get(coordinator.member_stats.remote())
        if all(s["held_sequences"] == 0 and s["engine_sequences"] == 0 for s in stats.values()):
            break
        time.sleep(0.2)
    assert all(s["held_sequences"] == 0 and s["engine_sequences"] == 0 for s in stats.values()), stats


def test_auto_transport_is_plain_calls_on_cpus(coordinator) -> None:
    from consort.actors.executors import resolve_transport

    assert ray.get(coordinator.health.remote())["transport"] == "actor_calls"
    assert resolve_transport("auto", gpus=True) == "compiled_graph"


def test_both_transports_give_the_same_text(coordinator, config) -> None:
    # Started here and stopped at the end: an idle compiled graph keeps a thread spinning in every
    # member and in the coordinator, which slows every other test on a small machine.
    graph = start_coordinator(parse_config({**config.model_dump(), "transport": "compiled_graph"}))
    try:
        assert ray.get(graph.health.remote())["transport"] == "compiled_graph"
        params = SamplingParams(temperature=0.8, max_tokens=10, seed=3, ignore_eos=True)
        for strategy in ("mean", "deepen", "me"):
            options = RequestOptions(strategy=strategy)
            plain = [run(complete(coordinator, p, params, options)).text for p in PROMPTS]
            ray.get(graph.step_profile.remote())
            through_graph = [run(complete(graph, p, params, options)).text for p in PROMPTS]
            assert through_graph == plain and all(plain), strategy
            # deepen too: the main member's `finish` task reads the others' answers in the same execution.
            records = ray.get(graph.step_profile.remote())["recent"]
            assert records and all(r["rounds"] == 1 for r in records), strategy
    finally:
        ray.get(graph.shutdown.remote())
        ray.kill(graph)


def _fault_mid_generation(
    config, transport: str, step_timeout_s: float, fault: Any, heal: Any = None, strategy: str = "mean"
) -> MemberLost:
    """Start an ensemble, apply `fault` to member gemma3's actor at the third delta of a long request,
    and return the MemberLost that request ends with (its seconds after the fault in `.after_s`);
    then `heal`, and check a new request succeeds. Under `deepen` the main member (smollm2) waits on
    gemma3's answer within the round: the loss must still name gemma3."""
    raw = {**config.model_dump(), "step_timeout_s": step_timeout_s, "transport": transport}
    actor = start_coordinator(parse_config(raw))
    try:
        member = ray.get(actor.member_actor.remote("gemma3"))
        long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

        async def generate_through_the_fault() -> MemberLost:
            seen, faulted_at = 0, 0.0
            try:
                async for _delta in stream(actor, PROMPTS[0], long, RequestOptions(strategy=strategy)):
                    seen += 1
                    if seen == 3:
                        fault(member)
                        faulted_at = time.time()
            except MemberLost as error:
                error.after_s = time.time() - faulted_at  # type: ignore[attr-defined]
                return error
            finally:
                if heal is not None:
                    heal(member)
            raise AssertionError("the request finished although a member failed")

        lost = run(generate_through_the_fault())
        # While the member is restored, new requests fail at once; then the ensemble serves again.
        deadline = time.monotonic() + 120
        while True:
            asked = time.monotonic()
            try:
                after = run(complete(actor, PROMPTS[1], GREEDY, RequestOptions(strategy=strategy)))
                break
            except MemberLost:
                assert time.monotonic() - asked < 5, "a request during recovery waited instead of failing fast"
                assert time.monotonic() < deadline, "the ensemble did not recover within 120 s"
                time.sleep(0.5)
        assert after.finish_reason == "length" and after.text
        return lost
    finally:
        ray.get(actor.shutdown.remote())
        ray.kill(actor)


@pytest.mark.parametrize("strategy", ["mean", "deepen"])
@pytest.mark.parametrize("transport", ["compiled_graph", "actor_calls"])
def test_a_killed_member_fails_requests_fast_and_recovers(ray_cluster, config, transport: str, strategy: str) -> None:
    lost = _fault_mid_generation(
        config, transport, 30, lambda member: ray.kill(member, no_restart=False), strategy=strategy
    )
    assert "gemma3" in str(lost) and lost.after_s < 10  # type: ignore[attr-defined]


@pytest.mark.parametrize("strategy", ["mean", "deepen"])
@pytest.mark.parametrize("transport", ["compiled_graph", "actor_calls"])
def test_a_frozen_member_times_out_as_lost_and_recovers(ray_cluster, config, transport: str, strategy: str) -> None:
    # SIGSTOP: alive, but answers nothing; only the step timeout can tell.
    pids: list[int] = []

    def freeze(member: Any) -> None:
        pids.append(ray.get(member.pid.remote()))
        os.kill(pids[0], signal.SIGSTOP)

    def thaw(member: Any) -> None:
        if pids:
            os.kill(pids[0], signal.SIGCONT)

    lost = _fault_mid_generation(config, transport, 3, freeze, heal=thaw, strategy=strategy)
    assert "gemma3" in str(lost) and "no answer within 3 s" in str(lost)
    assert lost.after_s < 15  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["actor_calls", "compiled_graph"])
def test_real_models_through_actors_equal_the_in_process_loop(ray_cluster, transport: str) -> None:
    from consort.runtime.config import pair_config

    config = parse_config({**pair_config().model_dump(), "transport": transport, "members": [
        {"name": "smollm2", "model": "smollm2-135m-instruct", "num_cpus": 0.5},
        {"name": "gemma3", "model": "gemma3-270m", "num_cpus": 0.5},
    ]})
    local = EnsembleLoop.from_config(config, device="cpu")
    actor = start_coordinator(config)
    try:
        for strategy, params in [
            ("mean", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)),
            ("deepen", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)),
            ("me", SamplingParams(temperature=0.7, max_tokens=8, seed=5, ignore_eos=True)),
        ]:
            options = RequestOptions(strategy=strategy)
            expected = local.generate(PROMPTS[:1], params, options)[0].text
            assert run(complete(actor, PROMPTS[0], params, options)).text == expected, strategy
    finally:
        ray.get(actor.shutdown.remote())
        ray.kill(actor)
