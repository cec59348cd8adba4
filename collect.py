"""What each step collects: explore.py's prompts and budgets sampled and scored on this rank, the step's sampling
metrics over all ranks; and held-out evaluation."""

import math
from collections import Counter

import torch

import explore
import loss
import reward
from cluster import all_gather, all_sum, my_share, split_by_budget
from config import Config
from tools import Tools
from trainer import Batch


def encode_prompts(tokenizer, template: str, items: list[dict]) -> list[list[int]]:
    """Each item's chat: its own messages as they are (a system message kept), or its question in the template."""
    chats = [item.get("messages") or [{"role": "user", "content": template.format(question=item["question"])}]
             for item in items]
    return [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
            for c in chats]


def sample_round(cfg: Config, sampler, tokenizer, task, picked, budgets, first_key: int, temperature: float,
                 seed: int, rank: int, world: int) -> tuple[Batch, dict, list[dict]]:
    """This rank's share of a round (balanced by budget), sampled and scored, its counts and each response's note
    (generate_and_score); prompt i keyed first_key + i."""
    mine = split_by_budget(budgets, world)[rank]
    items = [task.items[picked[i]] for i in mine]
    prompt_ids = encode_prompts(tokenizer, cfg.prompt_template, items)
    r, rewards, failed, timeouts, notes = generate_and_score(cfg, sampler, tokenizer, task, items, prompt_ids,
                                                             [budgets[i] for i in mine], temperature, seed,
                                                             [first_key + i for i in mine])
    batch = Batch([prompt_ids[p] + t for p, t in zip(r.prompt_index, r.tokens)],
                  [len(prompt_ids[p]) for p in r.prompt_index],
                  torch.tensor([first_key + mine[p] for p in r.prompt_index]),
                  rewards, r.logprobs, r.entropies, torch.ones(len(r.tokens), dtype=torch.bool), {}, masks=r.masks)
    return batch, {"failures": failed, "timeouts": timeouts, "tool_calls": sum(r.tool_calls),
                   "tool_errors": sum(r.tool_errors)}, notes


def sample_step(cfg: Config, state: explore.Explore, sampler, tokenizer, task, step: int, temperature: float, step_ids,
                rank: int, world: int) -> tuple[Batch, dict, list[dict]]:
    """One step's rollouts on this rank, its sampling metrics over all ranks, and its first kept groups' first notes.
    Dynamic sampling drops groups of equal rewards and samples more rounds until prompts_per_step are held
    (ALGORITHMS.md 0); all-right groups stay for the echo term (ALGORITHMS.md 4)."""
    B, parts, held, all_budgets, sums, samples = cfg.prompts_per_step, [], 0, [], Counter(), []
    for round_ in range(cfg.max_gen_rounds if cfg.dynamic_sampling else 1):
        picked, budgets = state.next_prompts()
        all_budgets += budgets
        batch, counts, notes = sample_round(cfg, sampler, tokenizer, task, picked, budgets, round_ * B, temperature,
                                            cfg.seed * 1_000_003 + step, rank, world)
        per_prompt = [batch.rewards[batch.group == round_ * B + i].tolist() for i in range(len(picked))]
        state.record(picked, [sum(x, []) for x in zip(*all_gather(per_prompt))])
        keys = batch.group.unique().tolist()
        first = {g: (batch.group == g).nonzero()[0, 0].item() for g in keys}
        outcomes = explore.group_outcomes(batch.rewards, batch.group, cfg.success)
        informative, all_right, all_wrong = (x[list(first.values())].tolist() for x in outcomes)  # per group, as keys
        kept = [g for g, ok in zip(keys, informative) if ok] if cfg.dynamic_sampling else keys
        # keep exactly the groups still needed, the lowest keys first, whichever rank holds them
        needed = sorted(g for ranks_kept in all_gather(kept) for g in ranks_kept)[:B - held]
        kept = [g for g in kept if g in needed]
        held += len(needed)
        if round_ == 0:
            samples = [{"step": step, **notes[i], "group_reward": batch.rewards[batch.group == g].mean().item()}
                       for g, i in sorted(first.items()) if g in kept][:cfg.log_samples]
        echo_only = [g for g, ok in zip(keys, all_right) if ok and g not in kept] if cfg.echo_coef > 0 else []
        rows = [i for i, g in enumerate(batch.group.tolist()) if g in kept or g in echo_only]
        parts.append(batch.select(rows, torch.tensor([g in kept for g in batch.group.tolist()])))
        entropy = torch.cat(batch.entropies).sum().item() if batch.entropies else 0.0
        sums.update({"responses": len(batch.rewards), "reward": batch.rewards.sum().item(),
                     "passed": (batch.rewards >= cfg.success).sum().item(),
                     "tokens": sum(int(m.sum()) for m in batch.masks), "entropy": entropy,
                     **counts, "groups": len(keys), "kept": len(kept), "informative": sum(informative),
                     "all_right": sum(all_right), "all_wrong": sum(all_wrong)})
        if held >= B:
            break
    batch = Batch.concat(parts)
    if cfg.echo_coef > 0:
        batch.clips = loss.echo_clip([s[p:] for s, p in zip(batch.sequences, batch.prompt_lens)], batch.entropies,
                                     batch.masks, batch.rewards, batch.group, *step_ids, cfg.success, cfg.echo_mode)
    sums.update({"echo_clips": len(batch.clips), "clip_len": sum(batch.clips.values()),
                 "clip_resp": sum(len(batch.sequences[i]) - batch.prompt_lens[i] for i in batch.clips)})
    totals = dict(zip(sums, all_sum(*sums.values())))
    responses, groups = totals["responses"], totals["groups"]
    row = {"reward": totals["reward"] / responses, "pass_rate": totals["passed"] / responses,
           "entropy": totals["entropy"] / max(totals["tokens"], 1), "response_len": totals["tokens"] / responses,
           "verifier_failures": int(totals["failures"]), "timeouts": int(totals["timeouts"]),
           "groups_sampled": int(groups), "degenerate_frac": 1 - totals["informative"] / groups,
           "all_right_frac": totals["all_right"] / groups, "all_wrong_frac": totals["all_wrong"] / groups,
           "rollouts_min": min(all_budgets), "rollouts_mean": sum(all_budgets) / len(all_budgets),
           "rollouts_max": max(all_budgets)}
    if cfg.dynamic_sampling:  # groups passing the filter / groups sampled, and how many the step trains on
        row.update(ds_pass_rate=totals["informative"] / groups, groups_kept=int(totals["kept"]))
    if cfg.max_tool_calls:  # per rollout: calls, and turns of the model's; calls that ran without an error
        row.update(tool_calls=totals["tool_calls"] / responses, turns=1 + totals["tool_calls"] / responses,
                   tool_ok=1 - totals["tool_errors"] / totals["tool_calls"] if totals["tool_calls"] else float("nan"))
    if cfg.echo_coef > 0:
        row.update(echo_clips=int(totals["echo_clips"]),
                   echo_clip_frac=totals["clip_len"] / totals["clip_resp"] if totals["clip_resp"] else 0.0)
    return batch, row, samples


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (ALGORITHMS.md 5)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def generate_and_score(cfg: Config, sampler, tokenizer, task, items, prompt_ids, n, temperature: float, seed: int,
                       prompt_keys: list[int]):
    """(rollouts, rewards, verifier failures, programs out of time, notes) for n[i] rollouts of each prompt; a note
    per response to read: its prompt and response decoded, its reward and the verifier's verdict (reward.score)."""
    tools = Tools(tokenizer, cfg, items) if cfg.max_tool_calls else None
    r = sampler.generate(prompt_ids, n, cfg.max_new_tokens, temperature, cfg.top_p, [tokenizer.eos_token_id], seed,
                         prompt_keys=prompt_keys, tools=tools)
    # what the model wrote is scored, never a tool's output
    texts = tokenizer.batch_decode([[t for t, m in zip(ts, mask.tolist()) if m] for ts, mask in zip(r.tokens, r.masks)],
                                   skip_special_tokens=True)
    verdicts = []
    scores, failed, timeouts = reward.score(task, [items[p] for p in r.prompt_index], texts, cfg.score_timeout,
                                            cfg.score_workers, memory_mb=cfg.sandbox_memory_mb, verdicts=verdicts)
    rewards = torch.tensor(scores, dtype=torch.float32)
    if cfg.binary_reward:  # reasoning-gym gives partial credit when the answer merely contains the gold
        rewards = (rewards >= 1.0).float()
    prompts = tokenizer.batch_decode(prompt_ids)
    responses = tokenizer.batch_decode(r.tokens) if tools else texts
    notes = [{"prompt": prompts[p], "response": text, "reward": x, **verdict, "finish": finish}
             for p, text, x, verdict, finish in zip(r.prompt_index, responses, rewards.tolist(), verdicts,
                                                    r.finish_reason)]
    return r, rewards, failed, timeouts, notes


