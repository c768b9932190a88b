"""`consort eval` end to end with tiny models: one-line errors, a killed run that resumes, `ray job submit`.

The job test starts its own Ray cluster (`ray start --head --block` in a
subprocess, every port chosen free, its own --temp-dir) because job submission
needs the dashboard, which the session's `ray_cluster` has not. It stops only that
cluster, by signalling the `ray start --block` process it started (which takes its
children down with it); `ray stop` would kill every Ray process on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from consort.deploy.jobs.eval import main
from consort.runtime import fusion
from tests.integration.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY_CONFIG = """\
members:
  - {name: smollm2, model: "tiny:smollm2-135m-instruct", num_cpus: 0.5}
  - {name: gemma3, model: "tiny:gemma3-270m", num_cpus: 0.5}
strategy: mean
main: smollm2
deepen: {min_anchors: 10, max_anchors: 1024}
"""
OUTPUTS = ("predictions.jsonl", "summary.json", "results.md", "results.png")


def tiny_config(folder: Path) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(TINY_CONFIG)
    return path


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "nope"], "unknown task 'nope'"),
        (["--task", "arc_easy", "--strategies", "mean,best"], "unknown strategy 'best'"),
        (["--tasks", "arc_easy,gsm9k"], "unknown task 'gsm9k'"),
        (["--task", "arc_easy", "--limit", "0"], "--limit must be at least 1"),
        (["--task", "arc_easy", "--frobnicate"], "unrecognized arguments"),
        ([], "no task given"),
    ],
)
def test_bad_input_is_a_one_line_error(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("consort eval: error:") and message in err[0]


def test_bad_input_from_the_command_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "consort.deploy.jobs.eval", "--task", "arc_easy", "--strategies", "median"],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"consort eval: error: unknown strategy 'median'; choose from members, {', '.join(fusion.names())}"
    ]


def test_a_killed_run_resumes_without_redoing_answered_questions(tmp_path: Path) -> None:
    # Tiny models answer a question in ~0.08 s: with 5 questions and a 0.2 s poll, CI once saw
    # the whole run finish between two polls. Many questions and a tight poll leave a wide window.
    questions = 30
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "consort.deploy.jobs.eval",
        "--local",
        "--config",
        str(tiny_config(tmp_path)),
        "--task",
        "arc_easy",
        "--limit",
        str(questions),
        "--chunk-size",
        "1",
        "--strategies",
        "mean,vote",
        "--out",
        str(out),
        "--no-progress",
    ]
    predictions = out / "predictions.jsonl"
    first = subprocess.Popen(
        command, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 150
        while len(lines(predictions)) < 2 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        first.kill()  # SIGKILL: no clean-up of any kind, as when a node dies
        first.wait()
    before = lines(predictions)
    assert 2 <= len(before) < questions, f"the run was not stopped halfway ({len(before)} answered)"

    again = subprocess.run(
        command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=150, check=False
    )
    assert again.returncode == 0, again.stderr[-2000:]
    after = lines(predictions)
    records = [json.loads(line) for line in after]
    assert len(records) == questions
    assert len({r["id"] for r in records}) == questions, "a question was answered twice"
    assert after[: len(before)] == before, "answered questions were rewritten"
    first_attempt = {r["attempt"] for r in records[: len(before)]}
    second_attempt = {r["attempt"] for r in records[len(before) :]}
    assert len(first_attempt) == 1 and len(second_attempt) == 1 and first_attempt != second_attempt
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"]["arc_easy"]["n"] == questions
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0


@pytest.fixture
def job_cluster() -> Iterator[str]:
    """A private Ray head with the dashboard (job submission); yields the dashboard's address."""
    temp_dir = tempfile.mkdtemp(prefix="cej", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus=4",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            *(f"{flag}={port}" for flag, port in ports.items()),
        ],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the private Ray head did not start")
            time.sleep(1)
        yield address
    finally:
        # SIGTERM to `ray start --block` shuts down the processes it started, and only those.
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_eval_on_replicas(job_cluster: str, tmp_path: Path) -> None:
    out = tmp_path / "job-out"
    result = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            job_cluster,
            "--working-dir",
            str(REPO),
            "--",
            "python",
            "-m",
            "consort.deploy.jobs.eval",
            "--config",
            str(tiny_config(tmp_path)),
            "--task",
            "arc_easy",
            "--limit",
            "3",
            "--replicas",
            "2",
            "--chunk-size",
            "1",
            "--strategies",
            "mean,deepen,me,vote",
            "--out",
            str(out),
            "--no-progress",
        ],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "succeeded" in result.stdout.lower()
    records = [json.loads(line) for line in lines(out / "predictions.jsonl")]
    assert len(records) == 3
    for record in records:
        assert set(record["members"]) == {"smollm2", "gemma3"}
        assert set(record["strategies"]) == {"mean", "deepen", "me", "vote"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"]["arc_easy"]["n"] == 3
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0


def test_consort_eval_routes_to_the_job_with_its_options(capsys) -> None:
    from consort.cli import main as consort

    assert consort(["eval", "--task", "nope", "--limit", "3"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("consort eval: error: unknown task 'nope'")
