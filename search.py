"""TBA's searchers (ALGORITHMS.md 2; DESIGN.md async mode). A round deals each searcher a seeded set of prompts;
it samples each ceil(oversample x K) times with the last sync's weights, scores them, and sums their logprobs
under the frozen initial model (the trainer holds no reference). A round travels as three fixed-shape tensors.
`serve` is a searcher rank's life; `Searchers` the trainer's side, playing them itself in a one-process run.
"""

import math
import time

import torch
import torch.distributed as dist

import explore
import lora
from cluster import Roles, broadcast_weights, checksum, load_flat
from collect import encode_prompts, generate_and_score
from config import Config
from trainer import response_logprobs, sync_sampler

# per response: prompt, version, round, length, then its tokens and their mask (1: the model's, 0: a tool's) |
# reward, ref and sampler logprobs, entropy, then each token's sampler logprob
INTS, FLOATS = 4, 4
STATS = ("seconds", "waited", "failures", "timeouts", "tokens")  # per searcher and round


def sync_count(cfg: Config) -> int:
    """The syncs of a run: one every sync_every trainer steps, the first before step 0."""
    return math.ceil(cfg.steps / cfg.sync_every)


def handoff_names(lm, sampler) -> list[str]:
    """What a sync sends, in a fixed order: with LoRA the adapters alone, else every weight the sampler holds."""
    return lora.adapter_names(lm) or sorted(sampler.weights)


def load_handoff(sampler, lm, flat: torch.Tensor, names: list[str]) -> None:
    """A sync's flat weights into the sampler: as they come, or with LoRA the adapters merged into lm's base."""
    if not lora.adapter_names(lm):
        return load_flat(sampler.weights, flat, names)
    state = lm.state_dict()  # built once: each call walks the whole model
    received = {name: torch.empty(state[name].shape) for name in names}  # whole, even where lm is sharded
    load_flat(received, flat, names)
    sync_sampler(sampler, lm, received)


def samples_per_prompt(cfg: Config) -> int:
    return math.ceil(cfg.search_oversample * cfg.rollouts_per_prompt - 1e-9)


def prompts_per_searcher(cfg: Config) -> int:
    """--search-prompts, or (0) enough for the prompts_per_step x sync_every prompt slots of a sync."""
    return cfg.search_prompts or math.ceil(cfg.prompts_per_step * cfg.sync_every / cfg.searchers)


def search(cfg: Config, sampler, ref, tokenizer, task, round_: int, searcher: int, version: int, dtype,
           waited: float = 0.0) -> list[torch.Tensor]:
    """One searcher's round as [ints, floats, stats], rows padded to max_new_tokens (INTS, FLOATS say how)."""
    t0 = time.time()
    P, n, width = prompts_per_searcher(cfg), samples_per_prompt(cfg), cfg.max_new_tokens
    # round r deals the next searchers x P prompts of the epoch order, P to each searcher in turn
    picked = explore.pick_prompts(len(task.items), (round_ * cfg.searchers + searcher) * P, P, cfg.seed)
    items = [task.items[i] for i in picked]
    prompt_ids = encode_prompts(tokenizer, cfg.prompt_template, items)
    r, rewards, failed, timeouts, _ = generate_and_score(cfg, sampler, tokenizer, task, items, prompt_ids, [n] * P,
                                                         cfg.temperature, cfg.seed * 1_000_003 + 500_009 + round_,
                                                         [searcher * P + i for i in range(P)])
    sampler.release_kv()
    sequences = [prompt_ids[p] + t for p, t in zip(r.prompt_index, r.tokens)]
    with torch.no_grad():
        ref_logp = response_logprobs(ref, sequences, [len(prompt_ids[p]) for p in r.prompt_index],
                                     cfg.temperature, dtype)[0].cpu().split([len(t) for t in r.tokens])
    ints, floats, _ = empty_round(cfg)
    for row, (p, tokens, logp, entropy, reward, ref_t, mask) in enumerate(zip(
            r.prompt_index, r.tokens, r.logprobs, r.entropies, rewards, ref_logp, r.masks)):
        ints[row, :INTS + len(tokens)] = torch.tensor([picked[p], version, round_, len(tokens), *tokens])
        ints[row, INTS + width:INTS + width + len(tokens)] = mask
        # sums over the model's tokens (a tool's have sampler logprob and entropy 0)
        floats[row, :FLOATS] = torch.tensor([reward.item(), ref_t.where(mask, 0.0).sum().item(),
                                             logp.float().sum().item(), entropy.float().sum().item()])
        floats[row, FLOATS:FLOATS + len(tokens)] = logp.float()
    return [ints, floats, torch.tensor([time.time() - t0, waited, failed, timeouts, sum(len(t) for t in r.tokens)],
                                       dtype=torch.float64)]


def to_responses(ints: torch.Tensor, floats: torch.Tensor) -> list[dict]:
    """A round's rows as the replay buffer's responses."""
    out, width = [], (ints.shape[1] - INTS) // 2
    for i, f in zip(ints.tolist(), floats):
        prompt, version, round_, length = i[:INTS]
        out.append({"prompt": prompt, "version": version, "round": round_, "tokens": tuple(i[INTS:INTS + length]),
                    "mask": torch.tensor(i[INTS + width:INTS + width + length], dtype=torch.bool),
                    "reward": f[0].item(), "ref": f[1].item(), "sampler": f[2].item(), "entropy": f[3].item(),
                    "logp": f[FLOATS:FLOATS + length].clone()})
    return out


