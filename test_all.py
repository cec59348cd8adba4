"""fanout's test suite: CPU only, `./run.sh test` (pytest test_all.py)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in interpreter mode on CPU

import itertools
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import cluster
import collect
import explore
import loss
import outputs
import reward
import train
import trainer
from kernels.sampling import hash32, reference_sample
from kernels.test_kernels import *  # noqa: F401,F403 (the kernel tests run here too, in the interpreter)
from kernels.test_kernels import random_prompts, tiny_config, tiny_model
from test_explore import *  # noqa: F401,F403 (explore.py's functions against ALGORITHMS.md 0, 3)
from test_loss import *  # noqa: F401,F403 (loss.py's functions against ALGORITHMS.md 0, 2, 4)
from test_reward import *  # noqa: F401,F403 (code tasks, the sandbox and its hostile programs)
from test_simulate import *  # noqa: F401,F403 (simulate.py and the mass-balance check)
from test_trainer import *  # noqa: F401,F403 (trainer.py's packed micro-batches and the passes of a step)
from rollout import ModelConfig, Sampler, nucleus, sample_keys

ROOT = Path(__file__).parent
# Limit on any one subprocess or wait: there to catch a hang, not to time the code. A run that takes 3.5 min
# alone took 3x that with two CPU-bound jobs beside the suite on 2 cores; 30 min passes a loaded machine.
HANG_GUARD = 1800


# ---- models used by several tests ----

@pytest.fixture(scope="session")
def smollm2():
    path = trainer.resolve_model(trainer.EMBEDDED_MODEL, "~/.cache/fanout")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tok


def hf_greedy(model, prompt, max_new_tokens, eos):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# ---- sampler ----

@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_greedy_matches_hf_tiny(kind):
    model = tiny_model(kind)
    sampler = Sampler(ModelConfig.from_hf(model.config), model.state_dict(), "cpu", dtype=torch.float32)
    prompts = random_prompts(256, [5, 17, 9], seed=1)
    out = sampler.generate(prompts, [2, 1, 1], max_new_tokens=24, temperature=0.0)
    assert out.prompt_index == [0, 0, 1, 2]
    for p, tokens in zip(out.prompt_index, out.tokens):
        assert tokens == hf_greedy(model, prompts[p], 24, eos=None)


def test_greedy_matches_hf_smollm2(smollm2):
    model, tok = smollm2
    sampler = Sampler(ModelConfig.from_hf(model.config), model.state_dict(), "cpu", dtype=torch.float32)
    prompts = collect.encode_prompts(tok, "{question}", [{"question": "What is 3+4?"},
                                                       {"question": "Write a haiku about the sea."}])
    out = sampler.generate(prompts, [1, 1], max_new_tokens=40, temperature=0.0, stop_token_ids=[tok.eos_token_id])
    for p, tokens, reason in zip(out.prompt_index, out.tokens, out.finish_reason):
        ref = hf_greedy(model, prompts[p], 40, eos=tok.eos_token_id)
        assert tokens == ref
        assert reason == ("stop" if ref[-1] == tok.eos_token_id else "length")


def test_bad_generate_requests_are_one_sentence():
    model = tiny_model("llama", seed=1)
    sampler = Sampler(ModelConfig.from_hf(model.config), model.state_dict(), "cpu", kv_budget_tokens=64,
                      dtype=torch.float32)
    for args, kwargs, message in [(([[1, 2]], [1, 2], 4), {}, "1 prompts but 2 rollout counts"),
                                  (([[1, 2]], [1], 4), {"prompt_keys": [0, 1]}, "2 prompt keys"),
                                  (([[1, 2], []], [1, 1], 4), {}, "prompt 1 is empty"),
                                  (([[1] * 40], [1], 40), {}, "does not fit kv_budget_tokens=64"),
                                  (([[1, 2]], [1], 4), {"top_p": 0.0}, "top_p=0.0 is outside (0, 1]"),
                                  (([[1, 2]], [1], 4), {"top_p": 1.5}, "top_p=1.5 is outside (0, 1]"),
                                  (([[1, 2]], [1], 0), {}, "max_new_tokens=0 must be at least 1"),
                                  (([[1, 2]], [1], 4), {"temperature": -0.5}, "temperature=-0.5 is negative"),
                                  (([[1, 2], [3]], [2, -1], 4), {}, "a rollout count is negative (-1)")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            sampler.generate(*args, **kwargs)


def test_sampled_same_tokens_together_or_alone():
    model = tiny_model("qwen2", seed=3)
    weights = model.state_dict()
    prompts = random_prompts(256, [7, 12, 4], seed=2)
    kwargs = dict(max_new_tokens=20, temperature=1.0, stop_token_ids=list(range(3, 20)), seed=11)
    big = Sampler(ModelConfig.from_hf(model.config), weights, "cpu", dtype=torch.float32)
    together = big.generate(prompts, [3, 2, 4], **kwargs)
    for i, p in enumerate(prompts):
        alone = big.generate([p], [[3, 2, 4][i]], prompt_keys=[i], **kwargs)
        assert alone.tokens == [t for t, g in zip(together.tokens, together.prompt_index) if g == i]
    big.release_kv()  # as between steps: the pool is freed, then allocated again by generate
    assert big.k_pool is None
    apart = big.generate([prompts[2], prompts[0]], [4, 3], prompt_keys=[2, 0], **kwargs)  # any subset, any order
    assert apart.tokens == [t for g in (2, 0) for t, h in zip(together.tokens, together.prompt_index) if h == g]
    # a pool so small that rollouts are preempted, only two decode slots, or steps padded to
    # power-of-two sizes as for CUDA graphs, change nothing either
    config = ModelConfig.from_hf(model.config)
    small = Sampler(config, weights, "cpu", kv_budget_tokens=64, dtype=torch.float32)  # 4 blocks of 16
    few_slots = Sampler(config, weights, "cpu", max_slots=2, dtype=torch.float32)
    padded = Sampler(config, weights, "cpu", cuda_graphs=True, dtype=torch.float32)  # CUDA-graph padding, run eagerly
    for request in (kwargs, {**kwargs, "stop_token_ids": []}):  # without stops every rollout needs 2 blocks
        expected = big.generate(prompts, [3, 2, 4], **request)
        for constrained in (small, few_slots, padded):
            again = constrained.generate(prompts, [3, 2, 4], **request)
            assert again.tokens == expected.tokens and again.finish_reason == expected.finish_reason
            for a, b in zip(again.logprobs + again.entropies, expected.logprobs + expected.entropies):
                torch.testing.assert_close(a, b)
    assert small.stats["preemptions"] > 0 and small.stats["peak_kv_tokens"] <= 64
    assert 0 < together.finish_reason.count("stop") < len(together)  # rollouts of different lengths
    assert len({tuple(t) for t in together.tokens}) > 1  # different samples differ


def test_sampler_records_logprob_and_entropy_of_sampling_distribution():
    model = tiny_model("llama", seed=4)
    sampler = Sampler(ModelConfig.from_hf(model.config), model.state_dict(), "cpu", dtype=torch.float32)
    prompt = random_prompts(256, [6], seed=5)[0]
    out = sampler.generate([prompt], [2], max_new_tokens=8, temperature=0.7, seed=3)
    for tokens, logprobs, entropies in zip(out.tokens, out.logprobs, out.entropies):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1] / 0.7
        logp = logits.log_softmax(-1)
        torch.testing.assert_close(logprobs, logp.gather(-1, torch.tensor(tokens)[:, None])[:, 0], atol=1e-4, rtol=0)
        torch.testing.assert_close(entropies, -(logp.exp() * logp).sum(-1), atol=1e-4, rtol=0)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[3.0, 2.0, 1.0, -1.0, -2.0]]).expand(4000, 5)
    keys = hash32(torch.arange(4000))
    probs = logits[0].softmax(-1)
    tokens, logp, _ = reference_sample(nucleus(logits, 0.8), keys, 1.0)
    kept = int((probs.cumsum(-1) < 0.8).sum()) + 1  # smallest prefix whose mass reaches 0.8
    assert set(tokens.tolist()) == set(range(kept))
    torch.testing.assert_close(logp, (probs[:kept] / probs[:kept].sum()).log()[tokens])


def test_keys_differ_across_every_coordinate():
    base = dict(prompt=torch.tensor([1]), sample=torch.tensor([2]), position=torch.tensor([3]))
    k0 = sample_keys(0, **base)
    for field in base:
        assert sample_keys(0, **{**base, field: base[field] + 1}) != k0
    assert sample_keys(1, **base) != k0


def test_unsupported_model_type_is_one_sentence():
    cfg = transformers.GPT2Config()
    with pytest.raises(ValueError, match="not supported by fanout's sampler"):
        ModelConfig.from_hf(cfg)
    gelu = tiny_config("llama")
    gelu.hidden_act = "gelu"  # a Llama shape whose MLP is not SiLU: the sampler would compute wrong logits
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported by fanout's sampler"):
        ModelConfig.from_hf(gelu)


# ---- losses (ALGORITHMS.md 0) ----

def random_groups(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 2, 5, 8]
    group = torch.cat([torch.full((s,), i * 7 + 3) for i, s in enumerate(sizes)])  # non-contiguous ids
    perm = torch.randperm(len(group), generator=g)
    return torch.rand(len(group), generator=g).round(), group[perm], sizes


def test_advantages_match_formulas():
    for seed in range(5):
        r, group, _ = random_groups(seed)
        r = r + torch.rand(len(r)) * 0.1  # partial credit: unequal rewards inside groups
        got = {k: loss.advantages(r, group, k) for k in loss.ADVANTAGE_KINDS}
        for i in range(len(r)):
            same = group == group[i]
            g = r[same]
            mean = g.mean()
            std = g.std() if len(g) > 1 else torch.tensor(1.0)
            assert torch.isclose(got["grpo"][i], (r[i] - mean) / (std + 1e-6), atol=1e-5)
            assert torch.isclose(got["drgrpo"][i], r[i] - mean, atol=1e-6)
            others = (g.sum() - r[i]) / (len(g) - 1) if len(g) > 1 else r[i]
            assert torch.isclose(got["rloo"][i], r[i] - others, atol=1e-6)
        centred = torch.stack([r[i] - r[group == group[i]].mean() for i in range(len(r))])
        z = (centred - centred.mean()) / (centred.std(unbiased=False) + 1e-6)
        torch.testing.assert_close(got["reinforce++"], z)


def test_advantages_edge_cases():
    group = torch.tensor([0, 0, 0, 1])
    equal = torch.tensor([1.0, 1.0, 1.0, 0.0])  # an all-equal group and a group of one
    for kind in ("grpo", "drgrpo", "rloo"):
        assert loss.advantages(equal, group, kind).abs().max() == 0
    with pytest.raises(ValueError, match="unknown advantage kind"):
        loss.advantages(equal, group, "ppo")


def test_policy_loss_matches_clip_higher_formula():
    torch.manual_seed(0)
    logp, old, adv = torch.randn(500) * 0.3, torch.randn(500) * 0.3, torch.randn(500)
    got, clipped = loss.policy_loss(logp, old, adv, eps_low=0.2, eps_high=0.28)
    for i in range(500):
        rho = math.exp(logp[i] - old[i])
        a = adv[i].item()
        want = -min(rho * a, min(max(rho, 0.8), 1.28) * a)
        assert abs(got[i].item() - want) < 1e-5
        assert clipped[i].item() == float(min(max(rho, 0.8), 1.28) * a < rho * a - 1e-12)
    assert 0 < clipped.mean() < 1


def test_kl_estimators():
    torch.manual_seed(1)
    logp, ref = torch.randn(100), torch.randn(100)
    d = logp - ref
    torch.testing.assert_close(loss.kl(logp, ref, "k1"), d)
    torch.testing.assert_close(loss.kl(logp, ref, "k2"), d ** 2 / 2)
    torch.testing.assert_close(loss.kl(logp, ref, "k3"), torch.exp(-d) - 1 + d)
    assert (loss.kl(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="unknown KL kind"):
        loss.kl(logp, ref, "k4")


def test_token_mean_over_microbatches_is_the_global_mean():
    torch.manual_seed(2)
    per_token = torch.randn(37)
    parts = per_token.split([5, 20, 12])
    total = sum(loss.token_mean(p, 37) for p in parts)
    torch.testing.assert_close(total, per_token.mean())


# ---- tasks and rewards ----

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


# ---- trainer pieces ----

def test_pick_prompts_visits_every_prompt_once_per_epoch():
    n, per_step = 10, 4
    picked = [i for step in range(5) for i in explore.pick_prompts(n, step * per_step, per_step, seed=3)]
    assert sorted(picked[:10]) == sorted(picked[10:20]) == list(range(10))
    assert picked[:10] != picked[10:20]  # a fresh order each epoch
    assert explore.pick_prompts(n, 8, per_step, seed=3) == picked[8:12]  # a pure function of the position
    assert explore.pick_prompts(n, 9, 7, seed=3) == picked[9:16]
    assert explore.pick_prompts(n, 8, per_step, seed=4) != picked[8:12]


def test_pass_at_k_matches_enumeration():
    import itertools
    for n, c, k in [(4, 0, 1), (4, 1, 1), (5, 2, 3), (6, 6, 2), (8, 3, 8)]:
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(outcomes, k))
        assert abs(collect.pass_at_k(n, c, k) - sum(any(s) for s in subsets) / len(subsets)) < 1e-12


def test_microbatches_respect_the_token_budget():
    lengths = [5, 90, 33, 33, 70, 12, 64, 1, 100]
    for pack in (False, True):
        batches = trainer.microbatches(lengths, budget=128, pack=pack)
        assert sorted(i for b in batches for row in b for i in row) == list(range(len(lengths)))
        for b in batches:  # rows as wide as the micro-batch's longest, rows x width within the budget
            width = max(lengths[i] for row in b for i in row)
            assert all(sum(lengths[i] for i in row) <= width for row in b)
            assert len(b) == 1 or width * len(b) <= 128
            assert pack or all(len(row) == 1 for row in b)
    assert [[3, 5, 0, 7]] in [b[1:] for b in trainer.microbatches(lengths, budget=128)]  # 33 + 12 + 5 + 1 <= 64


def test_response_logprobs_match_full_forward():
    model = tiny_model("llama", seed=6)
    seqs = random_prompts(256, [9, 14, 6], seed=8)
    prompt_lens = [4, 10, 2]
    got, entropy = trainer.response_logprobs(trainer.Policy(model), seqs, prompt_lens, temperature=0.5,
                                           autocast_dtype=torch.float32)
    want, want_entropy = [], []
    for s, p in zip(seqs, prompt_lens):
        with torch.no_grad():
            logp = (model(torch.tensor([s])).logits[0, p - 1:-1] / 0.5).log_softmax(-1)
        want.append(logp.gather(-1, torch.tensor(s[p:])[:, None])[:, 0])
        want_entropy.append(-(logp.exp() * logp).sum(-1))
    torch.testing.assert_close(got.detach(), torch.cat(want), atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy.detach(), torch.cat(want_entropy), atol=1e-5, rtol=0)


def grouped_sequences(seed: int):
    """Three prompts with three responses of 1 to 7 tokens each, shuffled."""
    g = torch.Generator().manual_seed(seed)
    seqs, prompt_lens = [], []
    for i, p in enumerate(random_prompts(256, [9, 14, 6], seed=seed)):
        for k in range(3):
            seqs.append(p + torch.randint(3, 256, (1 + (5 * k + i) % 7,), generator=g).tolist())
            prompt_lens.append(len(p))
    order = torch.randperm(len(seqs), generator=g).tolist()
    return [seqs[i] for i in order], [prompt_lens[i] for i in order]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_shared_prompt_rows_match_one_row_per_response(kind):
    """The CPU trainer runs each prompt once for all its responses: the same logprobs, entropies and
    gradients as one padded row per response."""
    model = tiny_model(kind, seed=6)
    seqs, prompt_lens = grouped_sequences(seed=8)
    rows = trainer.plan(seqs, prompt_lens, math.inf, share_prompts=True, pack=False)[0]
    assert len(rows) == 3 and all(len(row) == 1 and len(row[0]) == 3 for row in rows)  # a group a row, its prompt once
    assert sum(prompt_lens[row[0][0]] for row in rows) == 29
    results = []
    for share in (False, True):
        model.zero_grad()
        logp, entropy = trainer.response_logprobs(trainer.Policy(model), seqs, prompt_lens, 0.7, torch.float32, share,
                                                  rows if share else trainer.plan(seqs, prompt_lens, math.inf, False,
                                                                                  pack=False)[0])
        (logp * torch.arange(len(logp)) + entropy).sum().backward()
        results.append((logp.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()]))
    (logp, entropy, grads), (logp2, entropy2, grads2) = results
    torch.testing.assert_close(logp2, logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy2, entropy, atol=1e-5, rtol=0)
    for a, b in zip(grads2, grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_shared_row_keeps_responses_apart():
    """Changing one response's tokens changes its own logprobs only, not those of the responses beside it
    in the same row."""
    model = tiny_model("llama", seed=2)
    seqs, prompt_lens = grouped_sequences(seed=3)
    policy = trainer.Policy(model)
    with torch.no_grad():
        before = trainer.response_logprobs(policy, seqs, prompt_lens, 1.0, torch.float32, True)[0]
        prompt = lambda j: seqs[j][:prompt_lens[j]]
        # a response that comes first in its row, so that others follow it there
        i = next(j for j in range(len(seqs)) if len(seqs[j]) - prompt_lens[j] >= 2
                 and all(prompt(k) != prompt(j) for k in range(j)))
        assert any(prompt(k) == prompt(i) for k in range(i + 1, len(seqs)))
        changed = [list(s) for s in seqs]
        changed[i][prompt_lens[i]:-1] = [(t + 1) % 256 for t in changed[i][prompt_lens[i]:-1]]
        after = trainer.response_logprobs(policy, changed, prompt_lens, 1.0, torch.float32, True)[0]
    starts = [0, *itertools.accumulate(len(s) - p for s, p in zip(seqs, prompt_lens))]
    moved = [not torch.equal(before[a:b], after[a:b]) for a, b in zip(starts, starts[1:])]
    assert moved == [j == i for j in range(len(seqs))]


def test_shared_rows_give_the_same_gradients_every_time():
    """A prompt's last position predicts the first token of each of its responses in a shared row: the repeats
    must be summed in a fixed order (two identical runs diverged in the last bits when they were not)."""
    torch.manual_seed(0)
    prompts = [torch.randint(0, 256, (12,)).tolist() for _ in range(3)]
    seqs = [prompts[i % 3] + torch.randint(0, 256, (24,)).tolist() for i in range(96)]  # groups interleaved
    policy = trainer.Policy(tiny_model("llama", seed=5))
    seen = set()
    for _ in range(6):
        policy.zero_grad()
        logp, entropy = trainer.response_logprobs(policy, seqs, [12] * len(seqs), 1.0, torch.float32, True)
        (logp * torch.linspace(-1, 1, len(logp))).sum().backward()
        seen.add(b"".join(p.grad.numpy().tobytes() for p in policy.parameters()))
    assert len(seen) == 1


def test_missing_model_path_is_one_sentence(tmp_path):
    with pytest.raises(SystemExit, match="no config.json there"):
        trainer.resolve_model(str(tmp_path / "nope"), str(tmp_path))


@pytest.mark.parametrize("fields, message", [
    (dict(adv="ppo"), "--adv ppo is unknown"),
    (dict(loss="dpo"), "--loss dpo is unknown"),
    (dict(aggregate="sum"), "--aggregate sum is unknown"),
    (dict(eps_low=0.3, eps_high=0.2), "--eps-high 0.2 is below --eps-low 0.3"),
    (dict(adam_eps=0.0), "--adam-eps 0.0 must be positive"),
    (dict(dual_clip=0.5), "--dual-clip must be 0"),
    (dict(loss="tb", tb_beta_start=-0.01), "--tb-beta-start -0.01 and --tb-beta-end 0.004 must be > 0"),
    (dict(echo_coef=1e-3, success=2.0), "--success 2.0: rewards are at most 1"),
    (dict(echo_mode="some"), "--echo-mode some is unknown"),
    (dict(budget_min=10, budget_max=6), "--budget-min 10 is above --budget-max 6"),
    (dict(budget_min=10, budget_max=12), "--rollouts-per-prompt 8 is outside --budget-min 10"),
    (dict(temperature_control=True, tau_min=2.0, tau_max=0.5), "--tau-min 2.0 and --tau-max 0.5"),
    (dict(max_gen_rounds=0), "--max-gen-rounds 0 must be at least 1"),
    (dict(dtype="float16"), "--dtype float16 is unknown"),
    (dict(top_p=0.0), "top_p=0.0 is outside (0, 1]"),
    (dict(temperature=-1.0), "temperature=-1.0 is negative"),
    (dict(max_new_tokens=0), "max_new_tokens=0 must be at least 1"),
    (dict(rollouts_per_prompt=-2), "--rollouts-per-prompt -2 must be at least 1"),
    (dict(prompts_per_step=0), "--prompts-per-step 0 and --rollouts-per-prompt 8 must be at least 1")])
def test_bad_config_is_one_sentence(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train.Config(**fields)


def test_dtype_auto_probes_once_per_cpu_and_picks_the_faster(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    dtype, why = cluster.pick_dtype("auto", cpu, 64, 128, str(tmp_path))
    cache = json.loads((tmp_path / "dtype_probe.json").read_text())
    [(key, ms)] = cache.items()
    assert cluster.cpu_identity() in key and "64x128" in key and ms["float32"] > 0 and ms["bfloat16"] > 0
    assert dtype == (torch.bfloat16 if ms["bfloat16"] < ms["float32"] else torch.float32)
    assert not ms["stopped"] or ms["bfloat16"] > ms["float32"]  # bf16 stops early only once it is slower
    assert f"{ms['float32']:.1f} ms in float32" in why
    monkeypatch.setattr(cluster, "probe_matmuls", lambda *a: pytest.fail("probed again; the cache holds the answer"))
    assert cluster.pick_dtype("auto", cpu, 64, 128, str(tmp_path))[0] == dtype
    for bf16_ms, expected in ((0.5, torch.bfloat16), (2.0, torch.float32)):  # a CPU with and without bf16 units
        cache[key] = {"float32": 1.0, "bfloat16": bf16_ms, "stopped": False}
        (tmp_path / "dtype_probe.json").write_text(json.dumps(cache))
        assert cluster.pick_dtype("auto", cpu, 64, 128, str(tmp_path))[0] == expected
    assert cluster.pick_dtype("float32", cpu, 64, 128, str(tmp_path)) == (torch.float32, "--dtype float32")
    assert cluster.pick_dtype("auto", torch.device("cuda"), 64, 128, str(tmp_path))[0] == torch.bfloat16
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # an emulated older CPU is another CPU: its own probe
    assert "oneDNN ISA AVX2" in cluster.cpu_identity()
    with pytest.raises(pytest.fail.Exception, match="probed again"):
        cluster.pick_dtype("auto", cpu, 64, 128, str(tmp_path))


def test_threads_are_the_physical_cores_of_the_affinity(monkeypatch):
    cores = cluster.physical_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        cluster.set_threads()
        assert torch.get_num_threads() == cores
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 2))  # more ranks than cores: one thread each
        cluster.set_threads()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_scoring_workers_sit_idle_while_the_model_runs():
    """The verifier pool's workers block on their queue between score() calls: while the parent computes
    they use no CPU time, so they do not compete with torch's threads."""
    task = reward.load_task("rg:chain_sum", 4, seed=0)
    reward.score(task, task.items, [f"Answer: {item['answer']}" for item in task.items])
    workers = [p.pid for pool in reward._pools.values() for p in pool._pool]

    def cpu_seconds(pid):  # utime + stime from /proc/PID/stat, in clock ticks
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = [cpu_seconds(pid) for pid in workers]
    start = time.time()
    x = torch.randn(512, 512)
    while time.time() - start < 1.0:
        x = (x @ x).tanh()
    assert workers and all(cpu_seconds(pid) - b <= 0.02 for pid, b in zip(workers, before))


