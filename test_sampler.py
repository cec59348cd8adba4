"""The sampler (rollout.py, forward.py, scheduler.py) against HF transformers and its own contract (DESIGN.md,
Sampler contract); the models and helpers the other test files share. Run by test_all.py."""

import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

import search
import collect
import trainer
from forward import ModelConfig, linear
from kernels.sampling import hash32, reference_sample, sample_keys
from kernels.test_kernels import DEVICE, random_prompts, tiny_config, tiny_model
from rollout import Sampler, graph_key, nucleus
from scheduler import DecodeBatch


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
    # a prompt that asks for no rollouts (a count of 0 is allowed) is not held to the budget: it is never run
    skipped = sampler.generate([[1] * 100, [3, 4]], [0, 2], 4, seed=1)
    assert skipped.prompt_index == [1, 1] and skipped.tokens == sampler.generate([[3, 4]], [2], 4, seed=1,
                                                                                  prompt_keys=[1]).tokens


def test_prefill_pads_a_batch_by_less_than_half():
    """Prompts prefill right-padded in one batch; one long prompt among short ones would multiply its work (and memory)
    by the batch size: a batch is padded by under half of it, and the tokens are those of each prompt alone."""
    model = tiny_model("llama", seed=2)
    sampler = Sampler(ModelConfig.from_hf(model.config), model.state_dict(), "cpu", dtype=torch.float32)
    prompts = random_prompts(256, [12] * 9 + [300] + [14] * 6 + [40, 31], seed=5)
    shapes, prefill = [], sampler.prefill
    sampler.prefill = lambda ps, blocks: shapes.append([len(p) for p in ps]) or prefill(ps, blocks)
    together = sampler.generate(prompts, [1] * len(prompts), 3, seed=7)
    assert sorted(n for shape in shapes for n in shape) == sorted(map(len, prompts)) and len(shapes) > 2
    assert all(len(shape) * max(shape) <= 2 * sum(shape) for shape in shapes)
    assert max(len(shape) for shape in shapes if 300 in shape) <= 2  # not with the 12 and 14-token ones
    assert together.tokens == [sampler.generate([p], [1], 3, seed=7, prompt_keys=[i]).tokens[0]
                               for i, p in enumerate(prompts)]


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
    assert 0 < together.finish_reason.count("stop") < len(together.tokens)  # rollouts of different lengths
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


# ---- decode graphs, a tied head (FANOUT_TEST_DEVICE=cuda: ./run.sh gpu-check runs these on a GPU) ----

def test_graph_key_holds_every_shape_but_not_the_temperature():
    """A captured step is fixed to its inputs' shapes: a block table as wide as a longer request needs (its
    width follows max_new_tokens) is another graph; a new temperature is not (the graph reads it at replay)."""
    rows = lambda *shape, dtype=torch.int32: torch.zeros(*shape, dtype=dtype)
    b = DecodeBatch(rows(4, dtype=torch.long), rows(4, dtype=torch.long), rows(4, dtype=torch.long),
                    rows(4, dtype=torch.long), rows(4), rows(4, 1), rows(2), rows(2), rows(2), rows(2, 3), 1, 2)
    wider = DecodeBatch(**{**vars(b), "block_table": rows(4, 3)})
    assert graph_key(b, 1.0) != graph_key(wider, 1.0)
    assert graph_key(b, 1.0) == graph_key(b, 0.7) != graph_key(b, 0.0)


def test_decode_graphs_survive_steps_lengths_and_temperatures():
    """Graphed decoding (padded steps; on a CPU run eagerly) gives the eager sampler's rollouts through requests
    of other lengths and temperatures, with release_kv between them as a run's steps do; on a GPU a request of
    shapes seen before captures nothing again, whatever its temperature."""
    model = tiny_model("qwen2", seed=3).to(DEVICE)
    shapes, weights = ModelConfig.from_hf(model.config), model.state_dict()
    prompts = random_prompts(256, [7, 21], seed=2)
    graphed = Sampler(shapes, weights, DEVICE, dtype=torch.float32, cuda_graphs=True)
    eager = Sampler(shapes, weights, DEVICE, dtype=torch.float32, cuda_graphs=False)
    captures = []
    for max_new, temperature in ((8, 1.0), (8, 1.0), (40, 1.0), (8, 0.7), (8, 0.0)):
        want, got = (s.generate(prompts, [3, 2], max_new, temperature, seed=5) for s in (eager, graphed))
        assert got.tokens == want.tokens
        for a, b in zip(got.logprobs + got.entropies, want.logprobs + want.entropies):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        graphed.release_kv()
        captures.append(len(graphed.graphs))
    if DEVICE == "cuda":
        assert graphed.cuda_graphs and captures[1] == captures[0] > 0 and captures[3] == captures[2] > captures[1]
        assert captures[4] > captures[3]  # greedy decoding is another graph
    else:
        assert captures == [0] * 5


def test_a_tied_head_is_held_and_handed_over_once():
    """A tied LM head is the embedding: the sampler holds it once, the broadcast carries it once, and a change to
    the embedding reaches the head through the hand-off; an untied head is a tensor of its own."""
    lm = tiny_model("qwen2", seed=1).to(DEVICE)
    sampler = Sampler(ModelConfig.from_hf(lm.config), lm.state_dict(), DEVICE, dtype=torch.float32)
    assert lm.config.tie_word_embeddings and "lm_head.weight" not in sampler.weights
    names = search.handoff_names(lm, sampler)
    assert sum(sampler.weights[n].numel() for n in names) == sum(p.numel() for p in lm.parameters())  # each once
    with torch.no_grad():
        lm.model.embed_tokens.weight.mul_(1.5)
    trainer.sync_sampler(sampler, lm)
    prompt = random_prompts(256, [11], seed=4)[0]
    with torch.no_grad():
        want = lm(torch.tensor([prompt], device=DEVICE)).logits[0, -1]
    sampler.generate([prompt], [1], 1, temperature=0.0)
    torch.testing.assert_close(sampler.prefill([prompt], [list(range(2))])[0], want, atol=1e-4, rtol=1e-4)
    untied = tiny_model("llama", seed=1)
    assert "lm_head.weight" in Sampler(ModelConfig.from_hf(untied.config), untied.state_dict(), "cpu").weights


