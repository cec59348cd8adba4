"""Whole runs of train.py: the demo loop, every objective and exploration option, two ranks against one, resume
after SIGKILL, checkpoints and the export, TBA in one process and under torchrun. Run by test_all.py."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import collect
import config
import outputs
import train
import trainer
from forward import ModelConfig
from rollout import Sampler
from test_sampler import HANG_GUARD, ROOT, hf_greedy, save_tiny_model


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


def test_an_earlier_run_in_the_out_dir_is_kept_aside(tmp_path, smollm2):
    """A second run into the same --out-dir without --resume moves the first one's folder aside, whole: neither its
    metrics nor its checkpoints are overwritten, and a later --resume auto cannot pick up the first run's."""
    flags = [*tiny_run(tmp_path, smollm2), "--steps", "1", "--save-every", "1", "--out-dir", str(tmp_path / "out")]
    for seed in ("1", "2"):  # run from / (a container's usual working directory), where no folder has a parent
        run = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, "--seed", seed], cwd="/",
                             capture_output=True, text=True, timeout=HANG_GUARD)
        assert run.returncode == 0, run.stderr[-2000:]
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.")]
    assert len(kept) == 1 and f"it is now in {kept[0]}" in run.stdout
    for folder, seed in ((kept[0], 1), (tmp_path / "out", 2)):  # each run's own: told apart by their seeds
        assert (folder / "checkpoints" / "step_000000" / ".metadata").is_file()
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "step" in r] == [0]
    first, second = ((f / "samples.jsonl").read_text() for f in (kept[0], tmp_path / "out"))
    assert first != second
    # --resume auto that finds no checkpoint starts afresh, so the earlier run's logs are kept aside too
    (tmp_path / "logs_only").mkdir()
    (tmp_path / "logs_only" / "metrics.jsonl").write_text('{"run": "started"}\n')
    run = subprocess.run([sys.executable, "train.py", *flags, "--out-dir", str(tmp_path / "logs_only"), "--resume",
                          "auto"], cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("logs_only.")]
    assert run.returncode == 0 and len(kept) == 1, run.stderr[-2000:]
    assert (kept[0] / "metrics.jsonl").read_text() == '{"run": "started"}\n'
    # a folder that cannot be moved (here the working directory itself): one sentence, nothing touched
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, "--out-dir", "."], cwd=tmp_path / "out",
                         capture_output=True, text=True, timeout=HANG_GUARD)
    assert run.returncode != 0 and "holds a run that cannot be moved aside" in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and (tmp_path / "out" / "checkpoints" / "step_000000").is_dir()


def test_demo_loop_runs_end_to_end(tmp_path, smollm2, monkeypatch):
    """Two tiny steps on a small random model with the real tokenizer: metrics, eval rows (before, every step,
    after) with their completions, the plot; samples.jsonl holds what the sampler made and the rewards the trainer
    used (the trained batch's ids decoded again)."""
    save_tiny_model(tmp_path / "model", "llama", smollm2[1], seed=0)
    cfg = config.Config(model=str(tmp_path / "model"), task="rg:chain_sum?min_digits=1&max_digits=1", steps=2,
                        task_size=200, prompts_per_step=3, rollouts_per_prompt=3, max_new_tokens=6,
                        eval_prompts=4, eval_samples=2, eval_every=1, log_samples=2, out_dir=str(tmp_path / "out"),
                        lr=1e-3)
    batches, train_on_batch = [], train.train_on_batch
    monkeypatch.setattr(train, "train_on_batch", lambda cfg, model, ref, opt, batch, *a: batches.append(batch) or
                        train_on_batch(cfg, model, ref, opt, batch, *a))
    train.main(cfg)
    out, tok = tmp_path / "out", smollm2[1]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval" in r]
    assert [(r["eval"], r["eval_step"]) for r in evals] == [("before", 0), ("during", 1), ("after", 2)]
    steps = [r for r in rows if "step" in r]
    assert [r["step"] for r in steps] == [0, 1]
    for key in ("reward", "pass_rate", "entropy", "loss", "clip_frac"):
        assert all(math.isfinite(r[key]) for r in steps)
    for r in evals:
        assert r["eval_prompts"] == 4 and 0 <= r["avg@2"] <= r["pass@2"] <= 1 and 0 <= r["truncated_frac"] <= 1
        notes = [json.loads(line) for line in (out / f"eval_{r['eval_step']}.jsonl").read_text().splitlines()]
        assert len(notes) == 4 * 3 and sum(n["greedy"] for n in notes) == 4
        assert r["response_len"] > 0 and sum(n["finish"] == "length" for n in notes if not n["greedy"]) == \
            round(r["truncated_frac"] * 8)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 0, 1, 1]
    for s in samples:
        batch = batches[s["step"]]
        rows_ = [i for i, (seq, p) in enumerate(zip(batch.sequences, batch.prompt_lens))
                 if tok.decode(seq[:p]) == s["prompt"] and tok.decode(seq[p:], skip_special_tokens=True) ==
                 s["response"] and batch.rewards[i].item() == s["reward"]]
        assert rows_, s
        group = batch.group == batch.group[rows_[0]]
        assert s["group_reward"] == pytest.approx(batch.rewards[group].mean().item())
        assert s["answer"] is None or s["answer"] in s["response"] and s["gold"]
    # the first row says how the run computes: --dtype auto's choice for this CPU, and why
    assert rows[0]["run"] == "started" and rows[0]["dtype"] in ("float32", "bfloat16") and rows[0]["threads"] >= 1
    assert rows[0]["dtype_why"].startswith("auto: the model's MLP product")
    assert (tmp_path / "out" / "plot.png").stat().st_size > 1000


