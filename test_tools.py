"""Multi-turn tool rollouts (tools.py, scheduler.py): a call's detection and framing, the turn fed into the rollout's
own KV (only the new tokens), log-probs against HF over the whole conversation, the mask in the loss and on the
searchers' wire. Run by test_all.py."""

import pytest
import torch

import collect
import config
import reward
import scheduler
import search
import train
import trainer
from rollout import ModelConfig, Rollouts, Sampler
from tools import TRUNCATED, Tools, call_code, framing
from kernels.test_kernels import tiny_model
from loss import kl as kl_estimate


@pytest.mark.parametrize("text, code", [
    ("Let me run it.\n```python\nprint(6 * 7)\n```", "print(6 * 7)\n"),
    ("```py\nx = 1\n```\n", "x = 1\n"),
    ("```\nprint(2)\n```", "print(2)\n"),
    ("```python\nprint(6 * 7)\n", None),                 # not closed yet
    ("```python\nprint(1)\n``` and then", None),          # closed earlier, the turn goes on
    ("```bash\nls\n```", None),                           # not Python
    ('<tool_call>{"name": "python", "arguments": {"code": "print(3)"}}</tool_call>', "print(3)"),
])
def test_a_call_is_a_python_block_closed_at_the_end_of_the_turn(text, code):
    assert call_code(text) == code


def test_a_malformed_tool_call_runs_as_an_error_the_model_reads():
    assert call_code("<tool_call>{not json}</tool_call>").startswith("raise ValueError(")


class ScriptedTools(Tools):
    """The real framing, sandbox and limits, with a call once the model's turn has `every` tokens, each running
    `script` (a small model seldom writes one)."""

    def __init__(self, tokenizer, cfg, every: int, script: str):
        super().__init__(tokenizer, cfg)
        self.every, self.script = every, script
        self.closing_ids = torch.ones(len(tokenizer), dtype=torch.bool)

    def code(self, turn):
        return self.script if len(turn) >= self.every else None


def chat(tok, question: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)


def tool_spans(mask: torch.Tensor) -> list[tuple[int, int]]:
    spans, start = [], None
    for t, m in enumerate(mask.tolist() + [True]):
        if not m and start is None:
            start = t
        elif m and start is not None:
            spans.append((start, t))
            start = None
    return spans


def multi_turn(smollm2, kv_budget_tokens=1 << 14, max_new_tokens=72):
    model, tok = smollm2
    cfg = config.Config(max_tool_calls=2, max_tool_output_tokens=12, max_new_tokens=max_new_tokens)
    tools = ScriptedTools(tok, cfg, every=6, script="print(list(range(40)))")
    prompts = [chat(tok, "What is 6 x 7?"), chat(tok, "Name a prime number and say why it is one.")]
    s = Sampler(ModelConfig.from_hf(model.config), model.state_dict(), dtype=torch.float32,
                kv_budget_tokens=kv_budget_tokens)
    r = s.generate(prompts, [3, 2], cfg.max_new_tokens, 1.0, stop_token_ids=[tok.eos_token_id], seed=3, tools=tools)
    return tools, prompts, s, r


