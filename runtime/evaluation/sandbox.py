"""Running untrusted generated Python (HumanEval, MBPP completions) in a separate, bounded process.

A completion is a program a language model wrote: it may loop forever, fork, allocate
without end, delete files or open sockets. Each run here is a fresh interpreter in its
own session (process group), started by the evaluation driver, never by the endpoint or
a member actor. What is enforced, in the order it is set up:

* **Process**: `python -I -S` (no user site, no site-packages, no environment variables
  read, no current directory on the path), a minimal environment, a new session so that
  the whole group is killed when the run ends, whatever it left behind.
* **Time**: a wall-clock limit in the driver (the group is SIGKILLed) and RLIMIT_CPU in
  the child (SIGXCPU, then SIGKILL one second later).
* **Memory and files**: RLIMIT_AS (an allocation past it raises MemoryError), RLIMIT_FSIZE
  (no file, stdout included, grows past it), RLIMIT_NOFILE, RLIMIT_CORE = 0, and
  RLIMIT_NPROC (binding only for a non-root user, see below).
* **Working directory**: a new empty temporary directory, removed afterwards.
* **Network**: a new network namespace with no interfaces up (`unshare -n` as root,
  `unshare -rn` otherwise) where the kernel allows it (`network_isolation()` says which);
  in every case the audit hook below refuses to create a socket.
* **An audit hook** (PEP 578), installed before the program runs and impossible to remove
  from Python: it refuses process creation (fork, exec, spawn, system, subprocess),
  signals to other processes, sockets, loading native code (ctypes, cffi), and any write,
  deletion, rename or permission change outside the working directory.
* **Privileges**: a driver running as root drops the child to `nobody` (so files outside
  are protected by the kernel too, and RLIMIT_NPROC binds) when the interpreter's own
  files are readable by `nobody`; otherwise (an interpreter under /root) it cannot, and
  the audit hook is the file guard.

A run passes only if the program ran to its end with no exception: the child then writes
a random token, known only to the driver and the child's bootstrap, to a descriptor of its
own. A program that exits early (`sys.exit(0)`, `os._exit(0)`) before its tests have run
does not pass. This bounds what careless or hostile generated code does by accident; it is
not a boundary against code written to attack this harness (an audit hook can be evaded
from Python by a determined attacker): run the evaluation of untrusted models in a
disposable container as well.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

NOBODY = 65534
_TAIL = 2048
_STDOUT_TAIL = 64 << 10

Outcome = Literal["passed", "failed", "timeout", "cpu_limit", "memory_limit", "blocked"]


class SandboxLimits(BaseModel):
    """The bounds of one sandboxed run."""

    model_config = ConfigDict(frozen=True)

    wall_seconds: float = Field(10.0, gt=0, description="Wall-clock limit; the process group is killed after it.")
    cpu_seconds: int = Field(10, gt=0, description="CPU-time limit (RLIMIT_CPU) of the child.")
    memory_bytes: int = Field(
        1 << 30, gt=64 << 20, description="Address-space limit (RLIMIT_AS); past it allocations raise MemoryError."
    )
    file_bytes: int = Field(
        16 << 20, gt=0, description="Largest file the child may write (RLIMIT_FSIZE), its stdout and stderr included."
    )
    open_files: int = Field(64, ge=16, description="Open file descriptors (RLIMIT_NOFILE).")
    processes: int = Field(
        16, ge=1, description="RLIMIT_NPROC of the child's user (binding for a non-root user only)."
    )


class ExecutionResult(BaseModel):
    """How one sandboxed program ended."""

    model_config = ConfigDict(frozen=True)

    outcome: Outcome = Field(
        description="passed: ran to its end; failed: an exception or early exit; timeout: wall clock; "
        "cpu_limit: RLIMIT_CPU; memory_limit: MemoryError; blocked: the sandbox refused an operation."
    )
    detail: str = Field(description="The last line of stderr, or what ended the run.")
    seconds: float = Field(description="Wall-clock seconds the run took.")
    returncode: int | None = Field(description="The child's exit status (negative: killed by that signal).")
    stdout: str = Field(
        default="", description="The last 64 KiB of what the program printed (a harness reports its findings there)."
    )

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"


# The child's first code. Its configuration comes in argv[1]; the token and the program on
# stdin. It sets the limits, drops privileges, installs the audit hook, then runs the
# program and, only if that returns normally, writes the token.
_BOOTSTRAP = r"""
import json, os, resource, sys
def _setup(cfg):
    for name, value in cfg["rlimits"]:
        soft, hard = value if isinstance(value, list) else (value, value)
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if cfg["drop"]:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    root = os.path.realpath(cfg["workdir"])
    blocked = frozenset(cfg["blocked_events"])
    blocked_modules = frozenset(cfg["blocked_modules"])
    path_events = {e: tuple(i) for e, i in cfg["path_events"]}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    realpath, fspath, sep = os.path.realpath, os.fspath, os.sep

    def inside(path):
        if isinstance(path, int):
            return True
        try:
            path = fspath(path)
            if isinstance(path, bytes):
                path = path.decode("utf-8", "surrogateescape")
            full = realpath(path)
        except Exception:
            return False
        return full == root or full.startswith(root + sep)

    def hook(event, args):
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].partition(".")[0] in blocked_modules:
            raise ImportError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags
            )
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the working directory is not allowed")
        elif event in path_events:
            for i in path_events[event]:
                if i < len(args) and args[i] is not None and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the working directory is not allowed")

    sys.addaudithook(hook)


