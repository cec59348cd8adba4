"""Code tasks and the sandbox (reward.py): HumanEval's own solutions, JSONL code files, bad input, a training
run that logs failures and timeouts, and hostile programs, each scoring 0 (or its honest result) while scoring
goes on and the machine is unharmed."""

import itertools
import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path

import pytest

import reward
import config
import train


ROOT = Path(__file__).parent
TESTS = "assert f(2) == 4\nassert f(3) == 6\n"  # the task of most hostile programs below: f doubles
RIGHT = "def f(x):\n    return 2 * x\n"
QUICK = reward.Limits(wall_s=1.0, cpu_s=1.0)  # for programs that would run forever


def fenced(program: str) -> str:
    return f"Here is the function:\n```python\n{program}```\nIt doubles its argument."


def sandbox_processes() -> list[int]:
    """Processes of any sandbox user (uids from 1e9) still alive, zombies left out."""
    alive = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:  # gone meanwhile
            continue
        if int(fields["Uid"].split()[0]) >= 10**9 and not fields["State"].strip().startswith("Z"):
            alive.append(int(status.parent.name))
    return alive


# ---- programs out of responses, code tasks ----


@pytest.mark.parametrize("text, expected", [
    ("```python\nx = 1\n```", "x = 1\n"),
    ("Sure:\n```\nx = 1\n```\nDone.", "x = 1\n"),
    ("first\n```python\na = 1\n```\nthen\n```py\nb = 2\n```\n", "b = 2\n"),
    ("```python\na = 1\n```\nRun it with:\n```bash\npython a.py\n```\n", "a = 1\n"),  # a shell block is not it
    ("```python\na = 1\n```\nand then, cut off:\n```python\nb = (", "a = 1\n"),
    ("1. the code:\n   ```python\n   x = 1\n   ```\n", "x = 1\n"),  # indented in a list: dedented
    ("def f():\n    return 1\n", None),  # no fence: nothing runs
    ("```python\n\n```", None),
])
def test_extract_program(text, expected):
    assert reward.extract_program(text) == expected


def test_humaneval_canonical_solutions_pass_and_stubs_fail():
    task = reward.load_task("humaneval", size=0, seed=0)
    assert len(task.items) == 164 and len({it["question"] for it in task.items}) == 164
    first = task.items[0]
    assert "one ```python code block" in first["question"] and first["setup"] in first["question"]
    stubs = [(it, fenced(it["setup"] + f"    {body}\n")) for it in task.items[::8] for body in ("pass", "return None")]
    items = task.items + [it for it, _ in stubs]
    start = time.time()
    rewards, failures, timeouts = reward.score(task, items, [fenced(it["solution"]) for it in task.items]
                                               + [stub for _, stub in stubs])
    print(f"{len(items)} HumanEval programs scored in {time.time() - start:.1f} s")
    assert rewards == [1.0] * 164 + [0.0] * len(stubs) and failures == timeouts == 0
    train_task, held = reward.split_task(task, n_eval=16, seed=0)  # whole problems held out, never trained on
    assert len(held.items) == 16 and len(train_task.items) == 148
    assert not {it["task_id"] for it in held.items} & {it["task_id"] for it in train_task.items}


def test_code_jsonl_task(tmp_path):
    rows = [{"question": "Write f(x), twice x.", "tests": TESTS},
            {"question": "Sort a list.", "setup": "from typing import List\n", "entry_point": "sort_list",
             "tests": "def check(candidate):\n    assert candidate([3, 1, 2]) == [1, 2, 3]\n"},
            {"question": "What is 2 + 2?", "answer": "4"}]  # an answer line in a code file: named below
    path = tmp_path / "code.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    task = reward.load_task(str(path), size=0, seed=0)
    twice, sort = task.items
    responses = [fenced(RIGHT), fenced("def f(x):\n    return x + 2\n"),  # right at 2, wrong at 3
                 fenced("def sort_list(xs: List[int]) -> List[int]:\n    return sorted(xs)\n"),
                 fenced("def sort_it(xs):\n    return sorted(xs)\n"),  # the wrong name
                 "def f(x):\n    return 2 * x\n"]  # no fence: not run
    rewards, failures, timeouts = reward.score(task, [twice, twice, sort, sort, twice], responses)
    assert rewards == [1.0, 0.0, 1.0, 0.0, 0.0] and failures == timeouts == 0
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match="line 3 has no 'tests'"):
        reward.load_task(str(path), size=0, seed=0)