def test_multi_turn_rollouts_are_token_exact_and_match_hf_over_the_whole_sequence(smollm2):
    """On SmolLM2's tokenizer and chat template: each tool turn holds the template's framing around the sandbox's
    output (cut at the cap, marked); the sampler's and the trainer's log-probs equal an HF forward over prompt +
    every turn at the model's tokens; only new tokens were fed (each prompt once, each token once)."""
    model, tok = smollm2
    tools, prompts, s, r = multi_turn(smollm2)
    output = tools.tokenize("[" + ", ".join(map(str, range(40))) + "]\n")[:12] + tools.tokenize(TRUNCATED)
    assert sum(r.tool_calls) >= 4 and not any(r.tool_errors)
    for tokens, mask, calls in zip(r.tokens, r.masks, r.tool_calls):
        spans = tool_spans(mask)
        assert len(spans) == calls and all(tokens[a:b] == tools.before + output + tools.after for a, b in spans)
        assert all(b < len(tokens) for _, b in spans)  # the model writes after every tool turn
    sequences = [prompts[p] + t for p, t in zip(r.prompt_index, r.tokens)]
    prompt_lens = [len(prompts[p]) for p in r.prompt_index]
    with torch.no_grad():
        ours = trainer.response_logprobs(trainer.Policy(model), sequences, prompt_lens, 1.0, torch.float32)[0]
    ours = ours.split([len(t) for t in r.tokens])
    for seq, p, tokens, lp, mine, mask in zip(sequences, prompt_lens, r.tokens, r.logprobs, ours, r.masks):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, p - 1:-1].float().log_softmax(-1)
        hf = logits.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        torch.testing.assert_close(lp[mask], hf[mask], atol=2e-4, rtol=0)
        torch.testing.assert_close(mine[mask], hf[mask], atol=2e-4, rtol=0)
        assert (lp[~mask] == 0).all()
    assert s.stats["fed_tokens"] == sum(map(len, prompts)) + sum(len(t) - 1 for t in r.tokens)


def test_preempted_multi_turn_rollouts_give_the_same_tokens(smollm2):
    """A KV pool too small for all: rollouts waiting on tools are preempted too, and restart to the same tokens,
    their calls' outputs recorded. With 60 tokens a second turn cannot fit: a rollout ends ("length") at its call."""
    tools, _, _, whole = multi_turn(smollm2, max_new_tokens=60)
    _, _, s, squeezed = multi_turn(smollm2, kv_budget_tokens=16 * 12, max_new_tokens=60)
    assert s.stats["preemptions"] > 0
    cut = [t for t, reason in zip(whole.tokens, whole.finish_reason) if reason == "length" and len(t) < 60]
    assert cut and all(len(tool_spans(m)) == 1 for m in whole.masks)
    assert squeezed.tokens == whole.tokens and squeezed.tool_calls == whole.tool_calls
    assert all(torch.equal(a, b) for a, b in zip(squeezed.masks, whole.masks))


def test_each_rollout_keeps_its_own_mask_when_its_slot_is_reused(smollm2):
    """A finished rollout's mask is a copy of its own: with one slot every rollout decodes in the slot the one before
    left, and the masks (which differ: a call once the turn has 4 to 9 tokens) equal those of a run with a slot each."""
    model, tok = smollm2
    cfg = config.Config(max_tool_calls=2, max_tool_output_tokens=4, max_new_tokens=40)

    class VaryingTools(ScriptedTools):
        def code(self, turn):
            return self.script if len(turn) >= 4 + turn[0] % 6 else None

    tools = VaryingTools(tok, cfg, every=0, script="print(1)")
    prompts = [chat(tok, "What is 6 x 7?"), chat(tok, "Name a prime number.")]
    runs = [Sampler(ModelConfig.from_hf(model.config), model.state_dict(), dtype=torch.float32, max_slots=slots)
            .generate(prompts, [3, 2], 40, 1.0, stop_token_ids=[tok.eos_token_id], seed=5, tools=tools)
            for slots in (1024, 1)]
    assert runs[1].tokens == runs[0].tokens and len({tuple(m.tolist()) for m in runs[0].masks}) > 2
    assert all(torch.equal(a, b) for a, b in zip(runs[1].masks, runs[0].masks))


def test_a_rollout_takes_one_token_a_step(smollm2, monkeypatch):
    """A rollout back from its tool samples its next token from the turn's forward and is not decoded again in the
    same step (its blocks were reserved for that one; it may have finished)."""
    grew, step = [], scheduler.Generation.step

    def logged(self, rollouts):
        before = [(r, r.length) for r in rollouts]
        step(self, rollouts)
        grew.extend(r.length - n for r, n in before)

    monkeypatch.setattr(scheduler.Generation, "step", logged)
    assert sum(multi_turn(smollm2)[3].tool_calls) > 0 and max(grew) == 1


