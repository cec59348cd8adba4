"""The config's rules (config.py: one sentence naming the flag and the fix), a model fanout cannot run, and the
processes' set-up (cluster.py: the CPU's compute dtype and threads, prompts over ranks). Run by test_all.py."""

import dataclasses
import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
import transformers

import cluster
import config
import reward
import train
from test_sampler import save_tiny_model


@pytest.mark.parametrize("fields, message", [
    (dict(adv="ppo"), "--adv ppo is unknown"),
    (dict(loss="dpo"), "--loss dpo is unknown"),
    (dict(aggregate="sum"), "--aggregate sum is unknown"),
    (dict(eps_low=0.3, eps_high=0.2), "--eps-high 0.2 is below --eps-low 0.3"),
    (dict(adam_eps=0.0), "--adam-eps 0.0 must be positive"),
    (dict(dual_clip=0.5), "--dual-clip 0.5 must be 0 (off) or above 1"),
    (dict(eps_low=1.0, eps_high=1.2), "--eps-low 1.0 must be in [0, 1)"),
    (dict(tis_cap=-2.0), "--tis-cap -2.0 must be 0 (off)"),
    (dict(kl_kind="k4"), "--kl-kind k4 is unknown"),
    (dict(loss="tb", tb_beta_start=-0.01), "--tb-beta-start -0.01 must be above 0"),
    (dict(loss="tb", kl_coef=0.1), "--loss tb weighs its KL by --tb-beta-start/end"),
    (dict(loss="tb", kl_in_reward=True), "--loss tb weighs its KL by --tb-beta-start/end"),
    (dict(loss="tb", entropy_coef=0.01), "--loss tb weighs its KL by --tb-beta-start/end"),
    (dict(loss="tb", tis_cap=2.0), "--loss tb weighs its KL by --tb-beta-start/end"),
    (dict(loss="tb", dual_clip=3.0), "--loss tb weighs its KL by --tb-beta-start/end"),
    (dict(updates_per_step=0), "--updates-per-step 0 must be at least 1"),
    (dict(score_workers=-1), "--score-workers -1 must be at least 0"),
    (dict(echo_coef=1e-3, success=2.0), "--success 2.0: rewards are at most 1"),
    (dict(echo_mode="some"), "--echo-mode some is unknown"),
    (dict(budget_min=10, budget_max=6), "--budget-min 10 is above --budget-max 6"),
    (dict(budget_min=10, budget_max=12), "--rollouts-per-prompt 8 is outside --budget-min 10 .. --budget-max 12"),
    (dict(rollouts_per_prompt=14, budget_min=4, budget_max=12), "--rollouts-per-prompt 14 is outside --budget-min 4"),
    (dict(budget_min=0, budget_max=12), "--budget-min 0 must be at least 1"),
    (dict(temperature_control=True, tau_min=2.0, tau_max=0.5), "--tau-min 2.0 and --tau-max 0.5"),
    (dict(temperature_control=True, tau_min=0.0), "--tau-min 0.0 and --tau-max 2.0 must satisfy 0 < min <= max"),
    (dict(temperature_control=True, temperature=3.0), "--temperature 3.0 is outside --tau-min 0.5 .. --tau-max 2.0"),
    (dict(temperature_control=True, temperature=0.2), "--temperature 0.2 is outside --tau-min 0.5"),
    (dict(max_gen_rounds=0), "--max-gen-rounds 0 must be at least 1"),
    (dict(dtype="float16"), "--dtype float16 is unknown"),
    (dict(top_p=0.0), "--top-p 0.0 is outside (0, 1]"),
    (dict(temperature=-1.0), "--temperature -1.0: training samples above 0"),
    (dict(temperature=0.0), "at 0 a prompt's rollouts are all its greedy one"),  # nothing to learn, said nothing
    (dict(temperature=-1.0, steps=0), "--temperature -1.0: training samples above 0"),
    (dict(max_new_tokens=0), "--max-new-tokens 0 must be at least 1"),
    (dict(eval_samples=0), "--eval-samples 0 must be at least 1"),
    (dict(rollouts_per_prompt=-2), "--rollouts-per-prompt -2: a group of one has no baseline"),
    (dict(rollouts_per_prompt=1), "--rollouts-per-prompt 1: a group of one has no baseline, so no advantage"),
    (dict(prompts_per_step=0), "--prompts-per-step 0 must be at least 1"),
    (dict(warmup_steps=-2, lr_schedule="warmup"), "--warmup-steps -2 must be at least 0"),  # else gradient ascent
    (dict(lr=-1e-5), "--lr -1e-05 must be at least 0"),
    (dict(save_every=-1), "--save-every -1 must be at least 0"),
    (dict(steps=-5), "--steps -5 must be at least 0"),
    (dict(entropy_coef=-0.01), "--entropy-coef -0.01 must be at least 0"),  # else silently off (> 0 gates it)
    (dict(kl_coef=-0.1), "--kl-coef -0.1 must be at least 0"),
    (dict(grad_clip=-1.0), "--grad-clip -1.0 must be at least 0"),
    (dict(lr=float("inf")), "--lr inf is not a finite number"),  # else training goes to NaN, saying nothing
    (dict(lr=float("nan")), "--lr nan is not a finite number"),
    (dict(adam_eps=float("inf")), "--adam-eps inf is not a finite number"),  # else no update at all
    (dict(warmup_steps=50), "--warmup-steps 50 does nothing with --lr-schedule constant"),  # else full lr at step 0
    (dict(lr_schedule="warmup"), "--lr-schedule warmup needs --warmup-steps above 0"),
    (dict(replay_inv_temp=float("inf"), searchers=2), "--replay-inv-temp inf is not a finite number"),
    (dict(seed=2**43), f"--seed {2**43} is outside 0 .. 2^32 - 1"),  # else an int64 overflow at the first step
    (dict(seed=-1), "--seed -1 is outside 0 .. 2^32 - 1"),
    # every prompt the same text, a KeyError at the first prompt, or a stray brace: each refused before the run
    (dict(prompt_template="What is 2+2?"), "must hold {question}"),
    (dict(prompt_template="Q: {question} in {format}"), "and no other field"),
    (dict(prompt_template='Reply as {"answer": N} to {question}'), "write a literal brace twice"),
    (dict(prompt_template="{question} }"), "must hold {question}")])
