"""fanout's run, top to bottom: set-up, the synchronous step loop, the async (TBA) loop, the end.

    python train.py                      # the CPU demo (same as `python train.py demo`)
    python train.py demo --help          # every flag (config.py)
    torchrun --nproc_per_node 1 train.py grpo --model /path/to/hf_model --task rg:chain_sum
    torchrun --nproc_per_node 8 train.py grpo --model /path/to/hf_model   # one node, 8 GPUs

One step (DESIGN.md, data flow): pick prompts -> hand the weights to the sampler -> sample n rollouts per prompt
(prompt KV shared) -> score -> advantages -> optimizer update(s) on token-budgeted micro-batches -> metrics.
"""

import copy
import dataclasses
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import explore
import lora
import loss
import reward
from cluster import compute_dtype, make_roles, my_share, set_threads, setup_process, shard
from collect import encode_prompts, evaluate, sample_step
from config import Config, parse_config
from outputs import Logger, export_hf, find_checkpoint, load_checkpoint, save_checkpoint
from rollout import ModelConfig, Sampler
from search import Searchers, serve, sync_count, to_responses
from tools import Tools
from trainer import (Base, Batch, Policy, checkpoint_layers, load_model, lr_at, reset_reference, sync_sampler,
                     train_on_batch)


def main(cfg: Config):
    rank, world, device = setup_process()
    if cfg.export_hf:  # checked now, not after training, where the model would be lost
        home = next((p for p in Path(cfg.export_hf).absolute().parents if p.exists()), Path("/"))  # where it is made
        if Path(cfg.export_hf).exists() or not (home.is_dir() and os.access(home, os.W_OK)):
            raise SystemExit(f"--export-hf {cfg.export_hf} exists or cannot be made; name a new, writable folder")
    # --searchers -1: every rank but one (one virtual searcher in a world of one)
    cfg = dataclasses.replace(cfg, searchers=max(world - 1, 1) if cfg.searchers == -1 else cfg.searchers)
    roles = make_roles(cfg, rank, world)
    torch.manual_seed(cfg.seed)
    train_task, eval_task = load_tasks(cfg, rank)
    lm, tokenizer = load_model(cfg, device)
    try:  # a model the sampler computes; a tool turn the template frames and the budget holds; LoRA's targets in it
        model_config = ModelConfig.from_hf(lm.config)
        dtype, setup = compute_dtype(cfg, lm, device, rank)
        sampler = Sampler(model_config, lm.state_dict(), device, cfg.kv_budget_tokens, dtype=dtype,
                          compiled=cfg.compile_sampler)
        longest = max(map(len, encode_prompts(tokenizer, cfg.prompt_template, train_task.items + eval_task.items)))
        sampler.check_fits(longest, cfg.max_new_tokens, "the longest prompt of --task and the eval set")
        if longest + cfg.max_new_tokens > lm.config.max_position_embeddings:  # positions the model never learned
            raise ValueError(f"the longest prompt ({longest} tokens) plus --max-new-tokens {cfg.max_new_tokens} is "
                             f"past the model's context ({lm.config.max_position_embeddings}); lower either")
        if cfg.max_tool_calls:
            Tools(tokenizer, cfg)
        if cfg.lora_rank:  # the base frozen, adapters trained (lora.py)
            lora.add_adapters(lm, cfg)
    except ValueError as e:
        raise SystemExit(str(e))
    if roles.searching:  # a searcher rank samples rounds for the trainer ranks until the run ends (search.py)
        policy = Policy(lm.requires_grad_(False))
        serve(cfg, sampler, Base(policy) if cfg.lora_rank else policy, lm, tokenizer, train_task, roles, dtype)
        return dist.destroy_process_group()
    # The frozen reference: the trainer's (KL, synchronous TB), or in one TBA process the virtual searchers'; with
    # LoRA the policy with adapters off, else a copy made before checkpointing wraps the layers and FSDP2 shards them.
    tba = cfg.searchers > 0
    needs_ref = roles.handoff is None if tba else cfg.kl_coef > 0 or cfg.loss == "tb"
    ref_model = Policy(copy.deepcopy(lm).requires_grad_(False)) if needs_ref and not cfg.lora_rank else None
    if cfg.activation_checkpointing:
        checkpoint_layers(lm)
    model = Policy(lm)
    for m in (model, None if tba else ref_model):
        if m is not None and dist.is_initialized():
            shard(m, m.lm.model.layers, device, dtype, roles.trainers)
    ref_model = Base(model) if needs_ref and cfg.lora_rank else ref_model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    checkpoint = find_checkpoint(cfg) if cfg.resume else None
    start_step, saved = load_checkpoint(cfg, checkpoint, model, optimizer, None if tba else ref_model, roles.rank,
                                        roles.trainers) if checkpoint else (0, None)
    log = Logger(cfg, enabled=rank == 0, start_step=start_step)
    log.log({"run": "resumed" if start_step else "started", **setup,
             **({"searchers": cfg.searchers, "trainers": roles.n_trainers} if tba else {})})

    def evaluate_at(step: int, when: str = "during") -> dict | None:
        """The eval set with the weights after `step` steps (during: every eval_every, never at the end): figures to
        metrics.jsonl, completions to eval_<step>.jsonl."""
        if when == "during" and not (cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps):
            return None
        if step > 0:  # at step 0 the sampler holds the weights it was built from
            sync_sampler(sampler, model.lm)
        figures, notes = evaluate(cfg, sampler, tokenizer, eval_task, cfg.seed + 1, roles.rank, roles.n_trainers,
                                  roles.trainers)
        sampler.release_kv()  # for the training steps that follow
        log.log({"eval": when, "eval_step": step, **figures})
        log.completions(notes, step)
        return figures

    # the evaluation before training; resumed, read back from metrics.jsonl (only rank 0 logs rows, others get None)
    before = next((r for r in log.rows if r.get("eval") == "before"), None) if start_step else evaluate_at(0, "before")
    if rank == 0:
        print(f"resumed from {checkpoint} at step {start_step}" if start_step else f"before training: {before}")
    loop = train_async if tba else train_sync
    loop(cfg, model, ref_model, optimizer, sampler, tokenizer, train_task, dtype, roles, start_step, saved, log,
         evaluate_at)
    finish(cfg, model, tokenizer, log, before, evaluate_at(cfg.steps, "after"), rank)