def _run(cfg, token, program):
    code = compile(program, "<completion>", "exec")
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(code, namespace)
    except SystemExit as error:
        sys.stderr.write(f"SystemExit: the program exited ({error.code!r}) before it finished\n")
        sys.stderr.flush()
        os._exit(3)
    os.write(cfg["result_fd"], token)


_cfg = json.loads(sys.argv[1])
_data = sys.stdin.buffer.read()
sys.stdin.close()
_token, _, _program = _data.partition(b"\n")
del _data
_setup(_cfg)
_run(_cfg, _token, _program.decode("utf-8"))
"""

_BLOCKED_EVENTS = (
    "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.startfile",
    "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill",
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
    "os.setuid", "os.setgid", "os.chroot", "os.putenv", "os.unsetenv", "sys.addaudithook",
)
_BLOCKED_MODULES = ("ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess", "multiprocessing")
# Audit events that change the file system, with the indices of their path arguments.
_PATH_EVENTS = (
    ("os.remove", (0,)), ("os.rmdir", (0,)), ("os.rename", (0, 1)), ("os.link", (0, 1)),
    ("os.symlink", (0, 1)), ("os.truncate", (0,)), ("os.chmod", (0,)), ("os.chown", (0,)),
    ("os.chflags", (0,)), ("os.lchmod", (0,)), ("os.lchown", (0,)), ("os.mkdir", (0,)),
    ("os.utime", (0,)), ("os.setxattr", (0,)), ("os.removexattr", (0,)), ("shutil.rmtree", (0,)),
    ("shutil.move", (0, 1)), ("shutil.copyfile", (1,)), ("shutil.copytree", (1,)), ("os.mkfifo", (0,)),
    ("os.mknod", (0,)),
)


@cache
def network_isolation() -> tuple[str, ...]:
    """The command prefix that runs the child in a new, empty network namespace, or () where the kernel refuses.

    Probed once per process: containers often forbid namespaces, and then the audit
    hook's refusal to create sockets is the only network guard.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    candidates = [(unshare, "-n")] if os.geteuid() == 0 else []
    candidates.append((unshare, "-rn"))
    for prefix in candidates:
        try:
            done = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return prefix
    return ()


def _readable_by_others(path: Path) -> bool:
    """Whether a user with no special rights can read `path` (every parent searchable, itself readable)."""
    path = path.resolve()
    for folder in [path, *path.parents]:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH and folder != path:
            return False
    return bool(path.stat().st_mode & stat.S_IROTH)


@cache
def can_drop_privileges() -> bool:
    """True when running as root and `nobody` could still read the interpreter's standard library."""
    if os.geteuid() != 0:
        return False
    stdlib = Path(os.__file__).parent
    try:
        return _readable_by_others(stdlib) and _readable_by_others(Path(sys.executable))
    except OSError:
        return False