def test_bad_config_is_one_sentence(fields, message):
    """Every rule, checked once, in config.py: a Config that breaks one raises the sentence that names it."""
    with pytest.raises(ValueError, match=re.escape(message)):
        config.Config(**fields)


def test_a_model_fanout_cannot_run_is_one_sentence(tmp_path, smollm2):
    """Refused at set-up, before any sampling: a tokenizer with no chat template (most base models), weights missing,
    a model the sampler does not compute (GPT-2's config even lacks the sizes the dtype probe reads first)."""
    tok = smollm2[1]
    for name in ("no_template", "no_weights", "gelu"):
        save_tiny_model(tmp_path / name, "llama", tok, seed=0)
    (tmp_path / "no_weights" / "model.safetensors").unlink()
    settings = json.loads((tmp_path / "no_template" / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (tmp_path / "no_template" / "tokenizer_config.json").write_text(json.dumps(settings))
    (tmp_path / "no_template" / "chat_template.jinja").unlink(missing_ok=True)
    settings = json.loads((tmp_path / "gelu" / "config.json").read_text())
    (tmp_path / "gelu" / "config.json").write_text(json.dumps({**settings, "hidden_act": "gelu"}))
    gpt2 = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok))
    transformers.GPT2LMHeadModel(gpt2).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    for name, message in [("no_template", "its tokenizer has no chat template"), ("no_weights", "cannot be loaded"),
                          ("gelu", "hidden_act 'gelu' is not supported"), ("gpt2", "model type 'gpt2' is not")]:
        with pytest.raises(SystemExit, match=message):
            train.main(config.Config(model=str(tmp_path / name), task="rg:chain_sum", task_size=20, eval_prompts=2,
                                     out_dir=str(tmp_path / "out")))


def test_a_prompt_the_kv_budget_or_the_context_cannot_hold_is_refused_at_set_up(tmp_path, smollm2):
    """Found before the first step, not at whichever step draws it (or never, if no step does): the KV budget, and
    the model's context (the tiny model's 512 positions)."""
    save_tiny_model(tmp_path / "model", "llama", smollm2[1], seed=0)
    rows = [{"question": f"{i} + 1", "answer": str(i + 1)} for i in range(20)]
    rows[13]["question"] = "1 + " * 100 + "1"  # some 330 tokens, one row of 20
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = config.Config(model=str(tmp_path / "model"), task=str(tmp_path / "data.jsonl"), eval_prompts=2,
                        kv_budget_tokens=256, steps=0, out_dir=str(tmp_path / "out"))
    with pytest.raises(SystemExit, match=r"the longest prompt of --task and the eval set \(\d+ tokens\) plus "):
        train.main(cfg)
    cfg = dataclasses.replace(cfg, kv_budget_tokens=1024)
    with pytest.raises(SystemExit, match=r"plus --max-new-tokens 200 is past the model's context \(512\)"):
        train.main(dataclasses.replace(cfg, max_new_tokens=200))
    assert not (tmp_path / "out").exists()
    train.main(cfg)  # where it fits, the run goes on


