"""Untrusted programs (docs/sandbox.md): the program runs in a sandboxed child, its tests in a trusted process that
alone decides the verdict, and only plain data crosses the one channel between them.

    run_program(program, tests)  # Run(passed, timed_out, output); e.g. "def f(x): ..." against "assert f(3) == 6"

A run is one `python -I -S -B -u -c <PROCESS>` process (unbuffered: what it prints survives its kill): sandbox_main
isolates it (isolate), forks the program's child (program_side) and runs the tests itself (test_side), and alone
writes the verdict, on a pipe only it holds.
"""

import builtins
import ctypes
import dataclasses
import functools
import inspect
import marshal
import math
import os
import re
import resource
import secrets
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile

OUTPUT_BYTES = 4096  # of a program's output kept in Run.output; the file-size limit caps what it may write
SANDBOX_START_S = 10.0  # allowed beyond a program's wall-clock limit for the sandbox's own start and clean-up


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one sandboxed program may use; past a limit it is stopped (or its call fails) and scores 0."""
    wall_s: float = 5.0    # seconds from its start to its last test; then it is killed, and all it started
    cpu_s: float = 5.0     # CPU seconds of each of its processes (RLIMIT_CPU, whole seconds)
    memory_mb: int = 1024  # address space of each of its processes (RLIMIT_AS)
    file_mb: int = 16      # the largest file it may write, its output included (RLIMIT_FSIZE); its /tmp holds 4x
    open_files: int = 64   # open file descriptors of each of its processes (RLIMIT_NOFILE)
    processes: int = 16    # processes and threads of its user at once (RLIMIT_NPROC)

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if not value > 0:
                raise ValueError(f"sandbox limit {name}={value} must be above 0; no program can run within it")


@dataclasses.dataclass
class Run:
    passed: bool     # the trusted process ran every test and each passed: nothing else is a pass
    timed_out: bool  # stopped at the wall-clock or CPU limit
    output: str      # what the program and the tests printed (tracebacks included), cut to OUTPUT_BYTES: a log


def run_program(program: str, tests: str, setup: str = "", entry_point: str | None = None,
                limits: Limits = Limits(), secret_files: tuple[str, ...] = ()) -> Run:
    """Setup and program in the sandboxed child, setup and tests in the trusted process; pass: this run's token.
    secret_files (the task's own data: its tests, solutions) read as empty in the sandbox's mount namespace."""
    token = secrets.token_hex(16)
    verdict, verdict_w = os.pipe()
    with (tempfile.TemporaryDirectory(prefix="fanout-sandbox-", ignore_cleanup_errors=True) as folder,
          tempfile.TemporaryFile() as out, os.fdopen(verdict, "rb") as verdict_file):
        orders = {"folder": folder, "limits": {**dataclasses.asdict(limits), "cpu_s": math.ceil(limits.cpu_s)},
                  "setup": setup, "program": program, "entry_point": entry_point, "verdict": verdict_w,
                  "secret_files": [os.path.realpath(f) for f in secret_files],
                  "path": sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}),
                  "python": sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)})}
        try:  # a file, not a pipe, for the output: the file-size limit caps it
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-u", "-c", PROCESS], stdin=subprocess.PIPE,
                                    stdout=out, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True,
                                    pass_fds=(verdict_w,), env={"PATH": "/usr/bin:/bin", "HOME": folder,
                                                                "TMPDIR": folder, "LANG": "C.UTF-8",  # BLAS: 1 thread
                                                                "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
        finally:
            os.close(verdict_w)
        try:  # the tests wait in the pipe until the child has let go of it
            proc.communicate(frame(orders) + frame({"tests": tests, "token": token}),
                             timeout=limits.wall_s + SANDBOX_START_S)
        except subprocess.TimeoutExpired:  # the sandbox itself stalled (a starved machine): end its group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        passed = verdict_file.read() == token.encode()
        out.seek(0)
        output = out.read(OUTPUT_BYTES)  # at most the file-size limit was written
    return Run(passed, proc.returncode in (124, -9), output.decode(errors="replace"))


@functools.cache
def check_sandbox() -> dict:
    """What a program in the sandbox gets here: its user, the network, its own PIDs, a private /tmp, and the
    mode: "root" (its own user), "user namespaces" or "weak" (neither: it runs as you). Raises if Python cannot run."""
    marker = f"fanout-probe-{secrets.token_hex(8)}"
    with socket.create_server(("127.0.0.1", 0)) as server:
        run = run_program(f"import os, socket\nopen('/tmp/{marker}', 'w').close()\n"
                          "print(os.getuid(), os.getpid(), flush=True)\n"
                          f"socket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=2)\n", "")
    if not (seen := re.match(r"(\d+) (\d+)\n", run.output)):
        raise ValueError(f"the code sandbox cannot run a program on this machine: {run.output.strip()[-300:]!r}; "
                         "see docs/sandbox.md")
    private_tmp = not os.path.exists(f"/tmp/{marker}")
    if not private_tmp:
        os.remove(f"/tmp/{marker}")
    own_pids = seen[2] == "1"
    isolated = own_pids and private_tmp and not run.passed
    return {"mode": "root" if os.geteuid() == 0 else "user namespaces" if isolated else "weak", "user": int(seen[1]),
            "network": run.passed, "own_pids": own_pids, "private_tmp": private_tmp}


def frame(value) -> bytes:
    """A value as the channel carries it: ten digits of length, then marshal's bytes (plain data stays plain)."""
    data = marshal.dumps(value)
    return b"%010d" % len(data) + data


# ---- the sandbox's process: the source of these is its whole program (PROCESS), the standard library alone ----

class Failed(BaseException):
    """Out of time, or not plain data over the channel: a BaseException, which no test's `except Exception` takes."""


def read_frame(fd: int, limit: int = 1 << 26):
    """One framed value from `fd`, at most `limit` bytes; what follows stays in the pipe until asked for."""
    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            if not (chunk := os.read(fd, size - len(data))):
                raise EOFError("the channel closed")
            data += chunk
        return data
    size = exactly(10)
    if not size.isdigit() or int(size) > limit:
        raise ValueError(f"a frame of {size!r} bytes")
    return marshal.loads(exactly(int(size)))


def write_frame(fd: int, value) -> None:
    data = frame(value)
    while data:
        data = data[os.write(fd, data):]


def plain(value, depth: int = 0):
    """`value` if it is plain data all the way down, by exact type (no subclass with an odd __eq__); else Failed."""
    kind = type(value)
    if kind not in (type(None), bool, int, float, complex, str, bytes, tuple, list, dict, set, frozenset) \
            or depth > 100:
        raise Failed(f"a {kind.__name__} crossed the channel, where only plain data may")
    for part in (*value, *value.values()) if kind is dict else value if kind in (tuple, list, set, frozenset) else ():
        plain(part, depth + 1)
    return value


def mount(libc, source: str, target: str, kind: str, flags: int, options: str = "") -> None:  # best effort
    libc.mount(source.encode(), target.encode(), kind.encode(), flags, options.encode())


def sandbox_main() -> None:
    """Orders, isolation, the child, the tests, the verdict; exits 124 when the program ran out of time."""
    libc = ctypes.CDLL(None, use_errno=True)
    orders = read_frame(0)
    root = os.geteuid() == 0
    spaces = isolate(orders, libc, root)
    uid = 1_000_000_000 + os.getpid()  # no account has it: no files, no other processes, its own process count
    if root:
        os.chown(orders["folder"], uid, uid)
    (requests, ask), (answers, reply) = os.pipe(), os.pipe()
    child = os.fork()
    if child == 0:
        program_side(orders, spaces, uid, requests, reply, libc)
    os.close(requests)
    os.close(reply)
    passed, timed_out, token = test_side(orders, ask, answers)
    os.kill(child, signal.SIGSTOP)  # the program stopped (a child not waited for yet: this never fails)
    with contextlib.suppress(OSError):  # back in its own group: a PID namespace's init left in another's never ends
        os.setpgid(child, child)
    with contextlib.suppress(OSError):  # the program, with whatever it started in its group (in a PID namespace: all)
        os.killpg(child, signal.SIGKILL)
    os.kill(child, signal.SIGKILL)  # and itself, should setpgid have failed (it does once the program has exec'd)
    _, status, usage = os.wait4(child, 0)  # with a PID namespace, its last process is gone when this returns
    out_of_cpu = os.WIFSIGNALED(status) and usage.ru_utime + usage.ru_stime >= orders["limits"]["cpu_s"]
    if root and "pid" not in spaces:  # no PID namespace: end every process of its user, wherever it went
        killer = os.fork()
        if killer == 0:
            try:
                os.setuid(uid)
                for _ in range(3):  # kill(-1): every process this user may signal, all but the caller
                    os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(killer, 0)
    if passed and not out_of_cpu:
        os.write(orders["verdict"], token.encode())
    os._exit(124 if timed_out or out_of_cpu else 0)


def isolate(orders: dict, libc, root: bool) -> set:
    """New mount, network, PID and IPC namespaces where the OS gives them; the machine read-only, /tmp empty."""
    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18  # MS_*
    flags = {"mount": 0x20000, "network": 0x40000000, "pid": 0x20000000, "ipc": 0x8000000}
    spaces = set()  # none where the OS gives none
    if root:
        spaces = {name for name, flag in flags.items() if libc.unshare(flag) == 0}
    elif libc.unshare(0x10000000 | sum(flags.values())) == 0:  # an ordinary user: all four, in a user namespace
        for name, line in (("setgroups", "deny"), ("uid_map", f"{os.getuid()} {os.getuid()} 1"),
                           ("gid_map", f"{os.getgid()} {os.getgid()} 1")):  # the same user and group inside
            with open(f"/proc/self/{name}", "w") as file:
                file.write(line)
        spaces = set(flags)
    size = f"size={4 * orders['limits']['file_mb']}m"
    if "mount" in spaces:
        mount(libc, "none", "/", "", REC | PRIVATE)  # nothing mounted below leaks out of this namespace
        with open("/proc/self/mountinfo") as mounts:  # every mount read-only, folders anyone may write included
            for fields in [line.split() for line in mounts]:
                kept = sum(bit for name, bit in (("nosuid", NOSUID), ("nodev", NODEV), ("noexec", NOEXEC))
                           if name in fields[5].split(","))
                mount(libc, "none", fields[4], "", REMOUNT | BIND | RDONLY | kept)
        # The interpreter must stay readable by the new user: a folder on its way that others may not enter
        # (pyenv's or uv's Python under /root) is covered by an empty tmpfs holding the interpreter's alone.
        hidden = {}
        for path in orders["python"]:
            parts = path.split("/")
            closed = next((p for p in ("/".join(parts[:i]) for i in range(2, len(parts)))
                           if not os.stat(p).st_mode & 0o001), None)
            if closed:
                hidden[path] = (closed, os.open(path, os.O_PATH))
        for closed in {closed for closed, _ in hidden.values()}:
            mount(libc, "tmpfs", closed, "tmpfs", NOSUID | NODEV, "mode=755,size=1m")
        for path, (_, fd) in hidden.items():
            os.makedirs(path, exist_ok=True)
            mount(libc, f"/proc/self/fd/{fd}", path, "", BIND | REC)
        for shared in ("/tmp", "/var/tmp", "/dev/shm"):  # writable by anyone: this sandbox gets empty ones
            if os.path.isdir(shared):
                mount(libc, "tmpfs", shared, "tmpfs", NOSUID | NODEV, f"mode=1777,{size}")
        for path in orders["secret_files"]:  # /dev/null bound over each: it reads as empty
            mount(libc, "/dev/null", path, "", BIND)
    os.makedirs(orders["folder"], mode=0o700, exist_ok=True)
    if "mount" in spaces:  # its own writable folder, in memory and bounded, wherever the worker's TMPDIR is
        mount(libc, "tmpfs", orders["folder"], "tmpfs", NOSUID | NODEV, f"mode=700,{size}")
    return spaces


def program_side(orders: dict, spaces: set, uid: int, requests: int, reply: int, libc) -> None:
    """The child: holding only its ends of the channel, it runs setup and program, then serves each call."""
    try:
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: it dies with the parent, whoever kills that
        os.setpgid(0, 0)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # its standard input is empty; the tests' pipe is let go
        low, high = sorted((requests, reply))
        for start, stop in ((3, low), (low + 1, high), (high + 1, 1 << 16)):
            os.closerange(start, stop)
        if {"mount", "pid"} <= spaces:  # a /proc that shows this sandbox's processes alone (it is their pid 1)
            mount(libc, "proc", "/proc", "proc", 2 | 4 | 8)  # MS_NOSUID | MS_NODEV | MS_NOEXEC
        limits = orders["limits"]
        for which, value in ((resource.RLIMIT_CPU, limits["cpu_s"]), (resource.RLIMIT_CORE, 0),
                             (resource.RLIMIT_AS, limits["memory_mb"] << 20),
                             (resource.RLIMIT_FSIZE, limits["file_mb"] << 20),
                             (resource.RLIMIT_NOFILE, limits["open_files"]),
                             (resource.RLIMIT_NPROC, limits["processes"])):
            resource.setrlimit(which, (value, value + (which == resource.RLIMIT_CPU)))  # CPU: SIGXCPU, then KILL
        if os.geteuid() == 0:  # RLIMIT_NPROC does not bind root, nor do file permissions
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        elif spaces:  # a user namespace gave it every capability there (remounting the machine writable, say)
            libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
            if libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()) != 0:  # none, of any set
                raise OSError(ctypes.get_errno(), "capset: the program would keep its capabilities")
        os.chdir(orders["folder"])
        sys.path += orders["path"]
        namespace = {"__name__": "solution"}
        exec(compile(orders["setup"], "setup", "exec"), namespace)
        exec(compile(orders["program"], "program", "exec"), namespace)
        write_frame(reply, sorted(name for name, value in namespace.items() if callable(value)))
        while True:
            name, args, kwargs = read_frame(requests)
            try:
                answer = ("value", namespace[name](*args, **kwargs))
            except BaseException as e:  # by name, the nearest built-in class, and message: the tests decide
                base = next(c for c in type(e).__mro__ if c.__module__ == "builtins")
                answer = ("raise", type(e).__name__, base.__name__, str(e)[:10000])
            try:
                write_frame(reply, answer)
            except ValueError:  # marshal refused it: not plain data
                write_frame(reply, ("not plain", f"{name} returned a {type(answer[1]).__name__}"))
    except BaseException as e:
        import traceback
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # from the program's frames on
    finally:
        os._exit(1)


