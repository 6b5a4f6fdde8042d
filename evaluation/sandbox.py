"""Run untrusted, model-written Python in a contained child process and report per-test results.

Model-written code is hostile input: it may loop forever, exhaust memory, fork-bomb, read secrets, open sockets,
spawn children that outlive it, or try to *forge* a passing verdict. `run_code` runs it in layers:

1. **bubblewrap** (`/usr/bin/bwrap`, Debian package `bubblewrap`; `make system-deps` installs it), the default:
   fresh PID / network / IPC / UTS / cgroup namespaces (plus a user namespace when not root), an empty root file
   system holding read-only binds of `/usr` (with the `/bin`, `/lib*`, `/sbin` symlinks), the interpreter's prefix
   and two files of `/etc` (`ld.so.cache`, `localtime`); a fresh `/proc` and a minimal `/dev`; a size-limited
   tmpfs at `/tmp` as the only writable place (also the working directory and `$HOME`). The home directory, the
   project checkout, the host's `/tmp` and other users' data are simply not there. No network device but a private
   loopback. `--die-with-parent` and the PID namespace take every process of the run down with it, including
   children that called `setsid`. `--clearenv` plus a minimal `PATH`/`HOME`/`LANG` (no inherited secrets).
   Under root, the program runs as a fresh unprivileged uid without capabilities (bwrap keeps only
   `CAP_SETUID`/`CAP_SETGID` for the harness to drop to that uid; `no_new_privs` and `nosuid` mounts stop any way
   back), because the kernel exempts uid 0 from `RLIMIT_NPROC` even inside a user namespace.
2. **rlimits fallback**, used (with a one-time warning) only where bwrap is missing or fails its self-check, and
   refused with `require_isolation=True` / `isolation="bwrap"`: a fresh session and process group, a private temp
   directory as working directory and `$HOME`, a scrubbed environment. Under root, when the interpreter is
   reachable by other users, the program still drops to a fresh unprivileged uid: then `RLIMIT_NPROC` bites, the
   caller cannot be signalled, and every process of that uid is killed afterwards (so detached children die too).
   Otherwise (an unprivileged caller, or root with an interpreter under a private home) the program runs as the
   caller: it can read whatever the caller can, reach the network, signal the caller, and a child that calls
   `setsid` escapes the final process-group kill. That is why the fallback warns.

Both modes set the same limits before any model-written line runs: CPU seconds, address space, process count, file
size, no core dumps; the host enforces the wall-clock limit and kills the whole process group at the end. The
interpreter is the *base* interpreter in isolated mode (`-I -S -B`: no environment variables, no site-packages, no
bytecode writes): generated code gets the standard library only.

**Verdicts.** The child runs a small harness (`_HARNESS`) that reads the job from stdin, applies the limits, then
executes the program and each test in turn, writing one record per event to a private pipe (never stdout). Every
record carries a per-run random nonce and the writer's pid, and the host needs an explicit "pass" record for every
test plus an "all done" record from the harness's own process. So printing, `sys.exit`/`os._exit`, killing the
process, patching `builtins` (`AssertionError`, `__import__`, `abs`, ...), `sys.modules` or the harness module, or
forking do not turn failures into passes: the harness captured every function and exception class it uses before
the program ran, and tests see a pristine copy of the builtins. What remains possible is deliberate introspection
of the harness's own objects inside the same interpreter (`gc`, `sys.settrace`, `ctypes`): the API runs tests in the
program's namespace, so they share one interpreter. Test-level cheats such as returning an object whose `__eq__`
is always true are the tests' business, not the sandbox's.
"""

from __future__ import annotations

import functools
import json
import marshal
import math
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

STATUSES = ("passed", "failed", "error", "timeout", "memory", "killed")
ISOLATION_MODES = ("auto", "bwrap", "rlimits")

# Seconds the sandbox may take to start before the program's own wall-clock limit begins (bwrap + interpreter).
STARTUP_GRACE_S = 10.0
# Seconds to keep reading output after the program exited while something else still holds the pipes open.
DRAIN_GRACE_S = 0.2
# The result pipe only ever carries short records; anything beyond this is noise from a misbehaving program.
MAX_RECORD_BYTES = 1 << 20
# Fresh unprivileged uids for programs started by root: random in a range no distribution hands out.
SANDBOX_UID_RANGE = (2_000_000_000, 2_100_000_000)
_SIGNAL_MEMORY_HINTS = ("MemoryError", "Cannot allocate memory", "out of memory")