def test_a_prompt_template_may_hold_literal_braces():
    cfg = config.Config(prompt_template='{question} Reply as {{"answer": N}}.')
    assert cfg.prompt_template.format(question="2+2?") == '2+2? Reply as {"answer": N}.'


def test_every_preset_is_a_valid_config():
    for name, (_, preset) in config.PRESETS.items():
        assert config.parse_config([name]) == preset, name
    assert config.parse_config([]) == config.parse_config(["demo"])


def test_tba_bad_input_is_one_sentence():
    cases = [(dict(searchers=2, sync_every=0), "--sync-every 0 must be at least 1"),
             (dict(searchers=2, fresh_prob=1.5), "--fresh-prob 1.5 is a probability"),
             (dict(searchers=2, replay_capacity=4), "--replay-capacity 4 is below --rollouts-per-prompt 8"),
             (dict(searchers=2, sync_every=3, max_staleness=4), "--max-staleness 4 would drop fresh rounds"),
             (dict(searchers=2, kl_coef=0.1), "--kl-coef and --tis-cap cannot work in async PPO"),
             (dict(searchers=2, tis_cap=2.0), "--kl-coef and --tis-cap cannot work in async PPO"),
             (dict(searchers=2, loss="tb", ref_reset_every=50), "EchoRL and reference resets are synchronous only")]
    for flags, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            config.Config(**flags)
    with pytest.raises(SystemExit, match="--searchers 3 leaves no trainer among 3 processes"):
        cluster.make_roles(config.Config(searchers=3, loss="tb"), 0, 3)


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


@pytest.mark.parametrize("cores", [2, 16])
def test_threads_follow_the_load(monkeypatch, cores):
    """One thread fewer once the main thread waited for a CPU over a quarter of the time it ran since the last call
    (another process holds a core), all of them again once the CPUs stood idle half the time; before any history, a
    moment of products makes one. OMP_NUM_THREADS, not following, or no /proc keeps them all."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(cluster, "physical_cores", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    read = []  # what cpu_times returns, call by call: seconds ran, waited, idle, and when

    def times():
        return dict(zip(("ran", "waited", "idle", "at"), read.pop(0)))
    try:
        monkeypatch.setattr(cluster, "LOAD", None)
        monkeypatch.setattr(cluster, "cpu_times", times)
        read += [(0, 0, 0, 0), (1, 0.375, 0, 2)]  # first call: around the products, waiting 0.375 s of 1
        assert cluster.set_threads(follow_load=True) == cores - 1 == torch.get_num_threads() and not read
        for ran, waited, idle, expected in ((2, 0.5, 0.5, cores - 1),  # one fewer, CPUs idle 0.5 s of 2: stay
                                            (3, 0.625, 1.75, cores),  # idle 1.25 s of 2: all again
                                            (4, 0.9375, 1.75, cores - 1),  # waited 0.3125 s of 1: over a quarter
                                            (5, 1.1875, 2.75, cores)):  # a quarter exactly, idle half: all
            read.append((ran, waited, idle, 2 * ran))  # 2 s apart, the main thread running 1 s of them
            assert cluster.set_threads(follow_load=True) == expected == torch.get_num_threads()
        read.append((6, 5, 2.75, 12))
        assert cluster.set_threads() == cores  # not following
        monkeypatch.setattr(cluster, "cpu_times", dict)  # no /proc: nothing to go by, and no products each call
        monkeypatch.setattr(torch, "randn", None)
        torch.set_num_threads(cores - 1)
        assert cluster.set_threads(follow_load=True) == cores and cluster.LOAD == {}
        assert cluster.set_threads(follow_load=True) == cores
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert cluster.set_threads(follow_load=True) == 3
    finally:
        torch.set_num_threads(threads)


def test_cpu_times_count_the_main_threads_time_and_idle_cpus():
    before = cluster.cpu_times()
    a = torch.randn(256, 256)
    for _ in range(200):
        a @ a  # on every thread
    after = cluster.cpu_times()
    assert set(before) == set(after) == {"ran", "waited", "idle", "at"}
    assert 0 < after["ran"] - before["ran"] <= after["at"] - before["at"] + 0.01  # one thread's time
    assert after["waited"] >= before["waited"] and after["idle"] >= before["idle"]


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
        cluster.make_roles(config.Config(prompts_per_step=6), 0, 4)