def test_an_eval_task_is_what_is_evaluated_and_never_trained_on(tmp_path, smollm2, monkeypatch):
    """--eval-task: its prompts (a parquet file, all of them) are each evaluation's and only they; the training file's
    rows that share a prompt with it are never drawn; no held-out split of the training task."""
    save_tiny_model(tmp_path / "model", "llama", smollm2[1], seed=0)
    questions = [f"What is {a} + {b}?" for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"question": q, "answer": "0"}) + "\n" for q in questions))
    import pyarrow
    import pyarrow.parquet
    evaluated = [questions[1], "What is 9 + 9?", "What is 2 + 2?"]
    pyarrow.parquet.write_table(pyarrow.table({"problem": evaluated, "solution": ["\\boxed{1}"] * 3}),
                                tmp_path / "eval.parquet")
    cfg = config.Config(model=str(tmp_path / "model"), task=str(tmp_path / "train.jsonl"),
                        eval_task=str(tmp_path / "eval.parquet"), eval_prompts=1, eval_samples=2, eval_every=1,
                        steps=2, prompts_per_step=3, rollouts_per_prompt=2, max_new_tokens=4,
                        out_dir=str(tmp_path / "out"), log_samples=3)
    batches, train_on_batch = [], train.train_on_batch
    monkeypatch.setattr(train, "train_on_batch", lambda cfg, model, ref, opt, batch, *a: batches.append(batch) or
                        train_on_batch(cfg, model, ref, opt, batch, *a))
    train.main(cfg)
    tok = smollm2[1]
    trained = {tok.decode(seq[:p]) for b in batches for seq, p in zip(b.sequences, b.prompt_lens)}
    assert len(trained) == 3 and all(questions[1] not in t for t in trained)
    assert all(any(q in t for t in trained) for q in (questions[0], questions[2], questions[3]))
    for step in (0, 1, 2):
        notes = [json.loads(line) for line in (tmp_path / "out" / f"eval_{step}.jsonl").read_text().splitlines()]
        assert sorted({n["prompt_index"] for n in notes}) == [0, 1, 2] and len(notes) == 3 * 3
        assert all(evaluated[n["prompt_index"]] in n["prompt"] and n["gold"] == "1" for n in notes)


