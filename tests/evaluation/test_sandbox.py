"""Hostile tests for the code sandbox: each attack must be contained, reported with the right status, and leave the
host as it was. Every test runs in each isolation mode that this machine offers; a mode skips only the guarantees it
does not make, and says why."""

from __future__ import annotations

import ast
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from evaluation import sandbox
from evaluation.sandbox import ExecutionResult, SandboxUnavailableError, run_code, run_many

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's interpreter, readable by every user (unlike one under /root)


@dataclass(frozen=True)
class Mode:
    """One way of running the sandbox and the guarantees it makes on this machine."""

    name: str
    kwargs: dict = field(default_factory=dict)
    private_fs: bool = False  # host files invisible and unwritable
    private_net: bool = False  # no route out, not even to the host's loopback
    limits_processes: bool = False  # RLIMIT_NPROC applies (not root), so a fork bomb stops
    reaps_detached: bool = False  # a child that called setsid dies with the run
    parent_safe: bool = False  # the program cannot signal the calling process


def _probe_uid(kwargs: dict) -> int:
    result = run_code("import os\nprint(os.getuid())", **kwargs)
    assert result.passed, result.stderr
    return int(result.stdout.split()[-1])


@pytest.fixture(scope="module", params=["bwrap", "rlimits", "rlimits-unprivileged"])
def mode(request) -> Mode:
    if request.param == "bwrap":
        if not sandbox.isolation_available():
            pytest.skip("bubblewrap is missing or fails its self-check here (`make system-deps` installs it)")
        return Mode("bwrap", {"isolation": "bwrap"}, True, True, True, True, True)
    if request.param == "rlimits":
        kwargs = {"isolation": "rlimits"}
        uid = _probe_uid(kwargs)
        # As root the fallback cannot drop privileges for an interpreter under a private home: no process limit,
        # and the program may signal us. As an ordinary user RLIMIT_NPROC applies but the caller is signalable.
        return Mode("rlimits", kwargs, limits_processes=uid != 0)
    if os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("the fallback switches to a fresh uid only when started as root with a world-readable python")
    kwargs = {"isolation": "rlimits", "python": SYSTEM_PYTHON}
    if _probe_uid(kwargs) == 0:
        pytest.skip(f"{SYSTEM_PYTHON} is not reachable by other users, so the fallback keeps root")
    return Mode("rlimits-unprivileged", kwargs, limits_processes=True, reaps_detached=True, parent_safe=True)


