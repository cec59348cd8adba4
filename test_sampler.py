"""The sampler (rollout.py, forward.py, scheduler.py) against HF transformers and its own contract (DESIGN.md,
Sampler contract); the models and helpers the other test files share. Run by test_all.py."""

import re
from pathlib import Path

import pytest
import torch
import transformers

import collect
from forward import ModelConfig
from kernels.sampling import hash32, reference_sample, sample_keys
from kernels.test_kernels import random_prompts, tiny_config, tiny_model
from rollout import Sampler, nucleus


ROOT = Path(__file__).parent
# Limit on any one subprocess or wait: there to catch a hang, not to time the code. A run that takes 3.5 min
# alone took 3x that with two CPU-bound jobs beside the suite on 2 cores; 30 min passes a loaded machine.
HANG_GUARD = 1800


# ---- models used by several tests ----

def hf_greedy(model, prompt, max_new_tokens, eos):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def save_tiny_model(path: Path, kind: str, tokenizer, seed: int) -> str:
    """A small random model with the real tokenizer, saved as a local HF directory."""
    cfg = tiny_config(kind)
    cfg.vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# ---- the sampler ----


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