def load_tasks(cfg: Config, rank: int) -> tuple[reward.Task, reward.Task]:
    """(training task, eval set: --eval-task or held out), first: the likeliest thing mistyped; code needs a sandbox."""
    try:
        load = partial(reward.load_task, question_key=cfg.question_key, answer_key=cfg.answer_key)
        task = load(cfg.task, cfg.task_size, cfg.seed)
        if cfg.eval_task:  # read whole, or eval_prompts generated with a seed of its own
            held = load(cfg.eval_task, cfg.eval_prompts if cfg.eval_task.startswith("rg:") else 0, cfg.seed + 1)
            train = reward.without(task, held)
            if rank == 0:
                print(f"eval set {cfg.eval_task}: {len(held.items)} prompts; {len(task.items) - len(train.items)} "
                      f"items of --task {cfg.task} share a prompt with it and are not trained on")
        else:
            train, held = reward.split_task(task, cfg.eval_prompts, cfg.seed)
        code = [spec for spec, t in ((cfg.task, task), (cfg.eval_task, held)) if "tests" in t.items[0]]
        if code or cfg.max_tool_calls:  # what a program may reach here (README, the sandbox)
            seen = reward.check_sandbox()
            if rank == 0:
                print(f"code sandbox on this machine: {seen}")
            if seen["mode"] == "weak" and not cfg.allow_weak_sandbox:
                raise SystemExit(f"{f'--task {code[0]}' if code else f'--max-tool-calls {cfg.max_tool_calls}'}: the "
                                 "code sandbox is weak here (not root, no user namespaces), so a program could write "
                                 "your files, signal the trainer and reach the network; run as root or where user "
                                 "namespaces are allowed, or pass --allow-weak-sandbox")
        return train, held
    except ValueError as e:  # unknown task, missing or malformed data: one sentence, no traceback
        raise SystemExit(str(e))