def empty_round(cfg: Config) -> list[torch.Tensor]:
    """A round's fixed shapes, zeros: the buffers it is gathered into."""
    rows = prompts_per_searcher(cfg) * samples_per_prompt(cfg)
    return [torch.zeros(rows, INTS + 2 * cfg.max_new_tokens, dtype=torch.long),
            torch.zeros(rows, FLOATS + cfg.max_new_tokens), torch.zeros(len(STATS), dtype=torch.float64)]


def gather_round(cfg: Config, mine: list[torch.Tensor] | None, roles: Roles) -> list[list[torch.Tensor]] | None:
    """Every searcher's round to trainer rank 0 (returned there, one list per searcher; None elsewhere)."""
    rank0 = dist.get_rank() == 0
    out = []
    for t in mine or empty_round(cfg):
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(roles.handoff))] if rank0 else None
        dist.gather(t, parts, dst=0, group=roles.handoff)
        out.append(parts[1:] if rank0 else None)
    return [list(x) for x in zip(*out)] if rank0 else None


def serve(cfg: Config, sampler, ref, lm, tokenizer, task, roles: Roles, dtype) -> None:
    """A searcher rank's life: round w + 1 sampled with the weights of sync w, handed over at sync w + 1."""
    names, state = handoff_names(lm, sampler), lm.state_dict()
    flat = torch.empty(sum(state[n].numel() for n in names), dtype=torch.bfloat16)
    version, _ = broadcast_weights(flat, 0, roles.handoff)
    load_handoff(sampler, lm, flat, names)
    first = version // cfg.sync_every  # the first sync: 0, or the one a resumed run opens with
    if first == 0:
        gather_round(cfg, search(cfg, sampler, ref, tokenizer, task, 0, roles.rank, version, dtype), roles)
    waited = 0.0
    for w in range(first + 1, sync_count(cfg)):
        mine = search(cfg, sampler, ref, tokenizer, task, w, roles.rank, version, dtype, waited)
        t0 = time.time()
        gather_round(cfg, mine, roles)
        version, _ = broadcast_weights(flat, 0, roles.handoff)
        waited = time.time() - t0
        load_handoff(sampler, lm, flat, names)


class Searchers:
    """The trainer's side: `sync` sends the weights and returns the round due, one [ints, floats, stats] per
    searcher; virtual searchers run here in turn and make the same rounds as ranks."""

    def __init__(self, cfg: Config, roles: Roles, sampler, ref, lm, tokenizer, task, dtype):
        self.cfg, self.roles, self.sampler, self.ref, self.lm = cfg, roles, sampler, ref, lm
        self.tokenizer, self.task, self.n_syncs, self.dtype = tokenizer, task, sync_count(cfg), dtype
        self.names, self.pending = handoff_names(lm, sampler), None
        self.virtual = roles.handoff is None
        # logged each step: the trainer's wait for the last round, and the last broadcast's time, size and checksum
        self.figures = {"trainer_waited": 0.0, "broadcast_s": 0.0, "broadcast_bytes": 0, "weights_checksum": 0}

    def _send(self, version: int) -> torch.Tensor:
        t0 = time.time()
        with torch.no_grad():  # one flat bf16 CPU tensor in names' order, every FSDP2 rank gathering
            flat = torch.cat([w.to(torch.bfloat16).flatten() for _, w in lora.merged(self.lm, self.names)]).cpu()
        if self.virtual:
            self.figures["weights_checksum"] = checksum(flat)
        elif self.roles.rank == 0:  # the other trainer ranks only helped to gather
            _, self.figures["weights_checksum"] = broadcast_weights(flat, version, self.roles.handoff)
        self.figures.update(broadcast_s=time.time() - t0, broadcast_bytes=flat.numel() * 2)
        return flat

    def _search_all(self, round_: int, version: int) -> list[list[torch.Tensor]]:
        return [search(self.cfg, self.sampler, self.ref, self.tokenizer, self.task, round_, s, version, self.dtype)
                for s in range(self.cfg.searchers)]

    def _receive(self) -> list[list[torch.Tensor]]:
        """The due round: gathered on trainer rank 0, then broadcast to the other trainer ranks."""
        t0 = time.time()
        due = gather_round(self.cfg, None, self.roles) if self.roles.rank == 0 else None
        if self.roles.n_trainers > 1:
            due = due or [empty_round(self.cfg) for _ in range(self.cfg.searchers)]
            for t in (t for round_ in due for t in round_):
                dist.broadcast(t, 0, self.roles.trainers_gloo)
        self.figures["trainer_waited"] = time.time() - t0
        return due

    def sync(self, w: int, version: int, first: bool = False):
        """Sync w: the weights (of step `version`) out, round w in (sampled with sync w - 1's, round 0 with 0's)."""
        if not self.virtual:
            due = None if first else self._receive()
            self._send(version)
            return self._receive() if first and w == 0 else due
        load_handoff(self.sampler, self.lm, self._send(version), self.names)
        due = self._search_all(0, version) if first and w == 0 else self.pending  # None before the first sync
        self.pending = self._search_all(w + 1, version) if w + 1 < self.n_syncs else None
        return due