class SandboxUnavailableError(RuntimeError):
    """Raised when full isolation was required but bubblewrap is missing or failed its self-check."""


@dataclass
class ExecutionResult:
    """What happened to one program: status, captured output, per-test verdicts and how it was contained.

    `status` is one of `STATUSES`; `stdout`/`stderr` are capped (the cut is noted in the text); test indices refer
    to the `tests` passed in; `returncode` is negative for a signal and None when the sandbox killed the program at
    its time limit; `isolation` is what actually contained the run, "bwrap" or "rlimits".
    """

    status: str
    stdout: str
    stderr: str
    duration_s: float
    tests_passed: list[int] = field(default_factory=list)
    tests_failed: list[int] = field(default_factory=list)
    failed_test: str | None = None
    returncode: int | None = None
    isolation: str = "bwrap"

    @property
    def passed(self) -> bool:
        """True when the program ran and every test passed (or it exited 0 and had no tests)."""
        return self.status == "passed"


# --------------------------------------------------------------------------------------------------------------
# The harness: runs inside the sandboxed interpreter, before and around the model-written code.
# Every name it uses after the program starts is a local bound beforehand, so patching builtins or modules from
# the program cannot change what it reports (only the traceback text of a failure is formatted by whatever
# `traceback` module is importable at that moment: text, never a verdict). The job arrives as marshal data on
# stdin; `json`, `traceback` and `linecache` would pull in `re` and cost ~10 ms per program.
# Records: b"<nonce> <pid> <kind> <index>\n", kinds
# S(tarted) C(program completed) E(rror in program) M(emoryError) P(ass) F(ail) D(one).
# --------------------------------------------------------------------------------------------------------------
_HARNESS = r"""
def _harness():
    import _sitebuiltins, builtins, marshal, os, resource, sys

    write, read, exit_now, getpid, import_ = os.write, os.read, os._exit, os.getpid, builtins.__import__
    run, build = exec, compile
    BaseExc, SysExit, MemErr = BaseException, SystemExit, MemoryError
    str_, int_, type_, enumerate_, tuple_, len_, zip_ = str, int, type, enumerate, tuple, len, zip
    out, err = sys.stdout, sys.stderr

    chunks = []
    while True:
        chunk = read(0, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    job = marshal.loads(b"".join(chunks))
    chunks = None
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    fd = job["fd"]
    os.closerange(3, fd)
    os.closerange(fd + 1, 1 << 20)
    tag = job["nonce"].encode()
    sources = {}

    def say(kind, index=-1):
        try:
            write(fd, b"%s %d %s %d\n" % (tag, getpid(), kind, index))
        except BaseExc:
            exit_now(70)

    def complain(exc):
        # traceback and linecache load only on failure: they pull in `re` (~10 ms on every run otherwise).
        try:
            err.flush()
            linecache = import_("linecache")
            for name, src in sources.items():
                linecache.cache[name] = (len_(src), None, src.splitlines(True), name)
            tb = exc.__traceback__
            lines = import_("traceback").format_exception(type_(exc), exc, tb.tb_next if tb is not None else None)
            write(2, "".join(lines).encode("utf-8", "replace"))
        except BaseExc:
            pass

    def flush():
        for stream in (out, err):
            try:
                stream.flush()
            except BaseExc:
                pass

    for name, soft, hard in job["limits"]:
        which = getattr(resource, name)
        _, cur_hard = resource.getrlimit(which)
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
        resource.setrlimit(which, (min(soft, hard), hard))
    uid = job["uid"]
    if uid is not None or job["prctl"]:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid or os.getgid() != uid:
            exit_now(71)
        prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: setuid cleared it, which hides /proc/self from the program
    if job["prctl"]:
        prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS (bwrap sets it itself)
        prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = SIGKILL, after setuid (which clears it)
        if os.getppid() != job["ppid"]:
            exit_now(72)

    builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
    builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")
    pristine = dict(builtins.__dict__)
    main = type_(sys)("__main__")
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    sys.argv = ["<program>"]
    ns = main.__dict__
    code, tests = job["code"], tuple_(job["tests"])
    job = None
    names = tuple_("<test %d>" % i for i in range(len_(tests)))
    sources["<program>"] = code
    sources.update(zip_(names, tests))

    say(b"S")
    try:
        run(build(code, "<program>", "exec"), ns)
    except MemErr as exc:
        complain(exc)
        flush()
        say(b"M")
        exit_now(1)
    except SysExit as exc:
        status = exc.code
        clean = status is None or (type_(status) is int_ and status == 0)
        if tests or not clean:
            if not clean and type_(status) is not int_:
                complain(exc)
            flush()
            say(b"E")
            exit_now(status if type_(status) is int_ and 0 < status < 256 else 1)
    except BaseExc as exc:
        complain(exc)
        flush()
        say(b"E")
        exit_now(1)
    say(b"C")

    scope = {k: v for k, v in ns.items() if type_(k) is str_ and k not in pristine}
    scope["__name__"] = "__main__"
    scope["__builtins__"] = pristine
    for i, src in enumerate_(tests):
        try:
            run(build(src, names[i], "exec"), scope)
        except MemErr as exc:
            complain(exc)
            say(b"M", i)
        except BaseExc as exc:
            complain(exc)
            say(b"F", i)
        else:
            say(b"P", i)
    flush()
    say(b"D")
    exit_now(0)


_harness()
"""