def test_side(orders: dict, ask: int, answers: int) -> tuple[bool, bool, str]:
    """The trusted side: (passed, timed out, token). Setup and tests run here, each function the program named (the
    entry point, or not setup's) a proxy across the channel. Passed: every test ran, none failed, no call broke."""
    state = {"timed_out": False, "broken": False}

    def expire(*_):
        state["timed_out"] = True
        raise Failed("out of time")

    def proxy(name: str):
        def call(*args, **kwargs):
            try:
                write_frame(ask, (name, plain(args), plain(kwargs)))
                answer = plain(read_frame(answers))
                if answer[0] == "value" and len(answer) == 2:
                    return answer[1]
                kind = getattr(builtins, answer[2], None) if answer[0] == "raise" and len(answer) == 4 else None
                if not (isinstance(kind, type) and issubclass(kind, Exception) and type(answer[1]) is str
                        and type(answer[3]) is str):
                    raise Failed(f"{name}: {answer!r:.200}")
            except (Failed, Exception) as e:
                state["broken"] = True
                raise Failed(f"the call of {name}: {e}") from None
            raise (kind if answer[1] == kind.__name__ else type(answer[1], (kind,), {}))(answer[3])
        return call

    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, orders["limits"]["wall_s"])
    try:
        try:
            names = plain(read_frame(answers))  # once setup and program have run
        except (EOFError, Failed):  # the program raised (its traceback is printed) or ran out of time
            signal.setitimer(signal.ITIMER_REAL, 0)
            return False, state["timed_out"], ""
        order = read_frame(0)  # the tests and the token, read only now: the child has let go of this pipe
        namespace, entry = {"__name__": "tests"}, orders["entry_point"]
        exec(compile(orders["setup"], "setup", "exec"), namespace)
        namespace.update({name: proxy(name) for name in names if type(name) is str and (name == entry or (
            name not in namespace and not hasattr(builtins, name)))})  # a program's `sorted` is never the tests'
        exec(compile(order["tests"], "tests", "exec"), namespace)
        if entry:
            namespace["check"](namespace[entry])
        signal.setitimer(signal.ITIMER_REAL, 0)
        return not state["broken"] and not state["timed_out"], state["timed_out"], order["token"]
    except BaseException:
        signal.setitimer(signal.ITIMER_REAL, 0)
        import traceback
        traceback.print_exc()
        return False, state["timed_out"], ""


PROCESS = "import builtins, contextlib, ctypes, marshal, os, resource, signal, sys\n" + "\n".join(
    inspect.getsource(f) for f in (frame, Failed, read_frame, write_frame, plain, mount, sandbox_main, isolate,
                                   program_side, test_side)) + "\nsandbox_main()\n"