def test_bad_config_on_the_command_line_is_one_sentence():
    run = subprocess.run([sys.executable, "train.py", "demo", "--kl-kind", "k9"], cwd=ROOT,
                         capture_output=True, text=True, timeout=HANG_GUARD)
    assert run.returncode != 0
    assert "--kl-kind k9 is unknown" in run.stderr and "Traceback" not in run.stderr


def test_bad_task_in_a_run_is_one_sentence(tmp_path):
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"question": "1+1", "answer": "2"}\n{"question": oops}\n')
    for task, message in [("rg:no_such_task", "no dataset 'no_such_task'"), (str(bad), "data.jsonl line 2 is not valid JSON")]:
        run = subprocess.run([sys.executable, "train.py", "demo", "--task", task, "--model", str(tmp_path)],
                             cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD)
        assert run.returncode != 0 and "Traceback" not in run.stderr
        assert message in run.stderr


def save_tiny_model(path: Path, kind: str, tokenizer, seed: int) -> str:
    """A small random model with the real tokenizer, saved as a local HF directory."""
    cfg = tiny_config(kind)
    cfg.vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_demo_loop_runs_end_to_end(tmp_path, smollm2):
    """Two tiny steps on a small random model with the real tokenizer: metrics, eval rows and the plot."""
    save_tiny_model(tmp_path / "model", "llama", smollm2[1], seed=0)
    config = train.Config(model=str(tmp_path / "model"), task="rg:chain_sum?min_digits=1&max_digits=1", steps=2,
                          task_size=200, prompts_per_step=2, rollouts_per_prompt=3, max_new_tokens=6,
                          eval_prompts=4, eval_samples=2, out_dir=str(tmp_path / "out"), lr=1e-3)
    train.main(config)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("eval") for r in rows if "eval" in r] == ["before", "after"]
    steps = [r for r in rows if "step" in r]
    assert [r["step"] for r in steps] == [0, 1]
    for key in ("reward", "pass_rate", "entropy", "loss", "clip_frac"):
        assert all(math.isfinite(r[key]) for r in steps)
    assert rows[1]["eval_samples"] == 8
    # the first row says how the run computes: --dtype auto's choice for this CPU, and why
    assert rows[0]["run"] == "started" and rows[0]["dtype"] in ("float32", "bfloat16") and rows[0]["threads"] >= 1
    assert rows[0]["dtype_why"].startswith("auto: the model's MLP product")
    assert (tmp_path / "out" / "plot.png").stat().st_size > 1000