@pytest.mark.parametrize("flags, expect", [
    # every reward (0 from a random model) counts as a success: all groups are all-right, so EchoClips exist
    (dict(echo_coef=1e-3, success=0.0), ("echo_loss", "echo_clips", "echo_clip_frac")),
    (dict(loss="tb", updates_per_step=2, kl_coef=0.0), ("log_z_std", "tb_beta")),
    # a random model gets all-equal rewards: dynamic sampling drops every group and the step trains on nothing
    (dict(dynamic_sampling=True, max_gen_rounds=2), ("ds_pass_rate",)),
    # the KL and the entropy bonus make every token run: TIS, the KL and dual clip see them all, for two updates
    (dict(adv="reinforce++", tis_cap=2.0, kl_coef=1e-3, dual_clip=3.0, aggregate="seq-mean-token-mean",
          entropy_coef=1e-2, updates_per_step=2), ("tis_weight", "kl", "clip_frac")),
    (dict(kl_coef=1e-3, kl_in_reward=True, aggregate="seq-mean-token-sum-norm", entropy_coef=1e-3), ()),
    # the entropy bonus moves the policy; the reference catches up at step 2, so the KL is 0 again
    (dict(kl_coef=1e-3, ref_reset_every=2, entropy_coef=1e-2, steps=3), ("kl",)),
    # 6 training prompts, 2 per step: budgets are uniform in epoch 1 (steps 0-2) and spread in epoch 2
    (dict(budget_min=1, budget_max=5, temperature_control=True, task_size=10, steps=5), ("entropy_target",))])
def test_objective_and_explore_options_run(tmp_path, smollm2, flags, expect):
    save_tiny_model(tmp_path / "model", "llama", smollm2[1], seed=0)
    cfg = config.Config(**{**dict(model=str(tmp_path / "model"), task="rg:chain_sum?min_digits=1&max_digits=1",
                                    steps=2, task_size=200, prompts_per_step=2, rollouts_per_prompt=3,
                                    max_new_tokens=6, eval_prompts=4, eval_samples=1, out_dir=str(tmp_path / "out"),
                                    lr=1e-3), **flags})
    train.main(cfg)
    rows = [r for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) if "step" in r]
    assert len(rows) == cfg.steps
    for row in rows:
        assert all(math.isfinite(row[k]) for k in ("loss", "grad_norm", "entropy", "degenerate_frac", *expect))
    if flags.get("echo_coef"):
        assert all(r["echo_clips"] == 2 and r["echo_loss"] > 0 and 0 < r["echo_clip_frac"] <= 1 for r in rows)
    if flags.get("dynamic_sampling"):
        assert all(r["ds_pass_rate"] == 0 and r["groups_sampled"] == 4 and r["grad_norm"] == 0 for r in rows)
    if flags.get("tis_cap"):  # sampler and trainer agree in float32 on the same weights: every weight about 1
        assert all(abs(r["tis_weight"] - 1) < 1e-3 and r["grad_norm"] > 0 for r in rows) and rows[1]["kl"] > 0
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
            "--max-new-tokens", "16", "--eval-prompts", "4", "--lr", "1e-5",
            # the cross-rank paths too: dynamic sampling's rounds and trimming, E3 budgets (8 training prompts,
            # so step 1 starts epoch 2), TIS, echo clips, the KL to a sharded reference reset before step 1
            "--task-size", "12", "--dynamic-sampling", "--max-gen-rounds", "2", "--budget-min", "6", "--budget-max",
            "10", "--tis-cap", "2", "--echo-coef", "1e-3", "--echo-mode", "any", "--adam-eps", "1e-5",
            "--kl-coef", "1e-3", "--ref-reset-every", "1",
            # evaluation sharded over the ranks: 5 prompts of a file, before, after each step and at the end
            "--eval-task", str(tmp_path / "eval.jsonl"), "--eval-every", "1", "--eval-samples", "3"]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"question": f"{a} + {b} =", "answer": str(a + b)}) + "\n"
                                                 for a, b in ((3, 4), (1, 1), (9, 2), (5, 5), (2, 6))))
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
    evals = [[r for r in rows if "eval" in r] for rows in runs]
    assert len(evals[0]) == 3 and evals[0] == evals[1] and evals[0][0]["eval_prompts"] == 5
    completions = [(tmp_path / f"ranks{ranks}" / f"eval_{s}.jsonl").read_text() for ranks in (1, 2) for s in range(3)]
    assert completions[:3] == completions[3:]
    one, two = ([r for r in rows if "step" in r] for rows in runs)
    assert len(one) == len(two) == 2 and one[0]["grad_norm"] > 0  # some group had a reward signal
    for a, b in zip(one, two):
        for key in ("reward", "pass_rate", "response_len", "ds_pass_rate", "groups_kept", "rollouts_min",
                    "rollouts_max", "echo_clips"):
            assert a[key] == b[key], (key, a[key], b[key])
        for key in ("entropy", "loss", "grad_norm", "tis_weight", "echo_loss", "kl"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), (key, a[key], b[key])
    initial = load_file(trainer.resolve_model(config.EMBEDDED_MODEL, config.Config().cache_dir) / "model.safetensors")
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 100
    moved = apart = 0
    for name in weights[0]:
        a, b = weights[0][name], weights[1][name]
        moved += int((~torch.isclose(a, initial[name].float(), rtol=1e-5, atol=1e-7)).sum())
        apart += int((~torch.isclose(a, b, rtol=1e-5, atol=1e-7)).sum())
    assert moved > sum(w.numel() for w in initial.values()) / 2  # the runs did train, most weights by about lr
    assert apart == 0, f"{apart} weights differ between 1 and 2 ranks"


