"""Tasks and verifiers (reward.py): reasoning-gym and JSONL math data scored, answers and programs found in
responses, HumanEval's own solutions and JSONL code files, bad input named, a training run that logs failures
and timeouts. Run by test_all.py."""

import itertools
import json
import random
import time

import pyarrow
import pyarrow.parquet
import pytest

import collect
import config
import reward
import test_sampler
import train
from test_sandbox import RIGHT, TESTS, fenced


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
    # a tool call's turn ends on its closing fence, the model's next turn joined to it: its block is the last
    ("Try:\n```python\nprint(f(2))\n``````python\ndef f(x):\n    return 2 * x\n```", "def f(x):\n    return 2 * x\n"),
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
    ({"question": "q", "tests": "# to do\n"}, "line 2: its tests are empty, so every program would pass them"),
    ({"question": "q", "tests": ""}, "line 2: its tests are empty"),
])
def test_bad_code_line_is_named(tmp_path, row, message):
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps({"question": "q0", "tests": TESTS}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=message):
        reward.load_task(str(path), size=0, seed=0)


def test_code_task_run_logs_rewards_failures_and_timeouts(tmp_path, monkeypatch):
    """A tiny random model writes no code, so the programs come from a stand-in for extract_program (it runs
    in this process; the sandbox runs them as usual): right, out of time, wrong, in turn."""
    import transformers
    from test_sampler import save_tiny_model
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


def random_rows(seed: int, n: int = 6) -> list[tuple[str, str]]:
    """(question, answer) pairs of fresh random arithmetic."""
    rng = random.Random(seed)
    pairs = [(rng.randint(1, 999), rng.randint(1, 999)) for _ in range(n)]
    return [(f"What is {a} + {b}? Show your work.", str(a + b)) for a, b in pairs]


def write_parquet(path, columns: dict) -> str:
    pyarrow.parquet.write_table(pyarrow.table(columns), path)
    return str(path)


def loaded(spec: str, **keys) -> list[tuple]:
    return [(it["question"], it["answer"], it.get("messages")) for it in reward.load_task(spec, 0, 0, **keys).items]


def test_data_layouts_load_as_the_same_items(tmp_path):
    """Parquet, a datasets.save_to_disk folder, verl's layout (chat messages, reward_model.ground_truth), MATH's
    (problem, solution with the answer in its last \\boxed{}) and columns named by flags all load into the items the
    equivalent JSONL does; a system message is kept; --task-size caps the rows read."""
    rows = random_rows(seed=int(time.time()))
    qs, answers = [q for q, _ in rows], [a for _, a in rows]
    jsonl = _write_lines(tmp_path, [json.dumps({"question": q, "answer": a}) for q, a in rows])
    expected = loaded(jsonl)
    assert expected == [(q, a, None) for q, a in rows]
    assert loaded(write_parquet(tmp_path / "plain.parquet", {"question": qs, "answer": answers})) == expected
    mapped = write_parquet(tmp_path / "mine.parquet", {"text": qs, "meta": [{"gold": a} for a in answers]})
    assert loaded(mapped, question_key="text", answer_key="meta.gold") == expected
    math_rows = [{"problem": q, "solution": f"Add them: \\boxed{{1}} is wrong, so \\boxed{{{a}}}."} for q, a in rows]
    for r in math_rows:  # NuminaMath's messages hold the solution too: the prompt is the problem alone
        r["messages"] = [{"role": "user", "content": r["problem"]}, {"role": "assistant", "content": r["solution"]}]
    (tmp_path / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in math_rows))
    assert loaded(str(tmp_path / "math.jsonl")) == expected
    system = {"role": "system", "content": "You check sums."}
    verl = write_parquet(tmp_path / "verl.parquet", {
        "data_source": ["sums"] * len(rows), "prompt": [[system, {"role": "user", "content": q}] for q in qs],
        "ability": ["math"] * len(rows), "reward_model": [{"style": "rule", "ground_truth": a} for a in answers]})
    chats = [[system, {"role": "user", "content": q}] for q in qs]
    assert loaded(verl) == [(q, a, chat) for q, a, chat in zip(qs, answers, chats)]
    assert len(reward.load_task(verl, 2, 0).items) == 2
    # written by datasets 5.2.0: Dataset.from_list(rows).save_to_disk(path, num_shards=2), rows as below
    saved = [("What is 2+3?", "5"), ("What is 7*6?", "42"), ("Simplify $\\frac{6}{8}$.", "\\frac{3}{4}")]
    assert loaded(str(test_sampler.ROOT / "testdata" / "saved")) == [(q, a, None) for q, a in saved]
    assert len(loaded(str(test_sampler.ROOT / "testdata" / "saved_dict" / "train"))) == 2