def describe() -> str:
    """One line saying which of the guards this machine enforces (for logs and the docs)."""
    net = " ".join(Path(p).name if i == 0 else p for i, p in enumerate(network_isolation())) or "none"
    drop = "drops root to nobody" if can_drop_privileges() else "keeps the user (audit hook guards files)"
    return f"sandbox: network namespace via {net}; {drop}; audit hook, rlimits, wall-clock kill always"


def _tail(path: Path, limit: int = _TAIL) -> str:
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - limit))
        return handle.read().decode("utf-8", "replace")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(program: str, limits: SandboxLimits | None = None) -> ExecutionResult:
    """Run `program` in a fresh sandboxed interpreter; never raises for anything the program does."""
    limits = limits or SandboxLimits()
    drop = can_drop_privileges()
    scratch = Path(tempfile.mkdtemp(prefix="consort-sandbox-"))
    workdir = scratch / "work"
    workdir.mkdir()
    if drop:
        os.chown(workdir, NOBODY, NOBODY)
    token = secrets.token_hex(16)
    result_path = scratch / "result"
    config = {
        "rlimits": [
            ("RLIMIT_CPU", [limits.cpu_seconds, limits.cpu_seconds + 1]),
            ("RLIMIT_AS", limits.memory_bytes),
            ("RLIMIT_FSIZE", limits.file_bytes),
            ("RLIMIT_NOFILE", limits.open_files),
            ("RLIMIT_CORE", 0),
            ("RLIMIT_NPROC", limits.processes),
        ],
        "drop": drop,
        "uid": NOBODY,
        "workdir": str(workdir),
        "blocked_events": _BLOCKED_EVENTS,
        "blocked_modules": _BLOCKED_MODULES,
        "path_events": _PATH_EVENTS,
    }
    started = time.perf_counter()
    timed_out = False
    try:
        with (
            (scratch / "stdout").open("wb") as out,
            (scratch / "stderr").open("wb") as err,
            result_path.open("wb") as result,
        ):
            config["result_fd"] = result.fileno()
            command = [*network_isolation(), sys.executable, "-I", "-S", "-c", _BOOTSTRAP, json.dumps(config)]
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(workdir), "TMPDIR": str(workdir)}
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                cwd=workdir,
                env=env,
                start_new_session=True,
                pass_fds=(result.fileno(),),
            )
            try:
                process.communicate(input=f"{token}\n{program}".encode(), timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(process.pid)
                process.wait()
            finally:
                # Whatever the program started in its group dies with it.
                _kill_group(process.pid)
        seconds = time.perf_counter() - started
        stderr = _tail(scratch / "stderr")
        passed = result_path.read_bytes() == token.encode()
        result = _result(process.returncode, passed, timed_out, stderr, seconds, limits)
        return result.model_copy(update={"stdout": _tail(scratch / "stdout", _STDOUT_TAIL)})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _result(
    returncode: int | None, passed: bool, timed_out: bool, stderr: str, seconds: float, limits: SandboxLimits
) -> ExecutionResult:
    last = _last_line(stderr)
    outcome: Outcome
    if timed_out:
        outcome, detail = "timeout", f"killed after the {limits.wall_seconds:g} s wall-clock limit"
    elif passed and returncode == 0:
        outcome, detail = "passed", ""
    elif returncode in (-signal.SIGXCPU, -signal.SIGKILL) and not last:
        outcome, detail = "cpu_limit", f"killed at the {limits.cpu_seconds} s CPU limit"
    elif returncode == -signal.SIGXCPU:
        outcome, detail = "cpu_limit", f"killed at the {limits.cpu_seconds} s CPU limit"
    elif "MemoryError" in last:
        outcome, detail = "memory_limit", last
    elif "sandbox:" in stderr:
        outcome, detail = "blocked", next(
            (line.strip() for line in reversed(stderr.splitlines()) if "sandbox:" in line), last
        )[:300]
    else:
        outcome, detail = "failed", last or f"exit status {returncode}"
    return ExecutionResult(outcome=outcome, detail=detail, seconds=round(seconds, 3), returncode=returncode)


def run_many(
    programs: Sequence[str], limits: SandboxLimits | None = None, *, workers: int = 2
) -> list[ExecutionResult]:
    """Run programs concurrently (each in its own sandbox), results in input order."""
    if not programs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(programs)))) as pool:
        return list(pool.map(lambda p: run_python(p, limits), programs))
