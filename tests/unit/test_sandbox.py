"""The code sandbox against hostile completions: each one is a failed sample, never a crash or a hang."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from consort.runtime.evaluation.sandbox import ExecutionResult, SandboxLimits, describe, run_many, run_python

# Small bounds so that a hostile program costs seconds; the wall clock is what ends a busy loop
# on a loaded CI machine, where 2 s of CPU can take longer than 4 s of wall time.
LIMITS = SandboxLimits(wall_seconds=4, cpu_seconds=2, memory_bytes=512 << 20, file_bytes=1 << 20)
# A run that the wall clock ends, with room for starting the interpreter and reaping the group.
BOUND = LIMITS.wall_seconds + 6


def run(program: str) -> ExecutionResult:
    started = time.monotonic()
    result = run_python(program, LIMITS)
    assert time.monotonic() - started < BOUND, f"{result} took longer than the wall-clock bound"
    return result


def test_a_correct_program_passes_and_a_wrong_one_fails() -> None:
    assert run("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n").passed
    failed = run("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5, 'wrong sum'\n")
    assert failed.outcome == "failed" and "wrong sum" in failed.detail


def test_syntax_error_is_a_failed_sample() -> None:
    result = run("def broken(:\n    pass\n")
    assert result.outcome == "failed" and "SyntaxError" in result.detail


def test_standard_library_and_the_working_directory_are_usable() -> None:
    program = (
        "import math, collections, heapq, itertools, re, functools, typing, string, fractions, bisect\n"
        "open('scratch.txt', 'w').write('kept')\n"
        "assert open('scratch.txt').read() == 'kept'\n"
        "import os\nos.remove('scratch.txt')\n"
        "assert math.gcd(12, 18) == 6\n"
    )
    assert run(program).passed


def test_infinite_loop_is_killed() -> None:
    result = run("while True:\n    pass\n")
    assert result.outcome in ("timeout", "cpu_limit") and not result.passed


def test_sleeping_forever_is_killed_by_the_wall_clock() -> None:
    result = run("import time\ntime.sleep(3600)\n")
    assert result.outcome == "timeout" and result.seconds < BOUND


def test_fork_bomb_is_refused() -> None:
    result = run("import os\nwhile True:\n    os.fork()\n")
    assert result.outcome == "blocked" and "os.fork" in result.detail


def test_fork_bomb_that_swallows_the_refusal_is_bounded() -> None:
    # Every way of starting a process is tried and every refusal swallowed: the wall clock
    # (or the CPU limit) ends the run, and its whole process group is killed with it.
    program = (
        "import os\n"
        "while True:\n"
        "    for attempt in (lambda: os.fork(), lambda: os.system('true'), lambda: __import__('subprocess')):\n"
        "        try:\n"
        "            attempt()\n"
        "        except BaseException:\n"
        "            pass\n"
    )
    result = run(program)
    assert result.outcome in ("timeout", "cpu_limit")


def test_multiprocessing_is_refused() -> None:
    result = run("import multiprocessing\nmultiprocessing.Process(target=print).start()\n")
    assert result.outcome == "blocked"


def test_huge_allocation_is_a_memory_error() -> None:
    result = run("data = bytearray(8 * 1024 ** 3)\n")
    assert result.outcome == "memory_limit" and "MemoryError" in result.detail


def test_growing_without_end_is_stopped() -> None:
    result = run("chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 ** 2))\n")
    assert result.outcome in ("memory_limit", "timeout", "cpu_limit") and not result.passed


def test_deleting_a_file_outside_its_directory_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    for program in (
        f"import os\nos.remove({str(victim)!r})\n",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
        f"open({str(victim)!r}, 'w').write('overwritten')\n",
        f"import os\nos.rename({str(victim)!r}, 'stolen.txt')\n",
        "import os\nos.chdir('/')\nos.remove(" + repr(os.path.relpath(victim, "/")) + ")\n",
    ):
        result = run(program)
        assert not result.passed and result.outcome == "blocked", (program, result)
    assert victim.read_text() == "keep me"


def test_network_is_unreachable() -> None:
    # A server in this process: a sandboxed program must not reach it (a new network
    # namespace has no interfaces up; the audit hook refuses sockets anyway).
    accepted: list[object] = []
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(LIMITS.wall_seconds + 2)
    port = server.getsockname()[1]

    def accept() -> None:
        try:
            accepted.append(server.accept())
        except OSError:
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        result = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n")
        thread.join(timeout=LIMITS.wall_seconds + 3)
    finally:
        server.close()
    assert not result.passed and result.outcome == "blocked"
    assert not accepted, "the sandboxed program reached a server outside"


def test_native_code_is_refused() -> None:
    result = run("import ctypes\nctypes.CDLL(None).exit(0)\n")
    assert result.outcome == "blocked"


def test_signalling_other_processes_is_refused() -> None:
    # Signal 0 only probes: were the guard missing, the test fails instead of killing pytest.
    result = run("import os\nos.kill(os.getppid(), 0)\n")
    assert result.outcome == "blocked"


@pytest.mark.parametrize("program", ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n", "raise SystemExit\n"])
def test_exiting_before_the_tests_ran_does_not_pass(program: str) -> None:
    # A completion that exits with status 0 has not run the tests that follow it.
    result = run(program + "assert False, 'the tests'\n")
    assert not result.passed


def test_flooding_stdout_is_bounded() -> None:
    result = run("while True:\n    print('x' * 4096)\n")
    assert not result.passed


def test_run_many_keeps_the_order_and_isolates_runs() -> None:
    programs = ["assert True\n", "assert False\n", "import time\ntime.sleep(60)\n", "x = 1\n"]
    started = time.monotonic()
    results = run_many(programs, LIMITS, workers=2)
    assert time.monotonic() - started < 2 * BOUND
    assert [r.outcome for r in results] == ["passed", "failed", "timeout", "passed"]


def test_describe_names_the_guards() -> None:
    text = describe()
    assert "audit hook" in text and "network" in text