@pytest.mark.parametrize("row, message", [
    ({"question": "q", "tests": "assert f(1) == 2\nassert f(2) = 4\n"},
     r"line 2: its 'tests' is not valid Python \(.*, at its line 2\)"),
    ({"question": "q", "tests": "assert True", "setup": "import (\n"}, r"line 2: its 'setup' is not valid Python"),
    ({"question": "q", "tests": "assert candidate(1) == 2", "entry_point": "f"}, "must define check\\(candidate\\)"),
    ({"question": "q", "tests": "assert True", "entry_point": "f()"}, "entry_point 'f\\(\\)' is not a Python name"),
    ({"question": "q", "tests": ["assert True"]}, "its 'tests' is a JSON list, not Python source"),
])
def test_bad_code_line_is_named(tmp_path, row, message):
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps({"question": "q0", "tests": TESTS}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=message):
        reward.load_task(str(path), size=0, seed=0)


def test_sandbox_limits_must_be_positive():
    for field in ("wall_s", "cpu_s", "memory_mb", "file_mb", "open_files", "processes"):
        with pytest.raises(ValueError, match=f"sandbox limit {field}=0 must be above 0"):
            reward.Limits(**{field: 0})
    with pytest.raises(ValueError, match="sandbox limit memory_mb=-5 must be above 0"):
        reward.score(reward.Task("x.jsonl", []), [], [], memory_mb=-5)
    with pytest.raises(ValueError, match="--score-timeout 0 and --sandbox-memory-mb 1024 must be above 0"):
        config.Config(score_timeout=0)


def test_code_task_run_logs_rewards_failures_and_timeouts(tmp_path, monkeypatch):
    """A tiny random model writes no code, so the programs come from a stand-in for extract_program (it runs
    in this process; the sandbox runs them as usual): right, out of time, wrong, in turn."""
    import transformers
    from test_all import save_tiny_model
    import trainer
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps({"question": f"Write f() returning 1 ({i}).", "tests": "assert f() == 1"})
                            + "\n" for i in range(8)))
    programs = itertools.cycle(["def f():\n    return 1\n", "while True:\n    pass\n", "def f():\n    return 2\n"])
    monkeypatch.setattr(reward, "extract_program", lambda text: next(programs))
    tokenizer = transformers.AutoTokenizer.from_pretrained(trainer.resolve_model(config.EMBEDDED_MODEL,
                                                                                "~/.cache/fanout"))
    save_tiny_model(tmp_path / "model", "llama", tokenizer, seed=0)
    train.main(config.Config(model=str(tmp_path / "model"), task=str(path), prompt_template="{question}", steps=1,
                            prompts_per_step=2, rollouts_per_prompt=3, max_new_tokens=4, eval_prompts=1,
                            eval_samples=1, score_timeout=1.0, out_dir=str(tmp_path / "out"), lr=1e-3))
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps, evals = [r for r in rows if "step" in r], [r for r in rows if "eval" in r]
    assert len(steps) == 1 and len(evals) == 2
    for row in steps:  # 6 responses a step, every third out of time, every third right
        assert row["timeouts"] == 2 and row["reward"] == pytest.approx(1 / 3) and row["verifier_failures"] == 0
    assert sum(r["timeouts"] for r in evals) >= 1 and all(r["verifier_failures"] == 0 for r in evals)


# ---- the sandbox ----


