"""Multi-node placement on a fake 3-node cluster, in a process of its own (see placement_check.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def findings() -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.placement_check"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("FINDINGS ")), None)
    assert line is not None, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(line.removeprefix("FINDINGS "))


@pytest.mark.parametrize("transport", ["compiled_graph", "actor_calls"])
def test_strict_spread_puts_each_member_on_its_own_node_and_gpu(findings: dict, transport: str) -> None:
    nodes = {k: v for k, v in findings[f"strict_spread_{transport}"].items() if k != "text"}
    assert len({n["node_id"] for n in nodes.values()}) == 3
    assert all(n["cuda_visible_devices"] == "0" for n in nodes.values())


@pytest.mark.parametrize("transport", ["compiled_graph", "actor_calls"])
def test_members_on_three_nodes_give_the_in_process_text(findings: dict, transport: str) -> None:
    text = findings[f"strict_spread_{transport}"]["text"]
    assert text and text == findings["in_process_text"]


def test_pack_puts_fractional_members_on_one_node(findings: dict) -> None:
    nodes = findings["pack_fractional"]
    assert len({n["node_id"] for n in nodes.values()}) == 1


def test_impossible_placement_fails_clearly(findings: dict) -> None:
    assert "cannot place 4 members" in findings["impossible"]
    assert "strict_spread" in findings["impossible"]