def evaluate(cfg: Config, sampler, tokenizer, task, seed: int, rank: int = 0, world: int = 1,
             group=None) -> tuple[dict, list[dict]]:
    """avg@k (the mean accuracy of k = eval_samples samples a prompt), unbiased pass@k, greedy accuracy, the samples'
    mean length and share cut at max_new_tokens; each rank (of `group`) takes its share; every completion's note."""
    start, stop = my_share(len(task.items), rank, world)
    items = task.items[start:stop]
    prompts = encode_prompts(tokenizer, cfg.prompt_template, items)
    k, sums, notes = cfg.eval_samples, [], []
    for samples, temperature in ((k, cfg.temperature), (1, 0.0)):
        r, rewards, failed, timeouts, said = generate_and_score(cfg, sampler, tokenizer, task, items, prompts,
                                                                [samples] * len(prompts), temperature, seed,
                                                                list(range(start, stop)))
        correct = torch.bincount(torch.tensor(r.prompt_index, dtype=torch.long), (rewards >= cfg.success).float(),
                                 len(prompts)).long().tolist()  # each prompt's right samples
        sums += [sum(correct), sum(pass_at_k(samples, c, samples) for c in correct), failed, timeouts,
                 sum(len(t) for t in r.tokens), r.finish_reason.count("length")]
        notes += [{"prompt_index": start + p, "sample": s, "greedy": temperature == 0, **note}
                  for p, s, note in zip(r.prompt_index, r.sample_index, said)]
    right, pass_k, failed, timeouts, tokens, cut, greedy_right, _, greedy_failed, greedy_timeouts, *_ = all_sum(
        *sums, group=group)
    n = len(task.items)
    return ({f"avg@{k}": right / (n * k), f"pass@{k}": pass_k / n, "greedy_acc": greedy_right / n,
             "response_len": tokens / (n * k), "truncated_frac": cut / (n * k), "eval_prompts": n,
             "verifier_failures": int(failed + greedy_failed), "timeouts": int(timeouts + greedy_timeouts)},
            sorted(sum(all_gather(notes, group), []), key=lambda n: (n["greedy"], n["prompt_index"], n["sample"])))