def test_sandbox_probe_on_this_machine():
    seen = reward.check_sandbox()
    print(f"sandbox here: {seen}")
    if os.geteuid() == 0:  # as root it always drops to a fresh user
        assert seen["user"] >= 10**9


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
    "sys.exit(0) before the tests": (RIGHT + "import sys\nsys.exit(0)\n", TESTS, QUICK),
    "os._exit(0) before the tests": (RIGHT + "import os\nos._exit(0)\n", TESTS, QUICK),
    "prints PASSED": ("print('PASSED')\nprint('All tests passed.')\ndef f(x):\n    return 0\n", TESTS, QUICK),
    "prints a fake token": ("import secrets\nprint()\nprint(secrets.token_hex(16))\ndef f(x):\n    return 0\n",
                            TESTS, QUICK),
    "overrides a builtin": ("import builtins\nbuiltins.abs = lambda x: 0\ndef f(x):\n    return 0\n",
                            "assert abs(f(2) - 4) < 1e-9\n", QUICK),
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
    run = reward.run_program(program, tests, limits=limits)
    assert not run.passed and time.time() - start < limits.wall_s + 5
    if name != "deep recursion":  # which comes first there, the memory limit or the clock, is the machine's
        assert run.timed_out == (name in ("infinite loop", "fork bomb"))
    assert len(run.output.encode()) <= reward.OUTPUT_BYTES + 100
    assert not sandbox_processes()


@pytest.mark.parametrize("name", HOSTILE_ENTRY)
def test_hostile_program_against_check_scores_zero(name):
    program, tests, right = HOSTILE_ENTRY[name]
    assert reward.run_program(right, tests, SETUP, "f").passed
    run = reward.run_program(program, tests, SETUP, "f")
    assert not run.passed and not run.timed_out


def test_pass_needs_the_tests_to_run():
    """A right program that ends the process early earns nothing: only the token after the tests counts."""
    assert reward.run_program(RIGHT, TESTS).passed
    assert not reward.run_program(RIGHT + "raise SystemExit(0)\n", TESTS).passed
    assert not reward.run_program(RIGHT, TESTS + "import os\nos._exit(0)\n").passed  # tests that never finish


def test_daemon_and_children_are_gone_afterwards():
    marker = f"{time.time() % 1000:.6f}"  # sleep's argument: finds the daemon among all processes
    program = (f"import os, subprocess\nsubprocess.Popen(['sleep', '{marker}1'], start_new_session=True)\n"
               f"if os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sleep', ['sleep', '{marker}2'])\n" + RIGHT)
    run = reward.run_program(program, TESTS)
    assert run.passed, run.output  # its honest result: the function is right
    left = [p for p in Path("/proc").glob("[0-9]*/cmdline") if marker.encode() in p.read_bytes()]
    assert not left and not sandbox_processes()


def test_files_outside_its_folder_are_safe():
    """It may write its own folder (its home) and a private /tmp, nothing else: not the project, not a folder
    anyone may write (with a mount namespace, it sees the machine read-only), not the machine's /tmp."""
    victim = ROOT / f".sandbox-victim-{os.getpid()}"
    victim.mkdir()
    victim.chmod(0o777)  # anyone may write here: only the read-only view protects it
    (victim / "data.txt").write_text("keep")
    (victim / "data.txt").chmod(0o666)
    marker = f"fanout-escape-{os.getpid()}"
    program = ("import os\nopen('mine.txt', 'w').write('ok')\nopen(os.path.expanduser('~/.rc'), 'w').close()\n"
               f"for act in (lambda: open('{ROOT}/escape.txt', 'w'), lambda: os.remove('{ROOT}/README.md'),\n"
               f"            lambda: open('{victim}/data.txt', 'w'), lambda: os.remove('{victim}/data.txt'),\n"
               f"            lambda: open('{victim}/new.txt', 'w'), lambda: open('/tmp/{marker}', 'w')):\n"
               "    try:\n        act()\n        print('done')\n    except OSError as e:\n        print(e)\n")
    before = set(Path(tempfile.gettempdir()).glob("fanout-sandbox-*"))
    try:
        run = reward.run_program(program, "")
        assert run.passed, run.output
        assert not (ROOT / "escape.txt").exists() and (ROOT / "README.md").exists()  # file permissions
        if reward.check_sandbox()["private_tmp"]:  # a mount namespace: the read-only view and a private /tmp
            assert (victim / "data.txt").read_text() == "keep" and os.listdir(victim) == ["data.txt"]
            assert run.output.count("done") == 1 and not Path(f"/tmp/{marker}").exists()
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
    run = reward.run_program(program, "")
    assert run.passed and "HOME" in run.output and "hunter2" not in run.output