# --------------------------------------------------------------------------------------------------------------
# Host side.
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Interpreter:
    """A Python interpreter the sandbox can run: its real binary, the folders it needs and who may read them."""

    executable: str
    prefix: str
    stdlib: str
    world_readable: bool


@dataclass(frozen=True)
class _Launch:
    """One prepared child: command line, environment, working directory and the fds it inherits."""

    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    pass_fds: tuple[int, ...]
    info_fd: int | None  # read end of bwrap's --info-fd pipe (holds the sandbox init's host pid)


_PROBE = (
    "import json, sys, sysconfig; print(json.dumps({'executable': sys.executable, "
    "'prefix': sys.base_prefix, 'stdlib': sysconfig.get_paths()['stdlib']}))"
)


def _default_python() -> str:
    """The base interpreter behind this process (a venv's python resolves to it): stdlib only, no project code."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidate = Path(sys.base_prefix) / "bin" / version
    return str(candidate) if candidate.exists() else os.path.realpath(sys.executable)


def _reachable_by_others(path: str, *, need_read: bool) -> bool:
    """Whether an unprivileged uid could traverse to `path` (and read it): every ancestor must be o+x."""
    p = Path(path)
    try:
        for parent in p.parents:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
        mode = os.stat(p).st_mode
    except OSError:
        return False
    return bool(mode & stat.S_IXOTH) and (not need_read or bool(mode & stat.S_IROTH))


@functools.lru_cache(maxsize=16)
def _interpreter(python: str | None) -> _Interpreter:
    """Resolve and probe an interpreter once: its real path, prefix and stdlib folder (what the sandbox binds)."""
    executable = os.path.realpath(python or _default_python())
    proc = subprocess.run(
        [executable, "-I", "-S", "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cannot run the sandbox interpreter {executable!r}: {proc.stderr.strip()[-500:]}")
    info = json.loads(proc.stdout)
    prefix = os.path.realpath(info["prefix"])
    stdlib = os.path.realpath(info["stdlib"])
    readable = _reachable_by_others(executable, need_read=False) and _reachable_by_others(stdlib, need_read=True)
    return _Interpreter(executable=executable, prefix=prefix, stdlib=stdlib, world_readable=readable)


def _bwrap() -> str | None:
    """Path of the bubblewrap binary, looked up in the system directories only."""
    return shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin:/usr/sbin")


def _is_under(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _bwrap_argv(interp: _Interpreter, tmp_mb: int, as_root: bool, info_fd: int) -> list[str]:
    """The bwrap command line: namespaces, read-only binds of only what the interpreter needs, a private /tmp."""
    argv = [_bwrap() or "bwrap"]
    if as_root:
        # No user namespace: inside one, our uid would still be kuid 0, which RLIMIT_NPROC exempts. The harness
        # switches to a fresh unprivileged uid instead, the only reason it keeps CAP_SETUID / CAP_SETGID.
        argv += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-all", "--unshare-user", "--disable-userns"]
    argv += ["--die-with-parent", "--new-session", "--hostname", "sandbox", "--info-fd", str(info_fd)]
    argv += ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = f"/{name}"
        if os.path.islink(host):
            argv += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            argv += ["--ro-bind", host, host]
    for name in ("/etc/ld.so.cache", "/etc/localtime"):
        argv += ["--ro-bind-try", name, name]
    bound = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
    made: set[str] = set()
    for folder in (interp.prefix, interp.stdlib, os.path.dirname(interp.executable)):
        if _is_under(folder, bound):
            continue
        # bwrap copies the modes of the host's parent folders (0700 for /root); open them up so the unprivileged
        # uid can reach the bind. Only these empty placeholder folders exist inside, never the host's contents.
        for parent in reversed(Path(folder).parents):
            if str(parent) != "/" and str(parent) not in made and not _is_under(str(parent), bound):
                argv += ["--perms", "0755", "--dir", str(parent)]
                made.add(str(parent))
        argv += ["--ro-bind", folder, folder]
        bound.append(folder)
    argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
    argv += ["--perms", "1777", "--size", str(tmp_mb << 20), "--tmpfs", "/tmp", "--remount-ro", "/"]
    argv += ["--chdir", "/tmp", "--clearenv"]
    for key, value in (("PATH", "/usr/bin:/bin"), ("HOME", "/tmp"), ("TMPDIR", "/tmp"), ("LANG", "C.UTF-8")):
        argv += ["--setenv", key, value]
    return argv


def _remove_tree(path: str) -> None:
    """Delete the fallback's scratch folder, even where the program made parts of it unreadable to their owner."""
    shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(path):
        try:
            os.chmod(path, 0o700)
            for root, dirs, _ in os.walk(path):  # top-down: each folder is opened up before the walk enters it
                for name in dirs:
                    if not os.path.islink(os.path.join(root, name)):
                        os.chmod(os.path.join(root, name), 0o700)
        except OSError:
            pass
        shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(path):
        logger.warning(f"Code sandbox: could not fully remove {path}")


