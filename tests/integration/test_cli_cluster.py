"""`consort generate` without --local: it starts a Ray instance of its own and runs through the coordinator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generate_through_a_local_ray_instance_equals_local(tmp_path) -> None:
    args = ["generate", "--members", "tiny:smollm2-135m-instruct,tiny:gemma3-270m", "--strategy", "mean",
            "--prompt", "Once upon a time", "--max-tokens", "6", "--json"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    through_ray = subprocess.run([sys.executable, "-m", "consort", *args], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=300)
    assert through_ray.returncode == 0, through_ray.stderr[-2000:]
    local = subprocess.run([sys.executable, "-m", "consort", *args, "--local"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-2000:]
    assert json.loads(through_ray.stdout)["text"] == json.loads(local.stdout)["text"]