def test_network_is_off_where_the_os_allows():
    with socket.create_server(("127.0.0.1", 0)) as server:
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=2)\n"
        run = reward.run_program(program, "")
        server.settimeout(0)
        if not reward.check_sandbox()["network"]:
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


# ---- tasks and answers ----


SMALL_ARITHMETIC = "rg:basic_arithmetic?max_digits=1&min_terms=2&max_terms=2"


def _raising_verifier(answer: str, item: dict) -> float:
    raise RuntimeError("verifier bug")


def _hanging_verifier(answer: str, item: dict) -> float:
    if answer == "hang":
        time.sleep(60)
    return 1.0


def _write_lines(tmp_path, lines: list[str]) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_rg_task_options_reach_reasoning_gym():
    task = reward.load_task(SMALL_ARITHMETIC, size=20, seed=3)
    assert len(task.items) == 20
    for item in task.items:
        assert item["entry"]["metadata"]["num_terms"] == 2 and item["entry"]["metadata"]["num_digits"] == 1
        assert item["question"] == item["entry"]["question"] and item["answer"] == item["entry"]["answer"]
    assert reward._parse_rg_spec("rg:x?a=1&b=0.5&c=true&d=[1, 2]&e=hello") == (
        "x", {"a": 1, "b": 0.5, "c": True, "d": [1, 2], "e": "hello"})


def test_rg_scoring_right_wrong_and_partial_credit():
    items = reward.load_task(SMALL_ARITHMETIC, size=10, seed=0).items
    task = reward.Task(SMALL_ARITHMETIC, items)
    right = [f"so the result is \\boxed{{{it['answer']}}}" for it in items]
    wrong = [f"Answer: {int(it['answer']) + 1}" for it in items]  # gold is never a substring of gold+1
    rewards, failures, timeouts = reward.score(task, items + items, right + wrong)
    assert rewards == [1.0] * 10 + [0.0] * 10 and failures == timeouts == 0
    # reasoning-gym's default score_answer gives len(gold)/len(answer) when the gold is a substring
    gold = items[0]["answer"]
    rewards, _, _ = reward.score(task, items[:1], [f"Answer: {gold}0"])
    assert rewards[0] == pytest.approx(len(gold) / (len(gold) + 1))


def test_jsonl_task_scored_by_math_verify(tmp_path):
    rows = [{"question": "a", "answer": "1/2"}, {"question": "b", "answer": "0.5"}, {"question": "c", "answer": 42},
            {"question": "d", "answer": "\\frac{1}{2}", "source": "x"}, {"question": "e", "answer": ""},
            {"question": "f", "answer": "2^{10}"}]
    task = reward.load_task(_write_lines(tmp_path, [json.dumps(r) for r in rows] + [""]), size=0, seed=0)
    assert [it["answer"] for it in task.items] == ["1/2", "0.5", "42", "\\frac{1}{2}", "", "2^{10}"]
    assert task.items[3]["source"] == "x"
    a, b, c, d, e, f = task.items
    items = [a, b, c, c, d, d, a, e, f]
    responses = ["\\boxed{\\frac{1}{2}}", "\\boxed{\\frac{1}{2}}", "Answer: 42", "answer: 41", "Answer: 0.5",
                 "\\boxed{\\frac{2}{4}}", "I do not know", "Answer: 1",
                 "Answer: 1024"]  # read bare, math-verify would take the gold "2^{10}" for 2
    rewards, failures, _ = reward.score(task, items, responses)
    assert rewards == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert failures == 1  # the unparseable gold answer is a counted failure, not a silent zero
    assert len(reward.load_task(task.spec, size=2, seed=0).items) == 2


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("first \\boxed{1}, then \\boxed{ 2 }", "2"),
    ("\\boxed{3}, then cut off: \\boxed{\\frac{1", "3"),
    ("\\boxed{4}\nAnswer: 5", "4"),
    ("Answer: 6\n\\boxed{ }", "6"),
    ("ANSWER: 7.", "7"),
    ("Answer: 1\nthinking again\nanswer: 5. Done", "5. Done"),
    ("**Answer:** 12", "12"),
    ("Answer: 3.5.", "3.5"),
    ("no answer here", None),
    ("Answer:   \n", None),
])
def test_extract_answer(text, expected):
    assert reward.extract_answer(text) == expected