def _count_processes(uid: int, *, live_only: bool = False) -> int:
    """Processes currently owned by `uid` (RLIMIT_NPROC counts them all); `live_only` leaves zombies out."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            if live_only:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    if f.read().rpartition(b")")[2].split()[0] == b"Z":
                        continue
        except (OSError, IndexError):
            continue
        count += 1
    return count


def _kill_uid(uid: int, python: str, timeout_s: float = 2.0) -> None:
    """Kill every process of a sandbox-only uid (kill(-1) from that uid), then wait until none is left."""
    subprocess.run(
        [python, "-I", "-S", "-c", "import os, signal; os.kill(-1, signal.SIGKILL)"],
        user=uid,
        group=uid,
        extra_groups=[],
        env={},
        cwd="/",
        capture_output=True,
        timeout=10,
    )
    deadline = time.monotonic() + timeout_s
    while _count_processes(uid, live_only=True) and time.monotonic() < deadline:
        time.sleep(0.01)


class _Sink:
    """A byte buffer that keeps the first `cap` bytes and counts the rest (bounded host memory)."""

    def __init__(self, cap: int) -> None:
        self.cap, self.data, self.dropped = cap, bytearray(), 0

    def feed(self, chunk: bytes) -> None:
        room = max(0, self.cap - len(self.data))
        self.data += chunk[:room]
        self.dropped += max(0, len(chunk) - room)

    def text(self) -> str:
        out = self.data.decode("utf-8", "replace")
        if self.dropped:
            out += f"\n[... output truncated: {self.dropped} more bytes not shown ...]\n"
        return out


@dataclass
class _Records:
    """Verdict records read from the private result pipe, filtered by nonce and by the harness's own pid."""

    nonce: bytes
    pending: bytes = b""
    main_pid: int | None = None
    kinds: set[str] = field(default_factory=set)
    passed: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    memory: set[int] = field(default_factory=set)

    def feed(self, chunk: bytes) -> None:
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        for line in lines:
            parts = line.split(b" ")
            if len(parts) != 4 or parts[0] != self.nonce:
                continue
            try:
                pid, kind, index = int(parts[1]), parts[2].decode("ascii"), int(parts[3])
            except ValueError:
                continue
            if self.main_pid is None and kind == "S":
                self.main_pid = pid
            if pid != self.main_pid:
                continue  # a forked child of the program: its claims do not count
            self.kinds.add(kind)
            {"P": self.passed, "F": self.failed, "M": self.memory}.get(kind, set()).add(index)


