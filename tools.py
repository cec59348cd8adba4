"""Tool calls inside a rollout (docs/tools.md): when the model closes a fenced Python block or a <tool_call>, its
code runs in the sandbox with the limits of code rewards, and the output comes back as a tool turn in the chat
template's framing (framing()), which the model reads and goes on from; the trainer conditions on it, never trains it.

    tools = Tools(tokenizer, cfg, items)   # items: the prompts' task items (their secret files stay hidden)
    sampler.generate(prompts, n, cfg.max_new_tokens, tools=tools)
"""

import functools
import json
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from config import Config
from sandbox import Limits, run_program

CALL, OUTPUT = "FANOUT_CALL", "FANOUT_OUTPUT"  # placeholders the chat template is rendered around
TRUNCATED = "\n[output truncated]"
BAD_CALL = """raise ValueError('a call is <tool_call>{"name": "python", "arguments": {"code": "..."}}</tool_call>')"""
_runs = ThreadPoolExecutor(8)  # threads that wait for sandboxed processes: calls of many rollouts run at once


def call_code(text: str) -> str | None:
    """The code of the call the model's turn `text` ends with, or None: a fenced block (```python, ```py or bare)
    closed at its end, its opening the turn's first fence, or a <tool_call> (its JSON's arguments.code)."""
    text = text.rstrip()
    if text.endswith("</tool_call>") and "<tool_call>" in text:
        inside = text[text.rindex("<tool_call>") + len("<tool_call>"):-len("</tool_call>")]
        try:
            return str(json.loads(inside)["arguments"]["code"])
        except (ValueError, KeyError, TypeError):
            return BAD_CALL
    parts = text.split("```")
    if len(parts) != 3 or parts[2]:
        return None
    language, _, code = parts[1].partition("\n")
    return code if language.strip().lower() in ("python", "py", "") else None


@functools.cache
def framing(tokenizer) -> tuple[list[int], list[int]]:
    """(ids before a tool's output, ids after it): from the end of the model's turn to the start of its next."""
    for role, content in (("tool", OUTPUT), ("user", f"```output\n{OUTPUT}\n```")):
        chat = [{"role": "user", "content": "?"}, {"role": "assistant", "content": CALL},
                {"role": role, "content": content}]
        try:
            text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except Exception:  # no template, or one that refuses this role
            continue
        if text.count(CALL) == 1 and text.count(OUTPUT) == 1 and text.index(CALL) < text.index(OUTPUT):
            return tuple(tokenizer.encode(part, add_special_tokens=False) for part in text.split(CALL)[1].split(OUTPUT))
    raise ValueError(f"the chat template of {tokenizer.name_or_path!r} cannot frame a tool turn (neither a tool "
                     "role nor a user turn after the assistant's renders); use a model with a chat template, or "
                     "--max-tool-calls 0")


@functools.cache
def closing_ids(tokenizer) -> torch.Tensor:
    """[vocab] bool: the tokens that can end a call (a backtick in their text, or </tool_call>)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([p is not None and ("`" in p or p == "</tool_call>") for p in pieces])


class Tools:
    """A Python tool for the sampler: which tokens may close a call, a turn's call, its run as a framed turn."""

    def __init__(self, tokenizer, cfg: Config, items: list[dict] = ()):
        self.tokenizer, self.max_calls, self.max_output_tokens = tokenizer, cfg.max_tool_calls, \
            cfg.max_tool_output_tokens
        self.before, self.after = framing(tokenizer)
        self.closing_ids = closing_ids(tokenizer)
        self.limits = Limits(wall_s=cfg.score_timeout, cpu_s=cfg.score_timeout, memory_mb=cfg.sandbox_memory_mb)
        self.secret_files = [tuple(item.get("secret_files", ())) for item in items]
        turn = len(self.before) + self.max_output_tokens + len(self.tokenize(TRUNCATED)) + len(self.after)
        if cfg.max_new_tokens <= turn:
            raise ValueError(f"--max-new-tokens {cfg.max_new_tokens} bounds a rollout's tokens and its tools', and "
                             f"one tool turn takes up to {turn} (--max-tool-output-tokens {self.max_output_tokens} "
                             f"and the template's framing); raise it above {turn} or lower the output cap")

    def tokenize(self, text: str) -> list[int]:  # special tokens a program prints stay text: no fake turns
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def code(self, turn: list[int]) -> str | None:
        return call_code(self.tokenizer.decode(turn))

    def run(self, code: str, prompt: int) -> Future:
        """(what the call printed, whether it ran clean), when it is done; prompt: its index in `items`."""
        return _runs.submit(self._run, code, self.secret_files[prompt] if self.secret_files else ())

    def _run(self, code: str, secret_files: tuple) -> tuple[str, bool]:
        run = run_program(code, "", limits=self.limits, secret_files=secret_files)
        output = run.output + (f"TimeoutError: the code ran past {self.limits.wall_s:g} s\n" if run.timed_out else "")
        return output, run.passed and not run.timed_out

    def turn(self, output: str) -> list[int]:
        """The tool turn's ids: the framing around the output, cut at max_output_tokens. In the sampler's thread:
        a tokenizer is not shared across threads."""
        ids = self.tokenize(output)
        if len(ids) > self.max_output_tokens:
            ids = ids[:self.max_output_tokens] + self.tokenize(TRUNCATED)
        return self.before + ids + self.after