def test_unknown_tasks():
    with pytest.raises(ValueError, match="no dataset 'no_such_dataset'"):
        reward.load_task("rg:no_such_dataset", size=5, seed=0)
    with pytest.raises(ValueError, match="rg:chain_sum"):  # a close name is suggested
        reward.load_task("rg:chain_sums", size=5, seed=0)
    with pytest.raises(ValueError, match="unknown task 'data.csv'"):
        reward.load_task("data.csv", size=5, seed=0)
    with pytest.raises(ValueError, match="rejected the options.*valid keys: .*max_digits"):
        reward.load_task("rg:basic_arithmetic?max_digit=2", size=5, seed=0)


def test_missing_jsonl(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        reward.load_task(str(tmp_path / "missing.jsonl"), size=0, seed=0)


@pytest.mark.parametrize("bad, message", [
    ("{not json", "line 3 is not valid JSON"),
    ("[1, 2]", "line 3 is a JSON list, not an object"),
    ('{"question": "q"}', "line 3 has no 'answer'"),
])
def test_malformed_jsonl_line_is_named(tmp_path, bad, message):
    path = _write_lines(tmp_path, ['{"question": "q1", "answer": "1"}', "", bad])
    with pytest.raises(ValueError, match=message):
        reward.load_task(path, size=0, seed=0)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_jsonl(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match="has no items"):
        reward.load_task(str(path), size=0, seed=0)


def test_empty_rg_task():
    with pytest.raises(ValueError, match="has no items"):
        reward.load_task("rg:chain_sum", size=0, seed=0)


def test_raising_verifier_scores_zero_and_is_counted():
    task = reward.Task("rg:chain_sum", [{"question": str(i), "answer": "1"} for i in range(3)])
    rewards, failures, _ = reward.score(task, task.items, ["Answer: 1", "no answer at all", "\\boxed{1}"],
                                        verifier=_raising_verifier)
    assert rewards == [0.0, 0.0, 0.0]
    assert failures == 2  # the response without an answer never reaches the verifier


def test_hanging_verifier_times_out_and_later_calls_work():
    task = reward.Task("rg:chain_sum", [{"question": str(i), "answer": "1"} for i in range(5)])
    responses = ["Answer: 1", "Answer: hang", "Answer: 2", "Answer: hang", "Answer: 3"]
    start = time.time()
    rewards, failures, timeouts = reward.score(task, task.items, responses, timeout=3.0, verifier=_hanging_verifier)
    assert rewards == [1.0, 0.0, 1.0, 0.0, 1.0] and failures == 2 and timeouts == 0  # a verifier's hang: a failure
    assert time.time() - start < 30  # each hang sleeps 60 s: both were cut short
    rewards, failures, _ = reward.score(task, task.items[:2], ["Answer: 1", "Answer: 2"], timeout=3.0,
                                        verifier=_hanging_verifier)
    assert rewards == [1.0, 1.0] and failures == 0


def test_split_task_holds_out_distinct_unseen_questions():
    task = reward.load_task(SMALL_ARITHMETIC, size=300, seed=0)
    distinct = {it["question"] for it in task.items}
    assert len(distinct) < len(task.items)  # duplicates exist, so deduplication is exercised
    train, held = reward.split_task(task, n_eval=20, seed=1)
    held_questions = [it["question"] for it in held.items]
    assert len(held_questions) == len(set(held_questions)) == 20
    assert not set(held_questions) & {it["question"] for it in train.items}
    assert len(train.items) == sum(it["question"] not in held_questions for it in task.items)
    assert train.spec == held.spec == task.spec
    assert reward.split_task(task, n_eval=20, seed=1) == (train, held)
    assert reward.split_task(task, n_eval=20, seed=2)[1] != held
    with pytest.raises(ValueError, match="distinct questions"):
        reward.split_task(task, n_eval=len(distinct), seed=0)