class _InitWatch:
    """Follows bwrap's --info-fd JSON (written in pieces) to the host pid of the sandbox's init, held as a pidfd."""

    def __init__(self) -> None:
        self.buffer, self.pidfd, self.closed = b"", None, False

    def feed(self, fd: int) -> None:
        """Read what is there (non-blocking); open the pidfd once the whole `"child-pid": N` has arrived."""
        while self.pidfd is None and not self.closed:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # BlockingIOError: nothing more yet
                return
            self.closed = not chunk
            self.buffer += chunk
            tail = self.buffer.partition(b'"child-pid":')[2].lstrip()
            n = len(tail) - len(tail.lstrip(b"0123456789"))
            if n and (n < len(tail) or self.closed):  # the number is complete
                try:
                    self.pidfd = os.pidfd_open(int(tail[:n]))
                except (AttributeError, OSError):  # already gone (nothing to wait for) or no pidfd support
                    self.closed = True


def _wait_pidfd(pidfd: int | None, timeout_s: float) -> None:
    """Wait until the process behind a pidfd has exited (a PID namespace's init exits after all its members)."""
    if pidfd is None:
        return
    with selectors.DefaultSelector() as sel:
        sel.register(pidfd, selectors.EVENT_READ)
        sel.select(timeout_s)


def _signal_of(returncode: int, isolation: str) -> int | None:
    """The signal that ended the program: negative return codes, or 128+N as bwrap reports a child's signal."""
    if returncode < 0:
        return -returncode
    if isolation == "bwrap" and 128 < returncode < 128 + signal.NSIG:
        return returncode - 128
    return None


def _classify(
    records: _Records, n_tests: int, timed_out: bool, sig: int | None, stderr: str
) -> tuple[str, list[int], list[int]]:
    """Status plus passed / failed test indices, from the harness's records and how the process ended."""
    done, completed = "D" in records.kinds, "C" in records.kinds
    if completed:
        bad = records.failed | records.memory
        passed = sorted(i for i in records.passed if i not in bad and 0 <= i < n_tests)
        failed = sorted(set(range(n_tests)) - set(passed))
    else:
        passed, failed = [], []
    if timed_out or sig == signal.SIGXCPU:
        status = "timeout"
    elif "M" in records.kinds or (sig is not None and any(hint in stderr for hint in _SIGNAL_MEMORY_HINTS)):
        status = "memory"
    elif done:
        status = "passed" if not failed else "failed"
    elif "E" in records.kinds:
        status = "error"
    elif sig is not None:
        status = "killed"
    elif completed:
        status = "failed"  # the process ended in the middle of the tests (e.g. os._exit from a test)
    else:
        status = "error"
    return status, passed, failed


def _limits(timeout_s: float, memory_mb: int, max_processes: int, max_file_mb: int, nproc: int) -> list:
    """The rlimits the harness applies before the program's first line: (name, soft, hard) triples."""
    cpu = math.ceil(timeout_s) + 1  # the wall clock (host) normally fires first; CPU catches busy threads early
    return [
        ["RLIMIT_CPU", cpu, cpu + 1],
        ["RLIMIT_AS", memory_mb << 20, memory_mb << 20],
        ["RLIMIT_NPROC", nproc, nproc],
        ["RLIMIT_FSIZE", max_file_mb << 20, max_file_mb << 20],
        ["RLIMIT_CORE", 0, 0],
    ]


_warned: set[str] = set()
_warn_lock = threading.Lock()


def _warn_once(message: str) -> None:
    with _warn_lock:
        if message not in _warned:
            _warned.add(message)
            logger.warning(message)


_check_lock = threading.Lock()
_CHECK_LIMITS = dict(timeout_s=20.0, memory_mb=256, max_output_bytes=4096, max_processes=16, max_file_mb=1)


@functools.lru_cache(maxsize=16)
def _bwrap_problem(python: str | None) -> str | None:
    """Why bubblewrap cannot contain programs here (None when it can): runs a trivial program through it once."""
    if _bwrap() is None:
        return "bubblewrap (bwrap) is not installed; `make system-deps` or `apt-get install bubblewrap` adds it"
    try:
        result = _execute("import os", ["assert os.getcwd() == '/tmp'"], mode="bwrap", python=python, **_CHECK_LIMITS)
    except OSError as exc:
        return f"bubblewrap failed to start: {exc}"
    if not result.passed:
        return f"bubblewrap failed its self-check ({result.status}): {result.stderr.strip()[-300:]}"
    return None