@pytest.mark.parametrize("flags, expect", [
    # every reward (0 from a random model) counts as a success: all groups are all-right, so EchoClips exist
    (dict(echo_coef=1e-3, success=0.0), ("echo_loss", "echo_clips", "echo_clip_frac")),
    (dict(loss="tb", updates_per_step=2, kl_coef=0.0), ("log_z_std", "tb_beta")),
    # a random model gets all-equal rewards: dynamic sampling drops every group and the step trains on nothing
    (dict(adv="reinforce++", dynamic_sampling=True, max_gen_rounds=2, tis_cap=2.0, kl_coef=1e-3, dual_clip=3.0,
          aggregate="seq-mean-token-mean"), ("ds_pass_rate", "tis_weight", "kl")),
    (dict(kl_coef=1e-3, kl_in_reward=True, aggregate="seq-mean-token-sum-norm", entropy_coef=1e-3), ()),
    # the entropy bonus moves the policy; the reference catches up at step 2, so the KL is 0 again
    (dict(kl_coef=1e-3, ref_reset_every=2, entropy_coef=1e-2, steps=3), ("kl",)),
    # 6 training prompts, 2 per step: budgets are uniform in epoch 1 (steps 0-2) and spread in epoch 2
    (dict(budget_min=1, budget_max=5, temperature_control=True, task_size=10, steps=5), ("entropy_target",))])