def run(mode: Mode, code: str, tests: list[str] | None = None, **limits) -> ExecutionResult:
    limits.setdefault("timeout_s", 5.0)
    result = run_code(code, tests, **mode.kwargs, **limits)
    assert result.isolation == ("bwrap" if mode.name == "bwrap" else "rlimits")
    return result


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if marker.encode() in Path(entry.path, "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


# ----------------------------------------------------------------------------------------------- ordinary programs
def test_correct_program_passes(mode):
    code = "def double(x):\n    return 2 * x\nprint('hello')"
    result = run(mode, code, ["assert double(2) == 4", "assert double(0) == 0"])
    assert result.status == "passed" and result.passed
    assert result.tests_passed == [0, 1] and result.tests_failed == [] and result.failed_test is None
    assert result.stdout == "hello\n" and result.returncode == 0


def test_wrong_program_fails_and_names_the_failing_test(mode):
    tests = ["assert double(1) == 2", "assert double(3) == 7", "assert double(0) == 0", "assert double(5) == 11"]
    result = run(mode, "def double(x):\n    return 2 * x", tests)
    assert result.status == "failed" and not result.passed
    assert result.tests_passed == [0, 2] and result.tests_failed == [1, 3]
    assert result.failed_test == "assert double(3) == 7"
    assert "assert double(3) == 7" in result.stderr and "AssertionError" in result.stderr


def test_one_string_is_one_test(mode):
    """`tests="assert ..."` is one test, not a list of one-character tests that each fail with a NameError."""
    good = run(mode, "def f(x):\n    return x + 1", "assert f(1) == 2\nassert f(2) == 3")
    assert good.status == "passed" and good.tests_passed == [0], good.stderr
    bad = run(mode, "def f(x):\n    return x + 1", "assert f(1) == 3")
    assert bad.status == "failed" and bad.tests_failed == [0] and bad.failed_test == "assert f(1) == 3"
    assert "NameError" not in bad.stderr


@pytest.mark.parametrize("tests", [b"assert True", [b"assert True"], ["assert True", 3], 7])
def test_tests_of_the_wrong_type_are_refused(tests):
    with pytest.raises(TypeError, match="tests"):
        run_code("x = 1", tests)


def test_multiline_tests_share_the_namespace(mode):
    tests = ["import math\ndef close(a, b):\n    return math.isclose(a, b)", "assert close(area(1.0), math.pi)"]
    result = run(mode, "import math\ndef area(r):\n    return math.pi * r * r", tests)
    assert result.status == "passed", result.stderr


def test_syntax_error_is_error(mode):
    result = run(mode, "def f(x) return x", ["assert f(1) == 1"])
    assert result.status == "error"
    assert "SyntaxError" in result.stderr and result.tests_passed == []


def test_exception_in_program_is_error(mode):
    result = run(mode, "raise ValueError('boom')", ["assert True"])
    assert result.status == "error" and "ValueError: boom" in result.stderr
    assert result.tests_passed == [] and result.returncode != 0


def test_program_without_tests_is_judged_by_its_exit(mode):
    assert run(mode, "print(sum(range(10)))").status == "passed"
    assert run(mode, "import sys\nsys.exit(0)").status == "passed"
    failed = run(mode, "import sys\nsys.exit(3)")
    assert failed.status == "error" and failed.returncode == 3


# ------------------------------------------------------------------------------------------------ forged verdicts
@pytest.mark.parametrize(
    "exit_code",
    [
        "import sys\nsys.exit(0)",
        "raise SystemExit",
        "import os\nos._exit(0)",
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
        "print('all tests passed')\nprint('{\"status\": \"passed\"}')\nimport os\nos._exit(0)",
    ],
)
def test_leaving_before_the_tests_never_passes(mode, exit_code):
    result = run(mode, "def f():\n    return 0\n" + exit_code, ["assert f() == 1"])
    assert result.status in ("error", "killed") and result.tests_passed == []


def test_leaving_during_a_test_fails_it(mode):
    code = "import os\ndef f(x):\n    os._exit(0)"
    result = run(mode, code, ["assert 1 + 1 == 2", "assert f(1) == 1", "assert True"])
    assert result.status == "failed"
    assert result.tests_passed == [0] and result.tests_failed == [1, 2]


def test_fake_records_on_every_fd_are_ignored(mode):
    # Well-formed records for this very process, with guessed nonces, written to every descriptor.
    code = (
        "import os\n"
        "events = [(b'S', -1), (b'C', -1), (b'P', 0), (b'P', 1), (b'P', 2), (b'D', -1)]\n"
        "fake = b''.join(b'%s %d %s %d\\n' % (tag, os.getpid(), kind, i)\n"
        "                for tag in (b'x', b'0' * 32, b'') for kind, i in events)\n"
        "for fd in range(1, 1024):\n"
        "    try:\n"
        "        os.write(fd, fake)\n"
        "    except OSError:\n"
        "        pass\n"
        "os._exit(0)\n"
    )
    result = run(mode, code, ["assert False", "assert False", "assert False"])
    assert result.status == "error" and result.tests_passed == []


MISCHIEF = {
    "replace AssertionError": "import builtins\nclass Quiet(Exception):\n    pass\nbuiltins.AssertionError = Quiet",
    "replace __import__": "import builtins\nbuiltins.__import__ = lambda *a, **k: __builtins__",
    "patch abs globally": "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.len = lambda x: 3",
    "shadow builtins": "abs = lambda x: 0\nall = lambda x: True\nisinstance = lambda *a: True",
    "patch the harness": (
        "import os, sys\nos._exit = lambda *a: None\nos.write = lambda *a: 0\nsys.exit = lambda *a: None\n"
        "sys.modules['os'] = None\nsys.modules['traceback'] = None\nsys.modules['__main__'].say = print"
    ),
    "hijack stdio": "import io, sys\nsys.stdout = io.StringIO()\nsys.stderr = io.StringIO()\nprint('PASSED')",
    "swallow exceptions": "import sys\nsys.excepthook = sys.unraisablehook = lambda *a: None\nsys.tracebacklimit = 0",
}


@pytest.mark.parametrize("mischief", list(MISCHIEF), ids=list(MISCHIEF))
def test_import_time_mischief_cannot_make_failing_tests_pass(mode, mischief):
    code = "def f(x):\n    return x + 1\n" + MISCHIEF[mischief]
    tests = [
        "assert f(1) == 2",  # true: proves the tests still run after the mischief
        "assert f(1) == 3",
        "assert abs(f(1) - 5) < 1e-9",
        "assert all([f(1) == 4])",
        "assert isinstance(f(1), str)",
        "import math\nassert math.floor(f(0.5)) == 7",
        "raise AssertionError('explicit')",
        "assert len([f(1)]) == 3",
    ]
    result = run(mode, code, tests)
    assert result.status == "failed", result.stderr
    assert result.tests_passed == [0] and result.tests_failed == list(range(1, len(tests)))


def test_claims_from_a_forked_child_do_not_count(mode):
    # The child honestly passes the tests with its own `f`; the parent, whose `f` is wrong, waits and leaves.
    code = "import os\nif os.fork() == 0:\n    def f():\n        return 1\nelse:\n    os.wait()\n    os._exit(0)\n"
    result = run(mode, code, ["assert f() == 1"])
    assert result.status == "error" and result.tests_passed == []


# ----------------------------------------------------------------------------------------------- resource limits
@pytest.mark.parametrize(
    "bomb", ["x = bytearray(1 << 31)", "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))"]
)
def test_memory_bomb_is_memory(mode, bomb):
    result = run(mode, bomb, ["assert True"], memory_mb=128)
    assert result.status == "memory", (result.status, result.stderr[-500:])
    assert result.duration_s < 5


def test_memory_error_inside_a_test_is_memory_and_fails_that_test(mode):
    result = run(mode, "def grow():\n    return bytearray(1 << 31)", ["assert True", "grow()"], memory_mb=128)
    assert result.status == "memory" and result.tests_passed == [0] and result.tests_failed == [1]


@pytest.mark.parametrize("loop", ["while True:\n    pass", "import time\ntime.sleep(60)"], ids=["cpu", "sleep"])
def test_infinite_loop_times_out_promptly(mode, loop):
    start = time.monotonic()
    result = run(mode, loop, ["assert True"], timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and result.returncode is None
    assert 1.0 <= result.duration_s and elapsed < 2.5, elapsed  # about timeout + 1 s, with slack for a busy box


def test_huge_output_is_truncated(mode):
    code = "import sys\nfor _ in range(64):\n    sys.stdout.write('x' * (1 << 20))\nsys.stderr.write('e' * (1 << 24))"
    result = run(mode, code, max_output_bytes=10_000)
    assert result.status == "passed"
    assert result.stdout.startswith("x" * 10_000) and len(result.stdout) < 10_200
    assert "truncated" in result.stdout and str(64 * (1 << 20) - 10_000) in result.stdout
    assert len(result.stderr) < 10_200 and "truncated" in result.stderr


def test_file_size_is_limited(mode):
    code = "with open('big.bin', 'wb') as f:\n    f.write(b'0' * (3 << 20))"
    assert run(mode, code, max_file_mb=2).status == "error"
    assert run(mode, code, max_file_mb=4).status == "passed"


def test_fork_bomb_is_contained(mode):
    if not mode.limits_processes:
        pytest.skip(f"{mode.name}: runs as root here, which the kernel exempts from RLIMIT_NPROC")
    start = time.monotonic()
    result = run(mode, "import os\nwhile True:\n    os.fork()", timeout_s=3.0)
    assert result.status in ("killed", "error", "timeout")
    assert time.monotonic() - start < 8
    assert subprocess.run(["true"], timeout=10).returncode == 0  # the host can still start processes
    assert run(mode, "print('ok')").passed


def test_open_file_descriptors_are_only_stdio_and_the_record_pipe(mode):
    result = run(mode, "import os\nprint(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))")
    fds = ast.literal_eval(result.stdout)
    assert fds[:3] == [0, 1, 2] and len(fds) <= 5, fds  # + the record pipe + listdir's own descriptor


# ------------------------------------------------------------------------------------------------------ secrets
def test_environment_is_scrubbed(mode, monkeypatch, tmp_path):
    token = "fake-secret-" + secrets.token_hex(8)
    monkeypatch.setenv("AGENT_FORGE_FAKE_SECRET", token)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", token)
    monkeypatch.setenv("HOME", str(tmp_path))
    code = (
        "import os\n"
        "print('HOME is', os.environ.get('HOME'))\n"
        "print(dict(os.environ))\n"
        "print(open('/proc/self/environ', 'rb').read())\n"
        "for pid in os.listdir('/proc'):\n"
        "    try:\n"
        "        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError:\n"
        "        pass\n"
    )
    result = run(mode, code)
    assert result.status == "passed", result.stderr
    assert token not in result.stdout and "AGENT_FORGE_FAKE_SECRET" not in result.stdout
    assert f"HOME is {tmp_path}" not in result.stdout and "HOME is None" not in result.stdout


def test_home_and_project_files_are_invisible(mode, monkeypatch, tmp_path):
    if not mode.private_fs:
        pytest.skip(f"{mode.name}: the fallback has no private file system view; it reads what its user can")
    token = "fake-ssh-key-" + secrets.token_hex(8)
    ssh = tmp_path / "home" / ".ssh"
    ssh.mkdir(parents=True)
    (ssh / "id_ed25519").write_text(token)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    targets = [
        "~/.ssh/id_ed25519",
        str(ssh / "id_ed25519"),
        "/root/.ssh/id_rsa",
        "/root/.bashrc",
        str(REPO / "pyproject.toml"),
        str(Path(__file__).resolve()),
        "/etc/shadow",
        "/etc/passwd",
    ]
    code = (
        "import os\n"
        f"for path in {targets!r}:\n"
        "    try:\n"
        "        print('LEAK', path, open(os.path.expanduser(path)).read())\n"
        "    except OSError as exc:\n"
        "        print('blocked', path, type(exc).__name__)\n"
        f"print('listing', [p for p in ('/root', '/work', {str(REPO)!r}, '/home') if os.path.exists(p)])\n"
        "print('root holds', os.listdir('/root') if os.path.isdir('/root') else None)\n"
    )
    result = run(mode, code)
    assert result.status == "passed", result.stderr
    assert "LEAK" not in result.stdout and token not in result.stdout
    assert result.stdout.count("blocked") == len(targets)
    assert str(REPO) not in result.stdout.split("listing")[1].split("\n")[0]
    root_line = result.stdout.split("root holds")[1].split("\n")[0]
    assert ".ssh" not in root_line and ".bashrc" not in root_line  # at most the interpreter's own folders


def test_writes_outside_the_sandbox_do_not_land(mode, tmp_path):
    if not mode.private_fs:
        pytest.skip(f"{mode.name}: the fallback has no read-only view; it writes wherever its user may")
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    new_file = tmp_path / "created.txt"
    code = (
        "import os, shutil\n"
        "open('mine.txt', 'w').write('scratch is writable')\n"
        "assert open('/tmp/mine.txt').read() == 'scratch is writable'\n"
        f"attempts = [lambda: open({str(victim)!r}, 'w').write('pwned'), lambda: os.remove({str(victim)!r}),\n"
        f"            lambda: open({str(new_file)!r}, 'w').write('x'), lambda: shutil.rmtree({str(tmp_path)!r}),\n"
        "            lambda: open('/usr/pwned', 'w'), lambda: open('/pwned', 'w'), lambda: open('/etc/pwned', 'w'),\n"
        f"            lambda: open({str(REPO / 'pwned.txt')!r}, 'w'), lambda: os.makedirs('/root/.ssh/x')]\n"
        "for attempt in attempts:\n"
        "    try:\n"
        "        attempt()\n"
        "        print('WROTE')\n"
        "    except OSError:\n"
        "        print('blocked')\n"
    )
    result = run(mode, code)
    assert result.status == "passed", result.stderr
    assert "WROTE" not in result.stdout and result.stdout.count("blocked") == 9
    assert victim.read_text() == "original" and not new_file.exists()
    assert not (REPO / "pwned.txt").exists() and not Path("/usr/pwned").exists()


def test_network_is_unreachable(mode):
    if not mode.private_net:
        pytest.skip(f"{mode.name}: the fallback shares the host's network")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                accepted.append(conn.recv(100) or b"<connected>")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    code = (
        "import socket\n"
        f"for host, port in [('127.0.0.1', {port}), ('1.1.1.1', 53), ('8.8.8.8', 443)]:\n"
        "    try:\n"
        "        socket.create_connection((host, port), timeout=2).sendall(b'LEAK')\n"
        "        print('CONNECTED', host)\n"
        "    except OSError as exc:\n"
        "        print('blocked', host, exc.errno)\n"
        "try:\n"
        "    print('RESOLVED', socket.gethostbyname('pypi.org'))\n"
        "except OSError:\n"
        "    print('no dns')\n"
    )
    try:
        result = run(mode, code)
    finally:
        stop.set()
        thread.join(timeout=2)
        server.close()
    assert result.status == "passed", result.stderr
    assert "CONNECTED" not in result.stdout and "RESOLVED" not in result.stdout
    assert result.stdout.count("blocked") == 3 and accepted == []


# ----------------------------------------------------------------------------------------------- processes
def test_detached_child_does_not_outlive_the_run(mode):
    if not mode.reaps_detached:
        pytest.skip(f"{mode.name}: without a PID namespace or a run-only uid, a setsid child escapes the group kill")
    marker = "agent-forge-detached-" + secrets.token_hex(8)
    code = (
        "import os, subprocess, sys\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}],\n"
        "                         start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
        "import time\n"
        "time.sleep(0.3)\n"
        "print('children', child.pid)\n"
    )
    result = run(mode, code)
    assert result.status == "passed", result.stderr
    assert _processes_with(marker) == []


SUBREAPER_SCRIPT = """
import ctypes, os, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come to us, as to PID 1 in a container
from evaluation.sandbox import run_many
results = run_many([("print(1)", None)] * 6 + [("while True: pass", None)], timeout_s=0.5, **eval(sys.argv[1]))
assert [r.status for r in results] == ["passed"] * 6 + ["timeout"], [r.status for r in results]
zombies = 0
for entry in os.scandir("/proc"):
    try:
        fields = open(f"/proc/{entry.name}/stat").read().rpartition(")")[2].split()
    except (OSError, ValueError):
        continue
    zombies += fields[0] == "Z" and int(fields[1]) == os.getpid()
print("zombies", zombies)
"""


def test_nothing_is_left_for_a_subreaper_to_reap(mode):
    # bwrap's outer process exits before the namespace's init; a host that is PID 1 (or a subreaper) inherits
    # that init and, unless the sandbox reaps it, collects zombies until the pid table is full.
    proc = subprocess.run(
        [sys.executable, "-c", SUBREAPER_SCRIPT, repr(mode.kwargs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["zombies", "0"]


def test_killing_the_parent_leaves_the_host_unharmed(mode):
    if not mode.parent_safe:
        pytest.skip(f"{mode.name}: the program runs as the caller's uid here and may signal it")
    code = (
        "import os, signal\n"
        "for target in (lambda: os.kill(os.getppid(), signal.SIGKILL), lambda: os.kill(1, signal.SIGKILL),\n"
        "               lambda: os.kill(-1, signal.SIGKILL), lambda: os.killpg(0, signal.SIGTERM)):\n"
        "    try:\n"
        "        target()\n"
        "    except OSError as exc:\n"
        "        print('refused', exc.errno)\n"
    )
    result = run(mode, code, ["assert True"])
    assert result.status in ("passed", "killed", "error")  # reported, whichever signal landed on the program
    assert run(mode, "print('still serving')").stdout == "still serving\n"


def test_runs_without_root(mode):
    if not mode.limits_processes:
        pytest.skip(f"{mode.name}: runs as root here (see the mode fixture)")
    result = run(mode, "import os\nprint(os.getuid(), os.geteuid(), os.getgroups())")
    uid, euid, *_ = result.stdout.split()
    assert int(uid) != 0 and int(euid) != 0


# -------------------------------------------------------------------------------------------------- the API
def test_run_many_keeps_order_and_statuses(mode):
    programs = [
        ("def f():\n    return 1", ["assert f() == 1"]),
        ("def f():\n    return 2", ["assert f() == 1"]),
        ("def f(:", ["assert True"]),
        ("print('no tests')", None),
        ("raise RuntimeError", None),
        ("x = 1", ["assert x == 1", "assert x == 2"]),
    ]
    results = run_many(programs, max_workers=2, timeout_s=5.0, **mode.kwargs)
    assert [r.status for r in results] == ["passed", "failed", "error", "passed", "error", "failed"]
    assert results[3].stdout == "no tests\n" and results[5].tests_failed == [1]


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="isolation"):
        run_code("pass", isolation="docker")
    with pytest.raises(ValueError):
        run_code("pass", timeout_s=0)
    with pytest.raises(TypeError):
        run_code("pass", ["assert True", 3])  # type: ignore[list-item]


def test_missing_bwrap_falls_back_loudly_or_raises(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "_bwrap", lambda: None)
    monkeypatch.setattr(sandbox, "_warned", set())
    sandbox._bwrap_problem.cache_clear()
    try:
        with pytest.raises(SandboxUnavailableError, match="bubblewrap"):
            run_code("pass", require_isolation=True)
        with pytest.raises(SandboxUnavailableError):
            run_code("pass", isolation="bwrap")
        with caplog.at_level(logging.WARNING, logger="evaluation.sandbox"):
            first = run_code("print(1)")
            second = run_code("print(2)")
        assert first.passed and first.isolation == "rlimits" and second.isolation == "rlimits"
        warnings = [r for r in caplog.records if "Falling back" in r.getMessage()]
        assert len(warnings) == 1 and "require_isolation=True" in warnings[0].getMessage()
    finally:
        sandbox._bwrap_problem.cache_clear()


def test_bwrap_command_binds_only_what_the_interpreter_needs():
    interp = sandbox._interpreter(None)
    argv = sandbox._bwrap_argv(interp, 64, os.geteuid() == 0, info_fd=9)
    binds = [argv[i + 2] for i, a in enumerate(argv) if a in ("--ro-bind", "--ro-bind-try", "--bind")]
    assert "/usr" in binds and (interp.prefix in binds or interp.prefix.startswith("/usr/"))
    assert "--bind" not in argv and "--dev-bind" not in argv  # nothing of the host is writable
    hidden = ("/", "/root", "/home", "/work", "/tmp", "/etc", str(REPO), os.path.expanduser("~"))
    assert not any(b in hidden for b in binds) and not any(b.startswith(str(REPO)) for b in binds)
    assert {"--die-with-parent", "--new-session", "--clearenv", "--remount-ro"} <= set(argv)
    if os.geteuid() == 0:
        assert {"--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"} <= set(argv)
        assert argv[argv.index("--cap-drop") + 1] == "ALL"
    else:
        assert {"--unshare-all", "--unshare-user", "--disable-userns"} <= set(argv)