def isolation_available(python: str | None = None) -> bool:
    """Whether bubblewrap passes its self-check on this machine (with this interpreter)."""
    with _check_lock:
        return _bwrap_problem(python) is None


def _select_mode(isolation: str, require_isolation: bool, python: str | None) -> str:
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"isolation={isolation!r}: use one of {ISOLATION_MODES}")
    if isolation == "rlimits":
        if require_isolation:
            raise ValueError("isolation='rlimits' contradicts require_isolation=True")
        return "rlimits"
    with _check_lock:
        problem = _bwrap_problem(python)
    if problem is None:
        return "bwrap"
    if require_isolation or isolation == "bwrap":
        raise SandboxUnavailableError(f"full isolation was required but {problem}")
    _warn_once(
        f"Code sandbox: {problem}. Falling back to rlimits + a fresh process group + a scrubbed environment: the "
        "program can read what this user can, reach the network, and detached children may survive. Pass "
        "require_isolation=True to refuse instead."
    )
    return "rlimits"


def run_code(
    code: str,
    tests: str | Sequence[str] | None = None,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 256,
    max_output_bytes: int = 64_000,
    max_processes: int = 16,
    max_file_mb: int = 16,
    python: str | None = None,
    isolation: str = "auto",
    require_isolation: bool = False,
) -> ExecutionResult:
    """Run `code` as a program in a fresh sandboxed process, then each test in its namespace; report verdicts.

    `isolation`: "auto" (bubblewrap when it passes its self-check, else the rlimits fallback with a warning),
    "bwrap" (raise `SandboxUnavailableError` instead of falling back, like `require_isolation=True`) or "rlimits".
    Tests run one after another in a snapshot of the program's globals taken when it finished, with genuine
    builtins (names the program defined that shadow a builtin are left out), so a program cannot rig them.
    `timeout_s` is the program's wall-clock limit (sandbox start-up not included); `memory_mb` its address space;
    `max_processes` counts the program itself; `max_file_mb` caps each file written (bwrap's private /tmp holds
    4 x `max_file_mb` in all; the fallback's scratch folder on disk has no total cap). `tests` is a list of test
    sources; one string is taken as one test (it may span several lines).
    """
    tests = _as_tests(tests)
    if not isinstance(code, str):
        raise TypeError(f"code must be str, got {type(code).__name__}")
    if timeout_s <= 0 or memory_mb <= 0 or max_output_bytes < 0 or max_processes < 1 or max_file_mb < 1:
        raise ValueError("timeout_s, memory_mb, max_processes and max_file_mb must be positive")
    mode = _select_mode(isolation, require_isolation, python)
    return _execute(
        code,
        tests,
        mode=mode,
        python=python,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        max_output_bytes=max_output_bytes,
        max_processes=max_processes,
        max_file_mb=max_file_mb,
    )


def _as_tests(tests: str | Sequence[str] | None) -> list[str]:
    """`run_code`'s tests as a list: one string is one test, never a sequence of one-character tests."""
    if tests is None:
        return []
    if isinstance(tests, str):
        return [tests]
    if isinstance(tests, bytes | bytearray) or not isinstance(tests, Sequence):
        raise TypeError(f"tests must be a str (one test) or a list of str, got {type(tests).__name__}")
    tests = list(tests)
    bad = [i for i, t in enumerate(tests) if not isinstance(t, str)]
    if bad:
        raise TypeError(
            f"tests[{bad[0]}] is a {type(tests[bad[0]]).__name__}; every test must be a str of Python source"
        )
    return tests


def run_many(
    programs: Sequence[tuple[str, list[str] | None]], *, max_workers: int | None = None, **limits
) -> list[ExecutionResult]:
    """Run many (code, tests) pairs concurrently with `run_code` (threads waiting on processes); results in order.

    `limits` are `run_code`'s keyword arguments; `max_workers` defaults to the CPU count.
    """
    if not programs:
        return []
    # Fail fast (and warn once) on the calling thread rather than in every worker.
    _select_mode(limits.get("isolation", "auto"), limits.get("require_isolation", False), limits.get("python"))
    workers = max_workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=min(workers, len(programs))) as pool:
        return list(pool.map(lambda p: run_code(p[0], p[1], **limits), programs))