def tiny_run(tmp_path: Path, smollm2) -> list[str]:
    """train.py flags for a few quick steps of a small random model (the real tokenizer) on the demo's task:
    its rewards are all 0, so an entropy bonus gives every step a gradient."""
    model = tmp_path / "model"
    if not model.exists():
        save_tiny_model(model, "llama", smollm2[1], seed=0)
    return ["demo", "--model", str(model), "--dtype", "float32", "--prompts-per-step", "4", "--rollouts-per-prompt",
            "8", "--max-new-tokens", "8", "--eval-prompts", "4", "--eval-samples", "1", "--lr", "1e-3",
            "--entropy-coef", "1e-2"]


# Runs compared float for float fix torch's threads: a run's count follows the machine's load step by step
# (cluster.set_threads), a float32 sum on 1 thread differs from one on 2, and so would a step that saw a busy core;
# with one thread, one process and several compute alike too
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def step_rows(out_dir: Path) -> list[dict]:
    """A run's step rows less what the machine decides: timings and the threads a step took (each rank's share)."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("t_") and k != "threads"} for r in rows if "step" in r]


def test_resume_after_sigkill_matches_an_unbroken_run(tmp_path, smollm2):
    # 8 training prompts, 4 per step: step 2 starts epoch 2, whose E3 budgets come from the difficulty
    # stats of epoch 1, and the sampling temperature moves every step: both must come back on resume
    e3 = ["--task-size", "12", "--budget-min", "6", "--budget-max", "10", "--temperature-control"]
    command = [sys.executable, "train.py", *tiny_run(tmp_path, smollm2), *e3, "--steps", "4", "--save-every", "1"]
    # the unbroken run saves nothing: saving must not change a run either
    unbroken = subprocess.run(command[:-2] + ["--out-dir", str(tmp_path / "a")], cwd=ROOT, capture_output=True,
                              text=True, timeout=HANG_GUARD, env=ONE_THREAD)
    assert unbroken.returncode == 0, unbroken.stderr[-2000:]
    assert "Loading weights" not in unbroken.stderr and "train: 100%" in unbroken.stderr  # the run's own bar alone
    out = tmp_path / "b"
    killed = subprocess.Popen(command + ["--out-dir", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=ONE_THREAD)
    deadline = time.time() + HANG_GUARD
    while not (out / "checkpoints" / "step_000001").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    killed.kill()  # SIGKILL, somewhere after step 1's checkpoint
    killed.wait()
    assert (out / "checkpoints" / "step_000001").is_dir() and not (out / "checkpoints" / "step_000003").exists()
    half_written = out / "checkpoints" / "step_000009.tmp"  # cut off while being written: never picked up
    half_written.mkdir()
    (half_written / ".metadata").write_text("garbage")
    with open(out / "metrics.jsonl", "a") as f:  # a row cut off as the run died: dropped, as the rows after step 1 are
        f.write('{"step": 2, "rew')
    resumed = subprocess.run(command + ["--out-dir", str(out), "--resume", "auto"], cwd=ROOT, capture_output=True,
                             text=True, timeout=HANG_GUARD, env=ONE_THREAD)
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
    saved = subprocess.run([sys.executable, "train.py", *tiny_run(tmp_path, smollm2), "--steps", "1", "--save-every",
                            "1", "--out-dir", str(tmp_path / "saved")], cwd=ROOT, capture_output=True,
                           timeout=HANG_GUARD)
    assert saved.returncode == 0
    cases = [(["--resume", str(tmp_path / "missing")], "no complete checkpoint there"),
             (["--resume", str(corrupt)], "cannot be read"),
             # a sound checkpoint of other flags: dcp raises a BaseException (CheckpointException) for it
             (["--resume", str(tmp_path / "saved" / "checkpoints" / "step_000000"), "--lora-rank", "4"],
              "resume with the model and flags it was saved with"),
             # its loop's state is of other prompts, or of the other loop: checked before anything loads
             (["--resume", "auto", "--out-dir", str(tmp_path / "saved"), "--task-size", "123"],
              "it holds the state of a synchronous run on --task"),
             (["--resume", "auto", "--out-dir", str(tmp_path / "saved"), "--searchers", "2", "--loss", "tb",
               "--entropy-coef", "0"], "; this is a TBA run on"),
             (["--export-hf", str(tmp_path)], "exists or cannot be made"),
             (["--out-dir", str(corrupt / ".metadata")], "cannot start (FileExistsError"),  # a file, not a folder
             # refused at the start, not after training, where the model would be lost
             (["--export-hf", str(tmp_path / "saved" / "metrics.jsonl" / "export")], "cannot be made")]
    for flags, message in cases:
        run = subprocess.run([sys.executable, "train.py", *tiny_run(tmp_path, smollm2), "--steps", "1", "--out-dir",
                              str(tmp_path / "out"), *flags], cwd=ROOT, capture_output=True, text=True,
                             timeout=HANG_GUARD)
        assert run.returncode != 0 and message in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]


def test_exported_model_loads_in_transformers_and_decodes_like_the_sampler(tmp_path, smollm2):
    save_tiny_model(tmp_path / "model", "qwen2", smollm2[1], seed=1)
    train.main(config.Config(model=str(tmp_path / "model"), task="rg:chain_sum?min_digits=1&max_digits=1", steps=1,
                            task_size=200, prompts_per_step=2, rollouts_per_prompt=2, max_new_tokens=4,
                            eval_prompts=4, eval_samples=1, out_dir=str(tmp_path / "out"),
                            export_hf=str(tmp_path / "export")))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    sampler = Sampler(ModelConfig.from_hf(model.config), model.state_dict(), "cpu", dtype=torch.float32)
    prompts = collect.encode_prompts(transformers.AutoTokenizer.from_pretrained(tmp_path / "export"), "{question}",
                                   [{"question": "What is 2 + 2?"}])
    out = sampler.generate(prompts, [1], max_new_tokens=12, temperature=0.0)
    assert out.tokens[0] == hf_greedy(model, prompts[0], 12, eos=None)


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
            "--eval-samples", "1", "--lr", "1e-3", "--adam-eps", "1e-5", "--out-dir", str(tmp_path / name), *flags]


def tba_run(tmp_path: Path, name: str, procs: int, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(tba_command(tmp_path, name, procs, *flags), cwd=ROOT, capture_output=True, text=True,
                          timeout=HANG_GUARD, env=ONE_THREAD)


TIMING = ("t_step", "broadcast_s", "trainer_waited", "searcher_waited", "rollouts_per_s", "tokens_per_s")


def test_tba_one_process_and_torchrun_agree_and_resume(tmp_path, smollm2):
    """Virtual searchers in one process and searcher ranks under torchrun give the same rollouts, rewards,
    losses and final weights: exactly with one trainer rank. With an FSDP2 group of two, the gradients are summed
    over the ranks in another order, so the losses of every step agree to float32 rounding (rel 1e-4) and the rest
    of each row exactly; every weight within lr / 1000 after 4 steps (AdamW's eps at 1e-5, so that a gradient at
    float noise moves its weight by lr x g / eps, not by lr x sign(noise)). SIGKILL, then --resume auto: the same
    metrics as the unbroken run, in one process and under torchrun."""
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
    rounded = ("loss", "grad_norm", "trainer_entropy", "kl", "log_z_std", "weights_checksum")  # the sums' order
    assert len(one) == len(four)
    for a, b in zip(one, four):
        assert {k: v for k, v in a.items() if k not in rounded} == {k: v for k, v in b.items() if k not in rounded}
        assert all(math.isclose(a[k], b[k], rel_tol=1e-4) for k in rounded if k != "weights_checksum"), (a, b)
    for name in weights["one"]:
        torch.testing.assert_close(weights["four"][name], weights["one"][name], rtol=1e-5, atol=1e-3 / 1000)

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


def test_tba_syncing_every_2_steps_counts_steps_not_syncs(tmp_path, smollm2):
    """With --sync-every 2 a sync's index and its step differ: round w arrives at step 2w, sampled with the weights
    after step 2w - 2 (round 0 with the initial ones), so a step's fresh responses are 0 to 2k - 1 = 3 steps stale
    (the k = 1 runs above cannot tell the index from the step)."""
    save_tiny_model(tmp_path / "model", "qwen2", smollm2[1], seed=0)
    run = tba_run(tmp_path, "k2", 0, "--sync-every", "2", "--steps", "6", "--fresh-prob", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = step_rows(tmp_path / "k2")
    assert [r["sync"] for r in rows] == [0, 0, 1, 1, 2, 2]
    assert [r["staleness_fresh"] for r in rows] == [0, 1, 2, 3, 2, 3] and rows[-1]["staleness_max"] == 3


def test_plot_draws_what_tells_something(tmp_path, monkeypatch):
    """plot.png: reward with the evaluations' figures (not pass rate again, the same curve for a binary reward),
    entropy with E3's target where it runs, response length with the evaluations', and the temperature only where
    E3's controller moves it."""
    import matplotlib.figure
    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(
        [(ax.get_title(), [line.get_label() for line in ax.lines]) for ax in fig.axes]))
    for temperatures in ([1.0, 1.0], [1.0, 1.1]):
        log = outputs.Logger(config.Config(out_dir=str(tmp_path)), enabled=True)
        figures = {"avg@4": 0.1, "pass@4": 0.2, "greedy_acc": 0.1, "truncated_frac": 0.0, "response_len": 5.0}
        log.log({"eval": "before", "eval_step": 0, **figures})
        for step, tau in enumerate(temperatures):
            log.log({"step": step, "reward": 0.5, "pass_rate": 0.5, "entropy": 1.0, "response_len": 9.0,
                     "temperature": tau, **({"entropy_target": 1.0} if tau != 1.0 else {})})
        log.log({"eval": "after", "eval_step": 2, **figures})
        log.plot()
    evals = ["eval avg@4", "eval pass@4", "eval greedy_acc", "eval truncated_frac"]
    assert drawn[0] == [("reward", ["reward", *evals]), ("entropy", ["entropy"]),
                        ("response length", ["response_len", "eval response_len"])]
    assert drawn[1][1] == ("entropy", ["entropy", "entropy_target"]) and drawn[1][3] == ("temperature", ["temperature"])


def test_completions_go_to_wandb_as_tables(tmp_path, monkeypatch):
    """With wandb on (offline here), a step's logged completions and an evaluation's are Tables of their notes."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = outputs.Logger(config.Config(out_dir=str(tmp_path / "out"), wandb="offline"), enabled=True)
    samples = [{"step": 0, "prompt": "p", "response": f"r{i}", "reward": float(i), "verdict": v, "answer": a,
                "gold": "1"} for i, (v, a) in enumerate([(1.0, "1"), ("no answer", None)])]
    log.completions(samples)
    log.completions([{"prompt_index": 0, "sample": 0, "greedy": True, "verdict": "timeout", "output": "x"}], 0)
    log.plot()
    tables = {p.name.split("_")[0]: json.loads(p.read_text())
              for p in tmp_path.glob("wandb/*/files/media/table/**/*.json")}
    assert tables["samples"]["columns"] == list(samples[0]) and len(tables["samples"]["data"]) == 2
    assert tables["samples"]["data"][1][5] is None and tables["completions"]["data"] == [[0, 0, True, "timeout", "x"]]
    assert [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()] == samples