def test_the_trainer_gets_the_ids_sampled_and_the_verifier_the_models_words(smollm2, monkeypatch):
    model, tok = smollm2
    cfg = config.Config(max_tool_calls=1, max_tool_output_tokens=8, max_new_tokens=48, prompts_per_step=2,
                        rollouts_per_prompt=2, task="rg:basic_arithmetic", binary_reward=True)
    monkeypatch.setattr(collect, "Tools", lambda tokenizer, cfg, items: ScriptedTools(tokenizer, cfg, 5, "print(7)"))
    scored, sampled = [], []
    monkeypatch.setattr(reward, "score", lambda task, items, texts, *a, **k: scored.extend(texts) or
                        ([0.0] * len(texts), 0, 0))
    s = Sampler(ModelConfig.from_hf(model.config), model.state_dict(), dtype=torch.float32)
    generate = s.generate
    s.generate = lambda *a, **k: sampled.append(generate(*a, **k)) or sampled[-1]
    task = reward.load_task(cfg.task, 4, 0)
    batch, counts, _ = collect.sample_round(cfg, s, tok, task, [0, 1], [2, 2], 0, 1.0, 0, 0, 1)
    r = sampled[0]
    assert counts["tool_calls"] == sum(r.tool_calls) > 0
    for seq, p, tokens, mask, mine, text in zip(batch.sequences, batch.prompt_lens, r.tokens, r.masks, batch.masks,
                                                scored):
        assert seq[p:] == tokens and torch.equal(mask, mine)
        assert text == tok.decode([t for t, m in zip(tokens, mask.tolist()) if m], skip_special_tokens=True)
        assert "<|im_start|>tool" not in tok.decode([t for t, m in zip(tokens, mask.tolist()) if m])


def masked_step(cfg, masks, lengths, clips=None):
    n = len(lengths)
    seqs = [[1, 2] + [3] * L for L in lengths]
    batch = trainer.Batch(seqs, [2] * n, torch.tensor([0, 0, 1, 1][:n]), torch.tensor([1.0, 0.0, 0.0, 1.0][:n]),
                          [torch.randn(L) - 1 for L in lengths], [torch.rand(L) for L in lengths],
                          torch.ones(n, dtype=torch.bool), clips or {}, masks=masks)
    adv = trainer.global_advantages(cfg, batch.rewards, batch.group, batch.rl)
    tokens = sum(int(m.sum()) for m in masks)
    return trainer.Step(cfg, batch, lengths, adv, batch.rewards, torch.randn(n), 0.01, tokens, n, len(batch.clips))