def test_chat_message_prompts_render_with_the_chat_template(smollm2):
    """A prompt given as chat messages goes to the model's chat template as it is (its system message kept); a
    string goes through --prompt-template as a user message."""
    tok = smollm2[1]
    messages = [{"role": "system", "content": "Reply in French."}, {"role": "user", "content": "What is 4 + 5?"}]
    ids = collect.encode_prompts(tok, "IGNORED {question}", [{"question": "What is 4 + 5?", "messages": messages},
                                                            {"question": "What is 4 + 5?"}])
    assert ids[0] == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert "Reply in French." in tok.decode(ids[0]) and "IGNORED" not in tok.decode(ids[0])
    assert "IGNORED What is 4 + 5?" in tok.decode(ids[1])


@pytest.mark.parametrize("columns, keys, message", [
    ({"question": ["q1", "q2"], "gold": ["1", "2"]}, {},
     r"row 0 has no column 'answer' or it is null \(its columns: question, gold\); name the answer's column with "
     r"--answer-key"),
    ({"question": ["q1", "q2"], "answer": ["1", None]}, {}, r"row 1 has no column 'answer' or it is null"),
    ({"text": ["q1", "q2"], "answer": ["1", "2"]}, {"question_key": "prompt"}, r"row 0 has no column 'prompt' or it "
     r"is null \(its columns: text, answer\)"),
    ({"question": ["q1", "q2"], "answer": ["1", " "]}, {}, r"row 1: its answer \('answer'\) is empty"),
    ({"question": ["q1", "q2"], "answer": ["1", "\\boxed{}"]}, {}, r"row 1: its answer \('answer'\) is empty"),
    # verl's layout with --answer-key reward_model (not reward_model.ground_truth): a gold that nothing equals
    ({"question": ["q1"], "reward_model": [{"style": "rule", "ground_truth": "1"}]}, {"answer_key": "reward_model"},
     r"row 0: its answer \('reward_model'\) is empty, a list or a dict"),
    ({"question": ["q1"], "answer": [[0, 3]]}, {}, r"row 0: its answer \('answer'\) is empty, a list or a dict"),
    ({"prompt": [["q1"], ["q2"]], "answer": ["1", "2"]}, {}, r"row 0: its 'prompt' is a list that is neither a string "
     r"nor a list of chat messages"),
    ({"prompt": [[{"role": "user", "content": "q"}], [{"role": "user", "text": "q"}]], "answer": ["1", "2"]}, {},
     r"row 1: its 'prompt' is a list that is neither"),
])
def test_bad_data_is_one_sentence_naming_file_row_and_column(tmp_path, columns, keys, message):
    path = write_parquet(tmp_path / "bad.parquet", columns)
    with pytest.raises(ValueError, match=f"bad.parquet {message}") as e:
        reward.load_task(path, 0, 0, **keys)
    assert "\n" not in str(e.value)


def test_unreadable_data_is_one_sentence(tmp_path):
    (tmp_path / "broken.parquet").write_text("not parquet")
    (tmp_path / "folder.jsonl").mkdir()
    for spec, message in [(str(tmp_path / "broken.parquet"), "cannot be read as parquet"),
                          (str(tmp_path / "folder.jsonl"), "cannot be read as a save_to_disk folder"),
                          (str(tmp_path), "cannot be read as a save_to_disk folder"),
                          (str(test_sampler.ROOT / "testdata" / "saved_dict"), "of a DatasetDict, one split's folder"),
                          (str(tmp_path / "none.parquet"), "does not exist")]:
        with pytest.raises(ValueError, match=message):
            reward.load_task(spec, 0, 0)