def _execute(
    code: str,
    tests: list[str],
    *,
    mode: str,
    python: str | None,
    timeout_s: float,
    memory_mb: int,
    max_output_bytes: int,
    max_processes: int,
    max_file_mb: int,
) -> ExecutionResult:
    """Launch one sandboxed child in `mode`, feed it the job, collect output and records, clean everything up."""
    interp = _interpreter(python)
    as_root = os.geteuid() == 0
    drop_uid = None
    if as_root and (mode == "bwrap" or interp.world_readable):
        drop_uid = SANDBOX_UID_RANGE[0] + secrets.randbelow(SANDBOX_UID_RANGE[1] - SANDBOX_UID_RANGE[0])
    elif as_root:
        _warn_once(
            f"Code sandbox (rlimits fallback): {interp.executable} is not readable by other users, so programs "
            "run as root: RLIMIT_NPROC does not apply to root and nothing stops a program from harming this host."
        )
    nproc = max_processes
    if mode == "rlimits" and drop_uid is None and not as_root:
        nproc += _count_processes(os.getuid())  # RLIMIT_NPROC counts every process of the caller's uid
    nonce = secrets.token_hex(16)
    result_r, result_w = os.pipe()
    owned = [result_r, result_w]  # fds still ours to close; _supervise hands the child's ends over
    info_r = None
    tmpdir = None
    try:
        if mode == "bwrap":
            info_r, info_w = os.pipe()
            owned += [info_r, info_w]
            os.set_blocking(info_r, False)
            argv = _bwrap_argv(interp, 4 * max_file_mb, as_root, info_w)
            launch = _Launch(argv, {"PATH": "/usr/bin:/bin"}, None, (result_w, info_w), info_r)
        else:
            tmpdir = tempfile.mkdtemp(prefix="agent_forge_sandbox_")
            if drop_uid is not None:
                os.chown(tmpdir, drop_uid, drop_uid)
            env = {"PATH": "/usr/bin:/bin", "HOME": tmpdir, "TMPDIR": tmpdir, "LANG": "C.UTF-8"}
            launch = _Launch([], env, tmpdir, (result_w,), None)
        job = {
            "code": code,
            "tests": tests,
            "nonce": nonce,
            "fd": result_w,
            "uid": drop_uid,
            "limits": _limits(timeout_s, memory_mb, max_processes, max_file_mb, nproc),
            "prctl": mode == "rlimits",
            "ppid": os.getpid(),
        }
        argv = launch.argv + [interp.executable, "-I", "-S", "-B", "-c", _HARNESS]
        return _supervise(
            argv, launch, job, mode, interp, drop_uid, timeout_s, max_output_bytes, result_r, tests, owned
        )
    finally:
        for fd in owned:
            os.close(fd)
        if tmpdir is not None:
            _remove_tree(tmpdir)