@pytest.mark.parametrize("kw", [
    dict(loss="ppo", kl_coef=0.1, entropy_coef=0.01, tis_cap=2.0, dual_clip=3.0),
    dict(loss="ppo", aggregate="seq-mean-token-mean", kl_coef=0.1, kl_kind="k2"),
    dict(loss="ppo", aggregate="seq-mean-token-sum-norm", echo_coef=0.5),
    dict(loss="tb"),
])
def test_masked_tokens_change_nothing_in_the_loss_or_its_gradient(kw):
    """A tool's tokens: their log-probs (the policy's, pi_old's, pi_ref's, the sampler's) and entropies perturbed,
    the loss and every gradient stay the same, and no gradient reaches them."""
    torch.manual_seed(0)
    lengths = [5, 7, 4, 6]
    masks = [torch.rand(L) < 0.6 for L in lengths]
    for m in masks:
        m[0] = True
    cfg = config.Config(**kw)
    step = masked_step(cfg, masks, lengths, clips={0: 4, 3: 5} if cfg.echo_coef else None)
    mask = torch.cat(masks)
    logp, entropy, old, ref = (torch.randn(len(mask)) - 1 for _ in range(4))
    losses, grads = [], []
    for noise in (0.0, 3.0):
        bump = lambda x: torch.where(mask, x, x + noise * torch.randn(len(mask)))
        step.batch.sampler_logp = [torch.where(m, x, x + noise) for m, x in zip(masks, step.batch.sampler_logp)]
        lp, ent = bump(logp).requires_grad_(), bump(entropy).requires_grad_()
        loss = trainer.microbatch_loss(step, list(range(4)), lp, ent, bump(old), bump(ref), None, {
            k: 0.0 for k in ("loss", "clip_frac", "kl", "tis_weight", "echo_loss", "entropy", "forwarded", "z_n",
                             "z_sum", "z_squares")})
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([lp.grad, ent.grad if ent.grad is not None else torch.zeros_like(ent)]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and losses[0] != 0
    torch.testing.assert_close(grads[0], grads[1])
    assert (grads[0][:len(mask)][~mask] == 0).all() and (grads[0][:len(mask)][mask] != 0).any()


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_the_kl_penalty_adds_and_the_entropy_bonus_subtracts(kind):
    """ALGORITHMS.md 0: loss = policy loss + kl_coef x KL(pi || pi_ref) - entropy_coef x H, each a token mean over
    the model's tokens: against the same step without them, the loss moves by exactly those terms, either way."""
    torch.manual_seed(1)
    lengths = [5, 7, 4, 6]
    masks = [torch.rand(L) < 0.7 for L in lengths]
    mask = torch.cat(masks)
    logp, entropy, old, ref = (torch.randn(len(mask)) - 1 for _ in range(4))
    sums = dict.fromkeys(("loss", "clip_frac", "kl", "tis_weight", "echo_loss", "entropy", "forwarded"), 0.0)
    losses = {}
    for kl_coef, entropy_coef in ((0.0, 0.0), (0.3, 0.0), (0.0, 0.2)):
        cfg = config.Config(loss="ppo", kl_kind=kind, kl_coef=kl_coef, entropy_coef=entropy_coef)
        step = masked_step(cfg, masks, lengths)
        losses[kl_coef, entropy_coef] = trainer.microbatch_loss(step, list(range(4)), logp, entropy, old,
                                                                ref if kl_coef else None, None, dict(sums)).item()
    kl = kl_estimate(logp, ref, kind)[mask].mean().item()
    assert losses[0.3, 0.0] - losses[0.0, 0.0] == pytest.approx(0.3 * kl, rel=1e-5) and kl != 0
    assert losses[0.0, 0.2] - losses[0.0, 0.0] == pytest.approx(-0.2 * entropy[mask].mean().item(), rel=1e-5)


def test_the_searchers_wire_carries_the_mask(monkeypatch):
    """A searched round's rows hold each token's mask; the reference sum is over the model's tokens; the replay
    batch gets the mask back."""
    cfg = config.Config(loss="tb", searchers=1, prompts_per_step=1, rollouts_per_prompt=2, search_oversample=1.0,
                        max_new_tokens=8, sync_every=1)
    masks = [torch.tensor([1, 1, 0, 0, 1], dtype=torch.bool), torch.tensor([1, 1, 1], dtype=torch.bool)]
    tokens = [[5, 6, 7, 8, 9], [10, 11, 12]]
    rollouts = Rollouts([0, 0], [0, 1], tokens, [torch.full((len(t),), -1.0) for t in tokens],
                        [torch.ones(len(t)) for t in tokens], ["stop"] * 2, masks, [1, 0], [0, 0])
    monkeypatch.setattr(search, "generate_and_score", lambda *a, **k: (rollouts, torch.tensor([1.0, 0.0]), 0, 0, []))
    monkeypatch.setattr(search, "encode_prompts", lambda tok, template, items: [[1, 2, 3] for _ in items])
    ref = trainer.Policy(tiny_model("llama", seed=1))
    task = reward.Task("x.jsonl", [{"question": "q", "answer": "1"}])
    ints, floats, _ = search.search(cfg, type("S", (), {"release_kv": lambda self: None})(), ref, None, task, 0, 0,
                                    0, torch.float32)
    got = search.to_responses(ints, floats)
    with torch.no_grad():
        ref_logp = trainer.response_logprobs(ref, [[1, 2, 3] + t for t in tokens], [3, 3], 1.0, torch.float32)[0]
    for r, mask, t, ref_t in zip(got, masks, tokens, ref_logp.split([5, 3])):
        assert r["tokens"] == tuple(t) and torch.equal(r["mask"], mask)
        assert r["ref"] == pytest.approx(ref_t[mask].sum().item(), abs=1e-5)
    batch = train.replay_batch(cfg, [(0, True, got)], 0, 1, {0: [1, 2, 3]}, None, task)
    assert all(torch.equal(a, b) for a, b in zip(batch.masks, masks))


def test_a_call_that_raises_or_hangs_shows_its_error_and_a_long_output_is_cut(smollm2):
    _, tok = smollm2
    tools = Tools(tok, config.Config(max_tool_calls=1, max_tool_output_tokens=8, score_timeout=1.0))
    raised, hung, long = (tools.run(code, 0).result() for code in ("1 / 0", "while True: pass", "print('x ' * 500)"))
    assert not raised[1] and "ZeroDivisionError: division by zero" in raised[0] and "program_side" not in raised[0]
    assert not hung[1] and hung[0].endswith("TimeoutError: the code ran past 1 s\n")
    cut = tok.decode(tools.turn(long[0]))
    assert long[1] and cut.count("x") == 8 and TRUNCATED in cut
    framed = tools.turn(raised[0])
    assert framed[:len(tools.before)] == tools.before and framed[-len(tools.after):] == tools.after


def test_bad_tool_input_is_one_sentence(smollm2, monkeypatch):
    _, tok = smollm2
    with pytest.raises(ValueError, match=r"--max-new-tokens 40 .* raise it above") as e:
        Tools(tok, config.Config(max_tool_calls=1, max_tool_output_tokens=64, max_new_tokens=40))
    assert str(e.value).count(". ") == 0

    class NoTemplate:
        name_or_path = "plain"

        def apply_chat_template(self, *a, **k):
            raise ValueError("no chat template")
    with pytest.raises(ValueError, match="cannot frame a tool turn"):
        framing(NoTemplate())
    with pytest.raises(ValueError, match="--max-tool-calls -1 must be at least 0"):
        config.Config(max_tool_calls=-1)
    monkeypatch.setattr(reward, "check_sandbox", lambda: {"mode": "weak"})
    with pytest.raises(SystemExit, match="--max-tool-calls 2: the code sandbox is weak here"):
        train.load_tasks(config.Config(max_tool_calls=2, task_size=20, eval_prompts=4), 0)


def test_tool_turns_through_the_triton_kernels_give_the_torch_paths_tokens(smollm2, tmp_path):
    """A tool turn's forward runs the decode step's kernels (one row a token): the Triton ones (in the interpreter
    here, compiled on a GPU) give the torch path's tokens, turns and log-probs, on a small random model."""
    from test_sampler import save_tiny_model
    import transformers
    tok = smollm2[1]
    model = transformers.AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path, "llama", tok, seed=2),
                                                              dtype=torch.float32)
    cfg = config.Config(max_tool_calls=2, max_tool_output_tokens=6, max_new_tokens=40)
    prompts = [chat(tok, "What is 6 x 7?"), chat(tok, "Name a prime.")]
    runs = []
    for use_triton in (False, True):
        s = Sampler(ModelConfig.from_hf(model.config), model.state_dict(), dtype=torch.float32, use_triton=use_triton)
        runs.append(s.generate(prompts, [2, 1], cfg.max_new_tokens, 1.0, seed=5,
                               tools=ScriptedTools(tok, cfg, every=5, script="print(1)")))
    assert sum(runs[0].tool_calls) >= 3 and runs[0].tokens == runs[1].tokens
    assert all(torch.equal(a, b) for a, b in zip(runs[0].masks, runs[1].masks))
    for a, b in zip(runs[0].logprobs, runs[1].logprobs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