def test_objective_and_explore_options_run(tmp_path, smollm2, flags, expect):
    save_tiny_model(tmp_path / "model", "llama", smollm2[1], seed=0)
    config = train.Config(**{**dict(model=str(tmp_path / "model"), task="rg:chain_sum?min_digits=1&max_digits=1",
                                    steps=2, task_size=200, prompts_per_step=2, rollouts_per_prompt=3,
                                    max_new_tokens=6, eval_prompts=4, eval_samples=1, out_dir=str(tmp_path / "out"),
                                    lr=1e-3), **flags})
    train.main(config)
    rows = [r for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) if "step" in r]
    assert len(rows) == config.steps
    for row in rows:
        assert all(math.isfinite(row[k]) for k in ("loss", "grad_norm", "entropy", "degenerate_frac", *expect))
    if flags.get("echo_coef"):
        assert all(r["echo_clips"] == 2 and r["echo_loss"] > 0 and 0 < r["echo_clip_frac"] <= 1 for r in rows)
    if flags.get("dynamic_sampling"):
        assert all(r["ds_pass_rate"] == 0 and r["groups_sampled"] == 4 and r["grad_norm"] == 0 for r in rows)
    if flags.get("ref_reset_every"):
        assert rows[0]["kl"] == 0 and rows[1]["kl"] > 0 and rows[2]["kl"] == 0
    if flags.get("temperature_control"):
        assert len({r["temperature"] for r in rows}) > 1  # the controller moved tau
        assert all(1 <= r["rollouts_min"] <= r["rollouts_mean"] == 3 <= r["rollouts_max"] <= 5 for r in rows)
        assert [r["rollouts_max"] - r["rollouts_min"] > 0 for r in rows] == [False] * 3 + [True] * 2