def _supervise(
    argv: list[str],
    launch: _Launch,
    job: dict,
    mode: str,
    interp: _Interpreter,
    drop_uid: int | None,
    timeout_s: float,
    max_output_bytes: int,
    result_r: int,
    tests: list[str],
    owned: list[int],
) -> ExecutionResult:
    """Start the child, pump stdin/stdout/stderr/records until it ends or the clock runs out, then kill and judge."""
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=launch.env,
        cwd=launch.cwd,
        pass_fds=launch.pass_fds,
        start_new_session=True,
        close_fds=True,
    )
    for fd in launch.pass_fds:
        os.close(fd)  # the child has them; our copies would keep the pipes open forever
        owned.remove(fd)
    out, err, records = _Sink(max_output_bytes), _Sink(max_output_bytes), _Records(job["nonce"].encode())
    record_bytes = _Sink(MAX_RECORD_BYTES)
    payload = memoryview(marshal.dumps(job, 4))  # format 4: readable by every Python 3.4+
    sel = selectors.DefaultSelector()
    pidfd = None
    init = _InitWatch()
    timed_out = False
    try:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            os.set_blocking(stream.fileno(), False)
        os.set_blocking(result_r, False)
        sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE, "stdin")
        sel.register(proc.stdout.fileno(), selectors.EVENT_READ, out)
        sel.register(proc.stderr.fileno(), selectors.EVENT_READ, err)
        sel.register(result_r, selectors.EVENT_READ, "records")
        if launch.info_fd is not None:
            sel.register(launch.info_fd, selectors.EVENT_READ, "info")
        try:
            pidfd = os.pidfd_open(proc.pid)
            sel.register(pidfd, selectors.EVENT_READ, "exit")
        except (AttributeError, OSError):
            pidfd = None
        deadline = start + timeout_s + STARTUP_GRACE_S
        exited_at = None
        while True:
            now = time.monotonic()
            if exited_at is None and pidfd is None and proc.poll() is not None:
                exited_at = now
            readers = [k for k in sel.get_map().values() if k.data not in ("exit", "stdin", "info")]
            if exited_at is not None and (not readers or now - exited_at > DRAIN_GRACE_S):
                break
            if now >= deadline:
                timed_out = True
                break
            wait = deadline - now
            if exited_at is not None:
                wait = min(wait, exited_at + DRAIN_GRACE_S - now)
            if pidfd is None:
                wait = min(wait, 0.02)
            for key, _ in sel.select(max(0.0, wait)):
                if key.data == "exit":
                    exited_at = time.monotonic()
                    sel.unregister(key.fd)
                elif key.data == "stdin":
                    try:
                        sent = os.write(key.fd, payload[:65536])
                        payload = payload[sent:]
                    except (BrokenPipeError, OSError):
                        payload = payload[:0]
                    if not payload:
                        sel.unregister(key.fd)
                        proc.stdin.close()
                elif key.data == "info":
                    init.feed(key.fd)
                    if init.pidfd is not None or init.closed:
                        sel.unregister(key.fd)
                else:
                    try:
                        chunk = os.read(key.fd, 65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        chunk = b""
                    if not chunk:
                        sel.unregister(key.fd)
                    elif key.data == "records":
                        if len(record_bytes.data) < MAX_RECORD_BYTES:
                            record_bytes.feed(chunk)
                            was_started = records.main_pid is not None
                            records.feed(chunk)
                            if not was_started and records.main_pid is not None:
                                deadline = time.monotonic() + timeout_s  # the program's own clock starts now
                    else:
                        key.data.feed(chunk)
    finally:
        sel.close()
        if launch.info_fd is not None:
            init.feed(launch.info_fd)  # the run may have ended before all of bwrap's info was read
        init_pidfd = init.pidfd
        _terminate(proc, mode, interp, drop_uid, init_pidfd)
        for fd in (pidfd, init_pidfd):
            if fd is not None:
                os.close(fd)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                stream.close()
            except OSError:
                pass
    duration = time.monotonic() - start
    stderr = err.text()
    sig = None if timed_out else _signal_of(proc.returncode, mode)
    status, passed, failed = _classify(records, len(tests), timed_out, sig, stderr)
    returncode = None if timed_out else (-sig if sig is not None else proc.returncode)
    return ExecutionResult(
        status=status,
        stdout=out.text(),
        stderr=stderr,
        duration_s=duration,
        tests_passed=passed,
        tests_failed=failed,
        failed_test=tests[failed[0]] if failed else None,
        returncode=returncode,
        isolation=mode,
    )


def _terminate(
    proc: subprocess.Popen, mode: str, interp: _Interpreter, drop_uid: int | None, init_pidfd: int | None
) -> None:
    """Kill everything the run started: the process group, then (bwrap) wait for the PID namespace to empty or
    (fallback under a sandbox-only uid) kill every process of that uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # before reaping: a zombie leader keeps the group id from reuse
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if mode == "bwrap":
        # bwrap's outer process exits as soon as the program does, while the namespace's init may still be killing
        # the rest (or dies now of --die-with-parent); once the init has exited, no process of the run is left.
        _wait_pidfd(init_pidfd, 5.0)
        if init_pidfd is not None:
            # That init was orphaned when bwrap exited first; if it came to us (we are PID 1 in a container, or a
            # subreaper), reap it by pidfd, which cannot hit a recycled pid. Otherwise the system's init does.
            try:
                os.waitid(os.P_PIDFD, init_pidfd, os.WEXITED | os.WNOHANG)
            except (AttributeError, OSError):
                pass
    elif drop_uid is not None:
        _kill_uid(drop_uid, interp.executable)