def train_sync(cfg: Config, model, ref_model, optimizer, sampler, tokenizer, task, dtype, roles, start_step: int,
               saved, log, evaluate_at) -> None:
    """The synchronous loop: each rank samples and scores its share of the step, then all train on it."""
    state = explore.Explore(cfg, len(task.items), model.lm.config.vocab_size)
    if saved:
        state.load_state_dict(saved)
    step_ids = loss.step_token_ids(tokenizer) if cfg.echo_coef > 0 else None
    bar = tqdm(range(start_step, cfg.steps), desc="train", disable=roles.rank != 0, initial=start_step, total=cfg.steps)
    for step in bar:
        t0 = time.time()
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # the update's randomness (dropout), resumed or not, any device
        threads = set_threads(follow_load=sampler.device.type == "cpu")  # fair to a busy machine (cluster.py)
        optimizer.param_groups[0]["lr"] = lr_at(cfg, step)  # the one group: every parameter
        if ref_model is not None and cfg.ref_reset_every and step % cfg.ref_reset_every == 0 and step > 0:
            reset_reference(ref_model, model)
        temperature = state.controller.tau if state.controller is not None else cfg.temperature
        sync_sampler(sampler, model.lm)
        batch, row, samples = sample_step(cfg, state, sampler, tokenizer, task, step, temperature, step_ids,
                                          roles.rank, roles.n_trainers)
        sampler.release_kv()  # the KV pool's memory goes to training until the next step (unless graphs use it)
        t_gen = time.time() - t0
        beta = loss.tb_beta(step, cfg.tb_beta_start, cfg.tb_beta_end, cfg.tb_beta_steps) if cfg.loss == "tb" else 0.0
        stats = train_on_batch(cfg, model, ref_model, optimizer, batch, temperature, dtype, beta)
        if state.controller is not None:  # E3: hold the sampler's entropy at its target (ALGORITHMS.md 3)
            row["entropy_target"] = state.controller.target(step) if state.controller.h0 is not None else row["entropy"]
            state.controller.update(row["entropy"], step)
        row = {"step": step, **row, "temperature": temperature, **({"tb_beta": beta} if cfg.loss == "tb" else {}),
               **stats, "t_gen": t_gen, "t_step": time.time() - t0, "threads": threads}
        log.log(row)
        log.completions(samples)
        bar.set_postfix(reward=f"{row['reward']:.3f}", entropy=f"{row['entropy']:.2f}")
        evaluate_at(step + 1)
        if cfg.save_every and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(cfg, model, optimizer, ref_model, step, roles.rank, state.state_dict())