def test_two_ranks_train_like_one(tmp_path):
    """torchrun with 2 gloo ranks (FSDP2, prompts split across ranks) and with 1 rank, same global
    batch and seed: the same rollouts, rewards and losses, and the same updated weights (exported
    at the end), every weight within float32 tolerance. With AdamW's default eps (1e-8) a weight whose gradient sits
    at float noise moves by about lr x sign(noise), so the layouts (rows per rank, threads, a sum over ranks) would
    set hundreds of weights apart by a fraction of lr (seen: 724 of 135M on a 2-core Xeon with AMX); --adam-eps 1e-5
    makes such a weight move by lr x g / eps, still lr for the 3/4 of the weights whose gradients are real."""
    args = ["demo", "--steps", "2", "--dtype", "float32", "--prompts-per-step", "4", "--rollouts-per-prompt", "8",
            "--max-new-tokens", "16", "--eval-prompts", "4", "--eval-samples", "1", "--lr", "1e-5",
            # the cross-rank paths too: dynamic sampling's rounds and trimming, E3 budgets (8 training prompts,
            # so step 1 starts epoch 2), TIS, echo clips
            "--task-size", "12", "--dynamic-sampling", "--max-gen-rounds", "2", "--budget-min", "6", "--budget-max",
            "10", "--tis-cap", "2", "--echo-coef", "1e-3", "--echo-mode", "any", "--adam-eps", "1e-5"]
    runs, weights = [], []
    for ranks in (1, 2):
        out = tmp_path / f"ranks{ranks}"
        checkpointing = ["--activation-checkpointing"] if ranks == 2 else []  # the same updates with it on
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                              "train.py", *args, *checkpointing, "--out-dir", str(out), "--export-hf",
                              str(out / "export")],
                             cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD)
        assert run.returncode == 0, run.stderr[-2000:]
        runs.append([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
        weights.append(load_file(out / "export" / "model.safetensors"))
    one, two = ([r for r in rows if "step" in r] for rows in runs)
    assert len(one) == len(two) == 2 and one[0]["grad_norm"] > 0  # some group had a reward signal
    for a, b in zip(one, two):
        for key in ("reward", "pass_rate", "response_len", "ds_pass_rate", "groups_kept", "rollouts_min",
                    "rollouts_max", "echo_clips"):
            assert a[key] == b[key], (key, a[key], b[key])
        for key in ("entropy", "loss", "grad_norm", "tis_weight", "echo_loss"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), (key, a[key], b[key])
    initial = load_file(trainer.resolve_model(trainer.EMBEDDED_MODEL, train.Config().cache_dir) / "model.safetensors")
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 100
    moved = apart = 0
    for name in weights[0]:
        a, b = weights[0][name], weights[1][name]
        moved += int((~torch.isclose(a, initial[name].float(), rtol=1e-5, atol=1e-7)).sum())
        apart += int((~torch.isclose(a, b, rtol=1e-5, atol=1e-7)).sum())
    assert moved > sum(w.numel() for w in initial.values()) / 2  # the runs did train, most weights by about lr
    assert apart == 0, f"{apart} weights differ between 1 and 2 ranks"


def test_prompts_split_over_ranks_by_budget():
    gen = torch.Generator().manual_seed(0)
    for world in (1, 2, 3, 8):
        budgets = torch.randint(1, 40, (24,), generator=gen).tolist()
        shares = cluster.split_by_budget(budgets, world)
        assert sorted(i for share in shares for i in share) == list(range(24))
        loads = [sum(budgets[i] for i in share) for share in shares]
        assert max(loads) - min(loads) <= max(budgets)
    assert cluster.split_by_budget([8] * 4, 2) == [[0, 2], [1, 3]]  # equal budgets: equal shares
    assert cluster.split_by_budget([12, 4, 4, 4], 2) == [[0], [1, 2, 3]]
    with pytest.raises(SystemExit, match="--prompts-per-step 6 does not split over 4 trainer ranks"):
        cluster.check_world_size(train.Config(prompts_per_step=6), 4)


def test_activation_checkpointing_gives_the_same_gradients():
    seqs, prompt_lens = random_prompts(256, [9, 14], seed=3), [4, 6]
    grads, layer_calls = [], []
    for checkpointing in (False, True):
        model = tiny_model("llama", seed=4)
        if checkpointing:
            trainer.checkpoint_layers(model)
        calls = []
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        logp, entropy = trainer.response_logprobs(trainer.Policy(model), seqs, prompt_lens, 0.7, torch.float32)
        (logp.sum() + entropy.sum()).backward()
        grads.append([p.grad for p in model.parameters()])
        layer_calls.append(len(calls))
    assert layer_calls == [1, 2]  # checkpointing recomputes the layer in the backward
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_checkpoint_holds_model_optimizer_and_reference(tmp_path):
    def parts(seed):
        model = trainer.Policy(tiny_model("llama", seed=seed))
        ref = trainer.Policy(tiny_model("llama", seed=seed + 1).requires_grad_(False))
        return model, torch.optim.AdamW(model.parameters()), ref

    model, optimizer, ref = parts(0)
    trainer.reset_reference(ref, model)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()  # now model, optimizer state and reference all differ from a fresh start
    outputs.save_checkpoint(train.Config(out_dir=str(tmp_path)), model, optimizer, ref, 3, rank=0)
    model2, optimizer2, ref2 = parts(5)
    assert outputs.load_checkpoint(tmp_path / "checkpoints" / "step_000003", model2, optimizer2, ref2, rank=0) == (4, None)
    for a, b in zip([*model.parameters(), *ref.parameters()], [*model2.parameters(), *ref2.parameters()]):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def tiny_run(tmp_path: Path, smollm2) -> list[str]:
    """train.py flags for a few quick steps of a small random model (the real tokenizer) on the demo's task:
    its rewards are all 0, so an entropy bonus gives every step a gradient."""
    model = tmp_path / "model"
    if not model.exists():
        save_tiny_model(model, "llama", smollm2[1], seed=0)
    return ["demo", "--model", str(model), "--dtype", "float32", "--prompts-per-step", "4", "--rollouts-per-prompt",
            "8", "--max-new-tokens", "8", "--eval-prompts", "4", "--eval-samples", "1", "--lr", "1e-3",
            "--entropy-coef", "1e-2"]


def step_rows(out_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("t_")} for r in rows if "step" in r]


def test_resume_after_sigkill_matches_an_unbroken_run(tmp_path, smollm2):
    # 8 training prompts, 4 per step: step 2 starts epoch 2, whose E3 budgets come from the difficulty
    # stats of epoch 1, and the sampling temperature moves every step: both must come back on resume
    e3 = ["--task-size", "12", "--budget-min", "6", "--budget-max", "10", "--temperature-control"]
    command = [sys.executable, "train.py", *tiny_run(tmp_path, smollm2), *e3, "--steps", "4", "--save-every", "1"]
    # the unbroken run saves nothing: saving must not change a run either
    unbroken = subprocess.run(command[:-2] + ["--out-dir", str(tmp_path / "a")], cwd=ROOT, capture_output=True,
                              text=True, timeout=HANG_GUARD)
    assert unbroken.returncode == 0, unbroken.stderr[-2000:]
    out = tmp_path / "b"
    killed = subprocess.Popen(command + ["--out-dir", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + HANG_GUARD
    while not (out / "checkpoints" / "step_000001").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    killed.kill()  # SIGKILL, somewhere after step 1's checkpoint
    killed.wait()
    assert (out / "checkpoints" / "step_000001").is_dir() and not (out / "checkpoints" / "step_000003").exists()
    half_written = out / "checkpoints" / "step_000009.tmp"  # cut off while being written: never picked up
    half_written.mkdir()
    (half_written / ".metadata").write_text("garbage")
    resumed = subprocess.run(command + ["--out-dir", str(out), "--resume", "auto"], cwd=ROOT, capture_output=True,
                             text=True, timeout=HANG_GUARD)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a, b = step_rows(tmp_path / "a"), step_rows(out)
    assert [r["step"] for r in b] == [0, 1, 2, 3] and a == b  # exactly, floats included
    assert all(r["grad_norm"] > 0 for r in a) and a[2]["rollouts_max"] > a[2]["rollouts_min"]
    assert a[0]["temperature"] == a[1]["temperature"] == 1.0  # the first update only sets the entropy target
    assert len({r["temperature"] for r in a[1:]}) == 3


def test_bad_checkpoints_and_export_folder_are_one_sentence(tmp_path, smollm2):
    corrupt = tmp_path / "step_000001"
    corrupt.mkdir()
    (corrupt / ".metadata").write_text("not a checkpoint")
    cases = [(["--resume", str(tmp_path / "missing")], "no complete checkpoint there"),
             (["--resume", str(corrupt)], "cannot be read"),
             (["--export-hf", str(tmp_path)], "already exists")]
    for flags, message in cases:
        run = subprocess.run([sys.executable, "train.py", *tiny_run(tmp_path, smollm2), "--steps", "1", "--out-dir",
                              str(tmp_path / "out"), *flags], cwd=ROOT, capture_output=True, text=True,
                             timeout=HANG_GUARD)
        assert run.returncode != 0 and message in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]


def test_exported_model_loads_in_transformers_and_decodes_like_the_sampler(tmp_path, smollm2):
    save_tiny_model(tmp_path / "model", "qwen2", smollm2[1], seed=1)
    train.main(train.Config(model=str(tmp_path / "model"), task="rg:chain_sum?min_digits=1&max_digits=1", steps=1,
                            task_size=200, prompts_per_step=2, rollouts_per_prompt=2, max_new_tokens=4,
                            eval_prompts=4, eval_samples=1, out_dir=str(tmp_path / "out"),
                            export_hf=str(tmp_path / "export")))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    sampler = Sampler(ModelConfig.from_hf(model.config), model.state_dict(), "cpu", dtype=torch.float32)
    prompts = collect.encode_prompts(transformers.AutoTokenizer.from_pretrained(tmp_path / "export"), "{question}",
                                   [{"question": "What is 2 + 2?"}])
    out = sampler.generate(prompts, [1], max_new_tokens=12, temperature=0.0)
    assert out.tokens[0] == hf_greedy(model, prompts[0], 12, eos=None)


def test_learning_rate_schedules():
    cfg = train.Config(lr=1.0, steps=10, warmup_steps=2, lr_schedule="cosine")
    lrs = [trainer.lr_at(cfg, s) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[-1] < 0.05 and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert [trainer.lr_at(train.Config(lr=2.0, steps=10, warmup_steps=4), s) for s in (0, 9)] == [2.0, 2.0]
    warmup = train.Config(lr=2.0, steps=10, warmup_steps=4, lr_schedule="warmup")
    assert [trainer.lr_at(warmup, s) for s in (0, 3, 9)] == [0.5, 2.0, 2.0]
    assert math.isclose(train.brorl_lr(1e-6, 512 * 16, 128 * 512), 1e-6 * math.sqrt(8))


def test_bench_trainer_runs_a_training_step(tmp_path):
    """bench.py trainer drives trainer.train_on_batch; a tiny case keeps the two in step."""
    out = tmp_path / "trainer.json"
    run = subprocess.run([sys.executable, "bench.py", "trainer", "--prompts", "2", "--group-size", "4", "--prompt-len",
                          "8", "--response-len", "8", "--response-max", "32", "--repeats", "1", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    for r in (result["packed"], result["padded"]):  # no CPU peak: no MFU
        assert r["tokens_per_s"] > 0 and r["tflops_per_s"] > 0 and r["mfu"] is None
    assert result["packed"]["model_tokens"] < result["padded"]["model_tokens"] and result["speedup"] > 0


# ---- the line budget ----

def test_line_budget():
    code = [f for f in ROOT.rglob("*.py") if not f.name.startswith("test_")
            and not any(part.startswith(".") or part == "runs" for part in f.relative_to(ROOT).parts)]
    lines = sum(len(f.read_text().splitlines()) for f in code)
    assert 0 < lines <= 5000, f"{lines} lines of non-test code; the budget is 5,000"


# ---- TBA: async searchers, the weight broadcast, the replay buffer's run (ALGORITHMS.md 2) ----

BROADCAST_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import cluster
cluster.BUCKET = 1000  # several buckets and a short last one
dist.init_process_group("gloo")
group = dist.new_group([0, 1])
bits = torch.randint(-2**15, 2**15, (12345,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
sent = bits.to(torch.int16).view(torch.bfloat16)  # every pattern: NaN payloads, -0, infinities, subnormals
flat = sent.clone() if dist.get_rank() == 0 else torch.zeros_like(sent)
for version in (0, 4):
    assert cluster.broadcast_weights(flat, version, group) == (version, cluster.checksum(sent))
    assert torch.equal(flat.view(torch.int16), sent.view(torch.int16))
    flat.view(torch.int16)[0] += 1 if dist.get_rank() == 0 else 0
    sent.view(torch.int16)[0] += 1
dist.destroy_process_group()
print("exact")
"""


def test_weight_broadcast_is_bit_exact(tmp_path):
    script = tmp_path / "broadcast.py"
    script.write_text(BROADCAST_SCRIPT)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                          str(ROOT)], capture_output=True, text=True, timeout=HANG_GUARD)
    assert run.returncode == 0 and run.stdout.count("exact") == 2, run.stderr[-2000:]


def tba_command(tmp_path: Path, name: str, procs: int, *flags: str) -> list[str]:
    """A tiny `tba-cpu` run (random model, real tokenizer), 4 steps; procs 0 = plain python (one process,
    virtual searchers), else torchrun."""
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(procs)] if procs else []
    return [sys.executable, *launch, "train.py", "tba-cpu", "--model", str(tmp_path / "model"), "--searchers", "2",
            "--dtype", "float32", "--steps", "4", "--sync-every", "1", "--prompts-per-step", "2",
            "--rollouts-per-prompt", "3", "--max-new-tokens", "6", "--task-size", "40", "--eval-prompts", "2",
            "--eval-samples", "1", "--lr", "1e-3", "--out-dir", str(tmp_path / name), *flags]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # so that one process and several compute alike


def tba_run(tmp_path: Path, name: str, procs: int, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(tba_command(tmp_path, name, procs, *flags), cwd=ROOT, capture_output=True, text=True,
                          timeout=HANG_GUARD, env=ONE_THREAD)


TIMING = ("t_step", "broadcast_s", "trainer_waited", "searcher_waited", "rollouts_per_s", "tokens_per_s")


def test_tba_one_process_and_torchrun_agree_and_resume(tmp_path, smollm2):
    """Virtual searchers in one process and searcher ranks under torchrun give the same rollouts, rewards,
    losses and final weights: exactly with one trainer rank, within float32 tolerance with an FSDP2 group of
    two (AdamW moves a weight whose gradient is at float noise by up to lr a step, either way). SIGKILL, then
    --resume auto: the same metrics as the unbroken run, in one process and under torchrun."""
    save_tiny_model(tmp_path / "model", "qwen2", smollm2[1], seed=0)
    rows, weights = {}, {}
    for name, procs in (("one", 0), ("three", 3), ("four", 4)):
        run = tba_run(tmp_path, name, procs, "--export-hf", str(tmp_path / name / "export"))
        assert run.returncode == 0, run.stderr[-3000:]
        rows[name] = [{k: v for k, v in r.items() if k not in TIMING} for r in step_rows(tmp_path / name)]
        weights[name] = load_file(tmp_path / name / "export" / "model.safetensors")
    one, three, four = rows["one"], rows["three"], rows["four"]
    assert [r["step"] for r in one] == [0, 1, 2, 3] and one[-1]["grad_norm"] > 0
    assert one[-1]["staleness_max"] == 1 and one[0]["staleness_max"] == 0 and one[-1]["buffer"] > one[0]["buffer"]
    assert one == three and all(torch.equal(weights["one"][k], weights["three"][k]) for k in weights["one"])
    for a, b in zip(one, four):
        assert a["step"] == b["step"] and a["buffer"] == b["buffer"] and a["staleness_max"] == b["staleness_max"]
    assert math.isclose(one[0]["loss"], four[0]["loss"], rel_tol=1e-4, abs_tol=1e-6)
    for name in weights["one"]:
        assert ((weights["one"][name] - weights["four"][name]).abs() <= 2 * 1e-3 * 4 + 1e-6).all(), name

    for name, procs in (("one", 0), ("three", 3)):
        out = tmp_path / f"{name}-resumed"
        # killed once the checkpoint of sync 2 (after step 1) exists, then resumed from it
        killed = subprocess.Popen(tba_command(tmp_path, out.name, procs, "--save-every", "2"), cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                  env=ONE_THREAD)
        deadline = time.time() + HANG_GUARD
        while not (out / "checkpoints" / "step_000001").is_dir() and time.time() < deadline:
            time.sleep(0.1)
        os.killpg(killed.pid, 9)  # SIGKILL to every process of the run
        killed.wait()
        assert not (out / "checkpoints" / "step_000003").exists()
        resumed = tba_run(tmp_path, out.name, procs, "--save-every", "2", "--resume", "auto")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        again = [{k: v for k, v in r.items() if k not in TIMING} for r in step_rows(out)]
        assert [r["step"] for r in again] == [0, 1, 2, 3] and again == rows[name]


def test_async_ppo_takes_the_samplers_logprobs_as_pi_old():
    """--loss ppo with searchers: the ratio is pi / pi_sampler (stale weights), so a sampler that gave each
    token e^-1 of the trainer's probability clips every token of a positive advantage; synchronously, pi_old is
    the trainer's own (detached), the ratio 1, nothing clipped."""
    seqs, prompt_lens = grouped_sequences(seed=4)
    keys = {}
    group = torch.tensor([keys.setdefault(tuple(s[:p]), len(keys)) for s, p in zip(seqs, prompt_lens)])
    rewards = torch.tensor([float(i % 2) for i in range(len(seqs))])
    clipped = {}
    for searchers in (0, 2):
        policy = trainer.Policy(tiny_model("llama", seed=6))
        with torch.no_grad():
            logp = trainer.response_logprobs(policy, seqs, prompt_lens, 1.0, torch.float32)[0]
        per_response = list(logp.split([len(s) - p for s, p in zip(seqs, prompt_lens)]))
        batch = trainer.Batch(seqs, prompt_lens, group, rewards, [x - 1.0 for x in per_response],
                              [torch.zeros_like(x) for x in per_response], torch.ones(len(seqs), dtype=torch.bool), {})
        cfg = train.Config(loss="ppo", searchers=searchers, prompts_per_step=3, rollouts_per_prompt=3)
        stats = trainer.train_on_batch(cfg, policy, None, torch.optim.AdamW(policy.parameters(), lr=0.0), batch, 1.0,
                                       torch.float32)
        clipped[searchers] = stats["clip_frac"]
    assert clipped[0] == 0 and clipped[2] > 0


def test_tba_bad_input_is_one_sentence():
    cases = [(dict(searchers=2, sync_every=0), "--sync-every 0 must be at least 1"),
             (dict(searchers=2, fresh_prob=1.5), "--fresh-prob 1.5 is a probability"),
             (dict(searchers=2, replay_capacity=4), "--replay-capacity 4 is below --rollouts-per-prompt 8"),
             (dict(searchers=2, sync_every=3, max_staleness=4), "--max-staleness 4 would drop fresh rounds"),
             (dict(searchers=2, kl_coef=0.1), "async PPO has no per-token reference logprobs")]
    for flags, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            train.Config(**flags)
    with pytest.raises(SystemExit, match="--searchers 3 leaves no trainer among 3 processes"):
        cluster.check_world_size(train.Config(searchers=3, loss="tb"), 3)