def test_an_eval_set_is_never_trained_on(tmp_path):
    """Training items whose problem is an eval prompt's are dropped, whatever the system message around it."""
    task = reward.Task("t", [{"question": q, "answer": "1"} for q in "abcab"])
    held = reward.Task("e", [{"question": "b", "answer": "1"}, {"question": "z", "answer": "1"}])
    assert [it["question"] for it in reward.without(task, held).items] == ["a", "c", "a"]
    chats = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}] for q in "bc"]
    verl = reward.load_task(write_parquet(tmp_path / "v.parquet", {"prompt": chats, "answer": ["1", "2"]}), 0, 0)
    assert [it["messages"] for it in reward.without(verl, held).items] == chats[1:]
    with pytest.raises(ValueError, match="every prompt of task 't' is in the evaluation set 'e'"):
        reward.without(reward.Task("t", held.items), held)


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
            {"question": "d", "answer": "\\frac{1}{2}", "source": "x"}, {"question": "f", "answer": "2^{10}"}]
    task = reward.load_task(_write_lines(tmp_path, [json.dumps(r) for r in rows] + [""]), size=0, seed=0)
    assert [it["answer"] for it in task.items] == ["1/2", "0.5", "42", "\\frac{1}{2}", "2^{10}"]
    assert task.items[3]["source"] == "x"
    (a, b, c, d, f), e = task.items, {"question": "e", "answer": ""}  # a file refuses an empty answer; score() counts
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
    ("Answer: **5**.", "5"),
    ("Answer: .5", ".5"),
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
    ('{"question": "q"}', r"line 3 has no column 'answer' or it is null \(its columns: question\)"),
])
def test_malformed_jsonl_line_is_named(tmp_path, bad, message):
    path = _write_lines(tmp_path, ['{"question": "q1", "answer": "1"}', "", bad])
    with pytest.raises(ValueError, match=message):
        reward.load_task(path, size=0, seed=0)


def test_jsonl_is_utf8_and_a_line_that_is_not_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes('{"question": "2 + 2?", "answer": "4"}\n'.encode() + '{"question": "café", "answer": "1"}\n'
                     .encode("latin-1"))
    with pytest.raises(ValueError, match=r"data.jsonl line 2 is not valid JSON: 'utf-8' codec can't decode"):
        reward.load_task(str(path), size=0, seed=0)
    path.write_bytes('\ufeff{"question": "café?", "answer": "4"}\n'.encode())  # a byte-order mark, as some editors save
    assert reward.load_task(str(path), size=0, seed=0).items[0]["question"] == "café?"


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


def _logged_verifier(answer: str, item: dict) -> float:
    with open(item["calls"], "a") as f:  # written before a hang: every call counted
        f.write(f"{item['question']}:{answer}\n")
    return _hanging_verifier(answer, item) * (answer == item["answer"])


def test_an_answer_repeated_to_one_item_is_checked_once(tmp_path):
    """A group's rollouts often give one answer: it is checked once, so a hanging one costs one timeout, not one a
    rollout; the same answer to another item is checked against that item."""
    a, b = ({"question": q, "answer": x, "calls": str(tmp_path / "calls")} for q, x in (("a", "1"), ("b", "2")))
    responses = ["Answer: hang"] * 6 + ["Answer: 1", "Answer: 2"] + ["Answer: 1", "Answer: 2"] * 2
    rewards, failures, _ = reward.score(reward.Task("rg:chain_sum", [a, b]), [a] * 8 + [b] * 4, responses,
                                        timeout=2.0, workers=2, verifier=_logged_verifier)
    assert rewards == [0.0] * 6 + [1.0, 0.0] + [0.0, 1.0] * 2 and failures == 6
    calls = (tmp_path / "calls").read_text().split()  # checks done when the hang stopped the pool are run again
    assert calls.count("a:hang") == 1 and set(calls) == {"a:1", "a:2", "a:hang", "b:1", "b:2"}


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