def train_async(cfg: Config, model, search_ref, optimizer, sampler, tokenizer, task, dtype, roles, start_step: int,
                saved, log, evaluate_at) -> None:
    """TBA (ALGORITHMS.md 2): the trainer draws each step's batch from the replay buffer. At sync w its weights go
    out and round w comes back, sampled with sync w - 1's (round 0: the initial ones); checkpoints at syncs."""
    k = cfg.sync_every
    buffer, sent = explore.ReplayBuffer(cfg.replay_capacity, cfg.max_staleness), {}  # sent: the last round's figures
    if saved:
        buffer.load_state_dict(saved["buffer"])
        sent = saved["sent"]
    searchers = Searchers(cfg, roles, sampler, search_ref, model.lm, tokenizer, task, dtype)
    prompt_ids = {}  # training prompt -> its encoded chat prompt
    bar = tqdm(total=cfg.steps, desc="train", disable=roles.rank != 0, initial=start_step)
    w0 = start_step // k
    for w in range(w0, max(sync_count(cfg), w0 + 1)):  # resumed at the end: the first sync alone, as searchers expect
        due = searchers.sync(w, max(w * k, start_step), first=w == w0)
        if due is not None:
            buffer.add([r for ints, floats, _ in due for r in to_responses(ints, floats)])
            seconds, waited, failures, timeouts, tokens = (sum(x) for x in zip(*(s.tolist() for *_, s in due)))
            sent = {"rollouts_per_s": len(due) * len(due[0][0]) / seconds, "tokens_per_s": tokens / seconds,
                    "verifier_failures": int(failures), "timeouts": int(timeouts), "searcher_waited": waited / len(due)}
        if cfg.save_every and w > w0 and (w * k) // cfg.save_every > (w * k - k) // cfg.save_every:
            save_checkpoint(cfg, model, optimizer, None, w * k - 1, roles.rank,
                            {"buffer": buffer.state_dict(), "sent": sent}, roles.trainers)
        for step in range(max(w * k, start_step), min(w * k + k, cfg.steps)):  # resumed at the end: none
            t0 = time.time()
            torch.manual_seed(cfg.seed * 1_000_003 + step)
            threads = set_threads(follow_load=sampler.device.type == "cpu")
            optimizer.param_groups[0]["lr"] = lr_at(cfg, step)
            buffer.drop_stale(step)
            slots = buffer.draw(cfg.prompts_per_step, cfg.rollouts_per_prompt, cfg.fresh_prob, cfg.replay_inv_temp,
                                torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
            start, stop = my_share(cfg.prompts_per_step, roles.rank, roles.n_trainers)
            batch = replay_batch(cfg, slots, start, stop, prompt_ids, tokenizer, task)
            beta = loss.tb_beta(step, cfg.tb_beta_start, cfg.tb_beta_end, cfg.tb_beta_steps) if cfg.loss == "tb" else 0
            stats = train_on_batch(cfg, model, None, optimizer, batch, cfg.temperature, dtype, beta, roles.trainers)
            row = {"step": step, **replay_figures(cfg, step, slots), "buffer": buffer.size(),
                   "prompts_held": len(buffer.items), **buffer.removed, "sync": w, **sent, **searchers.figures,
                   **({"tb_beta": beta} if cfg.loss == "tb" else {}), **stats, "t_step": time.time() - t0,
                   "threads": threads}
            log.log(row)
            log.completions([{"step": step, "prompt": tokenizer.decode(prompt_ids[p]), "fresh": fresh,
                              "response": tokenizer.decode(rs[0]["tokens"], skip_special_tokens=True),
                              "reward": rs[0]["reward"], "group_reward": sum(r["reward"] for r in rs) / len(rs)}
                             for p, fresh, rs in slots[start:stop][:cfg.log_samples]])
            bar.update()
            bar.set_postfix(reward=f"{row['reward']:.3f}", staleness=f"{row['staleness_mean']:.1f}")
            evaluate_at(step + 1)
    if cfg.save_every:
        save_checkpoint(cfg, model, optimizer, None, cfg.steps - 1, roles.rank,
                        {"buffer": buffer.state_dict(), "sent": sent}, roles.trainers)


def replay_figures(cfg: Config, step: int, slots) -> dict:
    """A drawn batch's rewards, entropy, lengths and staleness, over all, the fresh and the replayed."""
    drawn = [(fresh, r) for _, fresh, rs in slots for r in rs]

    def mean(value, which=(True, False)):
        xs = [value(r) for fresh, r in drawn if fresh in which]
        return sum(xs) / len(xs) if xs else float("nan")

    age, reward_of = (lambda r: step - r["version"]), (lambda r: r["reward"])
    return {"reward": mean(reward_of), "reward_fresh": mean(reward_of, [True]),
            "reward_replay": mean(reward_of, [False]), "pass_rate": mean(lambda r: r["reward"] >= cfg.success),
            "entropy": sum(r["entropy"] for _, r in drawn) / sum(int(r["mask"].sum()) for _, r in drawn),
            "response_len": mean(lambda r: int(r["mask"].sum())), "staleness_mean": mean(age),
            "staleness_max": max(age(r) for _, r in drawn), "staleness_fresh": mean(age, [True]),
            "staleness_replay": mean(age, [False]), "fresh_frac": sum(f for f, _ in drawn) / len(drawn)}


def replay_batch(cfg: Config, slots, start: int, stop: int, prompt_ids: dict, tokenizer, task) -> Batch:
    """This trainer rank's prompt slots [start, stop) of a drawn batch as the trainer's Batch (group = slot)."""
    rows = [(j, prompt, r) for j, (prompt, _, rs) in enumerate(slots) if start <= j < stop for r in rs]
    for _, prompt, _ in rows:
        if prompt not in prompt_ids:
            prompt_ids[prompt] = encode_prompts(tokenizer, cfg.prompt_template, [task.items[prompt]])[0]
    return Batch([prompt_ids[p] + list(r["tokens"]) for _, p, r in rows], [len(prompt_ids[p]) for _, p, _ in rows],
                 torch.tensor([j for j, _, _ in rows]), torch.tensor([r["reward"] for *_, r in rows]),
                 [r["logp"] for *_, r in rows], [torch.zeros(len(r["logp"])) for *_, r in rows],
                 torch.ones(len(rows), dtype=torch.bool), {}, torch.tensor([r["ref"] for *_, r in rows]),
                 [r["mask"] for *_, r in rows])


def finish(cfg: Config, model, tokenizer, log, before, after, rank: int) -> None:
    """A run's end, after the last evaluation: the export, the plot."""
    if rank == 0:
        print(f"after training:  {after}")
        if before:
            k = f"avg@{cfg.eval_samples}"
            print(f"eval {k} {before[k]:.3f} -> {after[k]:.3f}, greedy {before['greedy_acc']:.3f} -> "
                  f"{after['greedy_acc']:.3f}; outputs in {cfg.out_dir}")
    if cfg.export_hf:
        export_hf(cfg, model, tokenizer, rank)
    log.plot()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        config = parse_config(sys.argv[1:])
    except ValueError as e:  # a config that contradicts itself: one sentence, no traceback
        raise SystemExit(f"bad config: {e}")
    main(config)