def test_the_hand_off_writes_every_sampler_tensor():
    """A sampler tensor the trained model does not have (a renamed parameter) would keep its first value unseen:
    the hand-off names it instead."""
    lm = tiny_model("llama", seed=2)
    sampler = Sampler(ModelConfig.from_hf(lm.config), lm.state_dict(), "cpu", dtype=torch.float32)
    sampler.weights["model.layers.0.mlp.renamed.weight"] = sampler.weights.pop("model.layers.0.mlp.up_proj.weight")
    with pytest.raises(RuntimeError, match="has no model.layers.0.mlp.renamed.weight"):
        trainer.sync_sampler(sampler, lm)



@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_compiled_prepacked_decode_samples_the_eager_tokens(kind):
    """The compiled path (on a CPU each layer and the sampling compiled; on a GPU the
    layers compiled, under the CUDA graphs) samples the eager path's tokens in float32: rows finishing at random
    stops change the batch's shape between steps, sampled and greedy, at a temperature handed in as a tensor."""
    model = tiny_model(kind, seed=5)
    config, weights = ModelConfig.from_hf(model.config), model.state_dict()
    eager = Sampler(config, weights, DEVICE, dtype=torch.float32, compiled=False)
    fast = Sampler(config, weights, DEVICE, dtype=torch.float32, compiled=True)
    assert fast.compiled and not eager.compiled and eager.forward_weights() is eager.layered
    assert not any(n.endswith(".packed") for n in fast.forward_weights()["layers"][0])  # bf16's alone
    prompts, lengths = random_prompts(256, [7, 30, 12], seed=int(torch.randint(1000, (1,)))), []
    for temperature in (1.0, 0.0):
        kwargs = dict(max_new_tokens=20, temperature=temperature, stop_token_ids=list(range(0, 256, 16)), seed=2)
        want, got = (s.generate(prompts, [3, 1, 4], **kwargs) for s in (eager, fast))
        assert got.tokens == want.tokens and got.finish_reason == want.finish_reason
        for a, b in zip(got.logprobs + got.entropies, want.logprobs + want.entropies):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        lengths.append({len(t) for t in want.tokens})
    assert len(lengths[0]) > 1  # sampled rows left at different steps


def test_prepacked_weights_follow_every_weight_sync():
    """The bf16 products' prepacked weights compute F.linear, and are packed again whenever the sampler's weights
    change (the hand-off writes them in place every step): after a sync from another model the sampler samples
    what one built from that model samples, never the old weights' tokens."""
    old, new = tiny_model("qwen2", seed=1), tiny_model("qwen2", seed=2)
    config = ModelConfig.from_hf(old.config)
    fast = Sampler(config, old.state_dict(), "cpu", dtype=torch.bfloat16, compiled=True)
    layer, x = fast.forward_weights()["layers"][0], torch.randn(5, config.hidden_size, dtype=torch.bfloat16)
    torch.testing.assert_close(linear(layer, x, "mlp.gate_proj"), F.linear(x, layer["mlp.gate_proj.weight"]))
    prompts = random_prompts(256, [9, 14], seed=3)
    kwargs = dict(max_new_tokens=12, temperature=1.0, seed=1)
    before = fast.generate(prompts, [2, 2], **kwargs)
    trainer.sync_sampler(fast, new)
    after = fast.generate(prompts, [2, 2], **kwargs)
    for model, got in ((old, before), (new, after)):
        assert got.tokens == Sampler(config, model.state_dict(), "cpu", dtype=torch.bfloat16, compiled=True).generate(
            prompts, [2, 2], **kwargs).tokens
    assert after.tokens != before.tokens


def test_compiled_sampler_keeps_a_kernel_cache_per_vector_isa(monkeypatch, tmp_path):
    """inductor's disk cache is not keyed on the vector ISA, and kernels written for AVX2 overrun their buffers when a
    process with AVX-512 loads them: each ISA (which ATEN_CPU_CAPABILITY can lower) compiles into its own folder."""
    model = tiny_model("llama", seed=3)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    for _ in range(2):  # a second sampler in the process keeps the folder
        assert Sampler(ModelConfig.from_hf(model.config), model.state_dict(), "cpu", compiled=True).compiled
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / torch.backends.cpu.get_cpu_capability())


def test_without_a_compiler_the_sampler_decodes_eagerly(monkeypatch):
    """No C++ compiler: one warning, and the sampler runs eagerly with the same tokens."""
    from torch._inductor import config as inductor_config, cpp_builder
    model = tiny_model("llama", seed=3)
    config, weights = ModelConfig.from_hf(model.config), model.state_dict()
    prompts = random_prompts(256, [6, 11], seed=2)
    want = Sampler(config, weights, "cpu", dtype=torch.float32, compiled=False).generate(prompts, [2, 1], 8, seed=4)
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-c++",))
    cpp_builder.cpp_compiler_search.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no C.. compiler found"):
            sampler = Sampler(config, weights, "cpu", dtype=torch.float32, compiled=True)
    finally:
        cpp_builder.cpp_compiler_search.cache_clear()
    assert not sampler.compiled and sampler.layer.__name__ == "decoder_layer"
    assert sampler.generate(prompts, [2, 1], 8, seed=4).tokens == want.tokens
