"""The sampler's scheduler: continuous batching over decode slots and a paged KV pool. A finished rollout frees its slot
and blocks for the next; when blocks run out, idle prompts' KV goes first, then the newest running rollout is preempted
and restarted later. Randomness is keyed by (seed, prompt, sample, position), so none of this changes which tokens come
out. With tools (tools.py), a rollout that closes a call waits, its slot and KV kept, while the others decode; the
call's turn is then fed into its own KV with the next step, and a restarted rollout finds its calls' outputs recorded.
"""

from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

import torch

from kernels.sampling import sample_keys


@dataclass
class DecodeBatch:
    """One decode step's inputs; rows sorted by prompt, group g's from group_start[g] on, its KV prompt_blocks[g]."""
    tokens: torch.Tensor         # [R] the token each row feeds
    positions: torch.Tensor      # [R] its absolute position
    keys: torch.Tensor           # [R] randomness keys of the token each row samples next
    write_slots: torch.Tensor    # [R] pool slot for the fed token's K/V
    seq_len: torch.Tensor        # [R] int32: own tokens, the fed one included
    block_table: torch.Tensor    # [R, own blocks] int32
    group_start: torch.Tensor    # [G] int32
    group_count: torch.Tensor    # [G] int32
    prompt_len: torch.Tensor     # [G] int32
    prompt_blocks: torch.Tensor  # [G, prompt blocks] int32
    num_splits: int              # split-K chunks of the own-token attention
    max_count: int               # rows of the largest group


@dataclass(eq=False)
class _Prompt:
    index: int
    tokens: list[int]
    waiting: deque                       # sample indices not running yet (a preempted one goes back in front)
    running: int = 0                     # rollouts running now
    blocks: list[int] | None = None      # its KV blocks once prefilled
    logits: torch.Tensor | None = None   # its last-position logits: every rollout's first token comes from them


@dataclass(eq=False)
class _Rollout:
    prompt: _Prompt
    sample: int
    slot: int
    length: int = 0                      # its tokens so far, the model's and its tools'
    blocks: list[int] = field(default_factory=list)
    fed: int = 0                         # its tokens with KV written: the next step feeds [fed, length)
    turn: int = 0                        # where the model's current turn began (after its last tool turn)
    calls: int = 0                       # tool calls made, and of them, calls that raised or ran out of time
    errors: int = 0
    tool: Future | None = None           # the call it waits for (it does not decode meanwhile)


class Generation:
    """The state of one generate() call; `s` is the Sampler, whose prefill and decode steps it schedules."""

    def __init__(self, s, prompts, n, max_new_tokens, temperature, top_p, stop_token_ids, seed, prompt_keys, tools):
        self.s, self.max_new, self.temperature, self.top_p = s, max_new_tokens, temperature, top_p
        self.seed, self.prompt_keys, self.tools = seed, prompt_keys, tools
        self.calls: dict[tuple, Future] = {}  # (prompt, sample, call) -> its output: a restart reuses it
        # KV blocks not in use; a used block is one prompt's (freed with its last rollout, or evicted) or one rollout's
        self.free_blocks = list(range(s.num_blocks))[::-1]
        self.pending = deque(_Prompt(i, p, deque(range(k))) for i, (p, k) in enumerate(zip(prompts, n)) if k > 0)
        self.active: list[_Prompt] = []    # prefilled prompts with unfinished rollouts, oldest first
        self.running: list[_Rollout] = []  # admission order: the last is the newest
        self.free_slots = list(range(s.max_slots))[::-1]
        self.results = {}
        self.preemptions = self.evictions = self.peak_blocks = self.fed_tokens = 0
        dev = s.device
        self.stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=dev)
        self.out_tok = torch.zeros(s.max_slots, max_new_tokens, dtype=torch.long, device=dev)
        self.out_lp, self.out_ent = torch.zeros(2, s.max_slots, max_new_tokens, device=dev)
        self.out_model = torch.ones(s.max_slots, max_new_tokens, dtype=torch.bool, device=dev)  # False: a tool's
        self.may_close = tools.closing_ids.to(dev) if tools else None  # tokens that can end a tool call
        self.slot_blocks = torch.zeros(s.max_slots, s.blocks_for(max_new_tokens), dtype=torch.int32, device=dev)

    def run(self) -> dict:
        while self.pending or self.active:
            self.take_tool_turns()
            if not self.admit() and not self.stepping():
                if self.running:  # every running rollout waits for its tool: the next round takes the first done
                    wait([r.tool for r in self.running], return_when=FIRST_COMPLETED)
                elif self.active:  # every block is held by prompts whose rollouts wait for room: drop the newest KV
                    self.evict(self.active[-1])
                continue
            self.reserve_blocks()
            if rollouts := self.stepping():
                self.peak_blocks = max(self.peak_blocks, self.s.num_blocks - len(self.free_blocks))
                self.step(rollouts)
        return self.results

    def stepping(self) -> list[_Rollout]:
        """The running rollouts not waiting for a tool, their prompts' rollouts together."""
        return sorted((r for r in self.running if r.tool is None), key=lambda r: r.prompt.index)

    def take_tool_turns(self) -> None:
        """Rollouts whose call is done get its turn (the template's framing around the output) as their next
        tokens, conditioned on, never sampled; the next step feeds them. One that cannot fit it ends ("length")."""
        for r in [r for r in self.running if r.tool is not None and r.tool.done()]:
            (output, ok), r.tool = r.tool.result(), None
            ids = self.tools.turn(output)
            end = r.length + len(ids)
            if end >= self.max_new:  # no room for the turn and a token of the model's after it
                self.finish(r, "length")
                continue
            r.calls, r.errors = r.calls + 1, r.errors + (not ok)
            self.out_tok[r.slot, r.length:end] = torch.tensor(ids, device=self.s.device)
            self.out_lp[r.slot, r.length:end] = self.out_ent[r.slot, r.length:end] = 0.0
            self.out_model[r.slot, r.length:end] = False
            r.length = r.turn = end

    def admit(self) -> int:
        """Start waiting rollouts while slots and blocks allow, prefilling new prompts as needed."""
        started = []
        while self.free_slots and len(self.free_blocks) > len(started):
            prompt = next((p for p in self.active if p.waiting), None)
            if prompt is None:
                if not self.prefill_pending(len(self.free_blocks) - len(started)):
                    break
                continue
            rollout = _Rollout(prompt, prompt.waiting.popleft(), self.free_slots.pop())
            prompt.running += 1
            self.running.append(rollout)
            started.append(rollout)
        if started:  # first tokens come straight from the prompts' last logits
            logits = torch.stack([r.prompt.logits for r in started])
            self.record(started, *self.s.sample_tokens(logits, self.keys(started), self.temperature, self.top_p))
        return len(started)

    def prefill_pending(self, free_blocks: int) -> bool:
        """Prefill the next pending prompts that fit (their KV, a block for a first rollout), padded by under half."""
        batch = []
        while self.pending and len(batch) < len(self.free_slots):
            lengths = [len(p.tokens) for p in (*batch, self.pending[0])]  # right-padded to the longest in one batch
            need = self.s.blocks_for(lengths[-1]) + 1
            if need > free_blocks or (batch and len(lengths) * max(lengths) > 2 * sum(lengths)):
                break
            free_blocks -= need
            prompt = self.pending.popleft()
            prompt.blocks = [self.free_blocks.pop() for _ in range(need - 1)]
            self.s.clear_blocks(prompt.blocks[-1:])  # the others are written whole
            batch.append(prompt)
        if batch:
            self.fed_tokens += sum(len(p.tokens) for p in batch)
            for prompt, row in zip(batch, self.s.prefill([p.tokens for p in batch], [p.blocks for p in batch])):
                prompt.logits = row
            self.active.extend(batch)
        return bool(batch)

    def reserve_blocks(self) -> None:
        """Give every rollout the next step feeds the blocks its fed tokens go into."""
        writes = []
        for rollout in self.running:  # oldest first; preemption only ever pops the newest, ending the loop sooner
            while rollout.tool is None and len(rollout.blocks) * self.s.block_size < rollout.length:
                block = self.alloc_block(rollout)
                if block is None:  # the rollout itself was the newest and was preempted
                    break
                writes.append((rollout.slot, len(rollout.blocks), block))
                rollout.blocks.append(block)
        if writes:
            self.s.clear_blocks([block for _, _, block in writes])
            slot, index, block = torch.tensor(writes, device=self.s.device).T
            self.slot_blocks[slot, index] = block.to(torch.int32)

    def alloc_block(self, rollout: _Rollout) -> int | None:
        """A free block, made by dropping idle prompts' KV (newest first), then preempting the newest rollout."""
        while not self.free_blocks:
            if idle := [p for p in self.active if p.running == 0]:
                self.evict(idle[-1])
                continue
            victim = self.running.pop()
            self.preemptions += 1
            self.free_blocks.extend(victim.blocks)
            victim.prompt.waiting.appendleft(victim.sample)
            victim.prompt.running -= 1
            self.free_slots.append(victim.slot)
            if victim is rollout:
                return None
        return self.free_blocks.pop()

    def evict(self, prompt: _Prompt) -> None:
        """Free an idle prompt's KV; it is prefilled again when its rollouts get room."""
        assert not prompt.running, "a prompt's KV is freed only once none of its rollouts runs"
        self.evictions += 1
        self.free_blocks.extend(prompt.blocks)
        prompt.blocks = prompt.logits = None
        self.active.remove(prompt)
        self.pending.appendleft(prompt)  # evicted newest-first, so pending stays in prompt order

    def keys(self, rollouts: list[_Rollout]) -> torch.Tensor:
        """Randomness keys of the token each rollout samples next."""
        rows = torch.tensor([(self.prompt_keys[r.prompt.index], r.sample, r.length) for r in rollouts],
                            device=self.s.device).T
        return sample_keys(self.seed, *rows)

    def step(self, rollouts: list[_Rollout]) -> None:
        """Every rollout not waiting for a tool feeds what it has not fed and samples its next token: its last token in
        a decode step, or the call's closing token and the tool turn in a forward of their own, one row a token."""
        turns, decoding = [r for r in rollouts if r.length - r.fed > 1], [r for r in rollouts if r.length - r.fed == 1]
        if turns:
            rows = [(r, p) for r in turns for p in range(r.fed, r.length)]
            last = torch.tensor([i for i, (r, p) in enumerate(rows) if p == r.length - 1], device=self.s.device)
            logits = self.s.extend(self.feed(rows), last)
            self.record(turns, *self.s.sample_tokens(logits, self.keys(turns), self.temperature, self.top_p))
        if decoding:  # chosen before the turns sampled: a rollout takes one token a step
            batch = self.feed([(r, r.length - 1) for r in decoding])
            self.record(decoding, *self.s.decode_step(batch, self.temperature, self.top_p))

    def feed(self, rows: list[tuple[_Rollout, int]]) -> DecodeBatch:
        """A forward's inputs: each (rollout, own position) row feeds its token there (grouped by prompt); marks fed."""
        s, dev = self.s, self.s.device
        counts = Counter(r.prompt for r, _ in rows)  # its keys are the groups, in row order
        slot = torch.tensor([r.slot for r, _ in rows], device=dev)
        pos = torch.tensor([p for _, p in rows], device=dev)  # own position of the fed token
        group_count = torch.tensor(list(counts.values()), dtype=torch.int32, device=dev)
        prompt_len = torch.tensor([len(g.tokens) for g in counts], dtype=torch.int32, device=dev)
        block_table = self.slot_blocks[slot, :s.blocks_for(max(p for _, p in rows) + 1)]
        batch = DecodeBatch(
            tokens=self.out_tok[slot, pos], positions=prompt_len.repeat_interleave(group_count.long()) + pos,
            keys=self.keys([r for r, _ in rows]), seq_len=(pos + 1).to(torch.int32), block_table=block_table,
            write_slots=block_table[torch.arange(len(rows), device=dev), pos // s.block_size].long() * s.block_size
            + pos % s.block_size,
            group_start=torch.cumsum(group_count, 0, dtype=torch.int32) - group_count, group_count=group_count,
            prompt_len=prompt_len, prompt_blocks=torch.nn.utils.rnn.pad_sequence(
                [torch.tensor(g.blocks, dtype=torch.int32) for g in counts], batch_first=True).to(dev),
            # split-K parallelism for the kernels' long own-token reads; the torch path reads them at once
            num_splits=max(1, min(8, -(-max(r.length for r, _ in rows) // 512))) if s.use_triton else 1,
            max_count=max(counts.values()))
        self.fed_tokens += len(rows)
        for r, _ in rows:
            r.fed = r.length
        return batch

    def record(self, rollouts: list[_Rollout], tok, lp, ent) -> None:
        """Store each rollout's new token; finished rollouts leave and free their slot and blocks; one that closed a
        tool call waits for it."""
        slot, length = torch.tensor([(r.slot, r.length) for r in rollouts], device=self.s.device).T
        self.out_tok[slot, length], self.out_lp[slot, length], self.out_ent[slot, length] = tok, lp, ent
        self.out_model[slot, length] = True
        stopped = torch.isin(tok, self.stop_ids)
        done = (stopped | (length + 1 == self.max_new)).tolist()
        may_close = self.may_close[tok].tolist() if self.tools else [False] * len(rollouts)
        for rollout, is_done, is_stop, closes in zip(rollouts, done, stopped.tolist(), may_close):
            rollout.length += 1
            if is_done:
                self.finish(rollout, "stop" if is_stop else "length")
            elif closes and rollout.calls < self.tools.max_calls:
                self.start_call(rollout)

    def start_call(self, r: _Rollout) -> None:
        """If the model's turn ends with a tool call, the rollout waits for it (run once, even across restarts)."""
        if (code := self.tools.code(self.out_tok[r.slot, r.turn:r.length].tolist())) is not None:
            key = (r.prompt.index, r.sample, r.calls)
            if key not in self.calls:
                self.calls[key] = self.tools.run(code, r.prompt.index)
            r.tool = self.calls[key]

    def finish(self, rollout: _Rollout, reason: str) -> None:
        i, n = rollout.slot, rollout.length
        self.results[(rollout.prompt.index, rollout.sample)] = (
            self.out_tok[i, :n].tolist(), self.out_lp[i, :n].clone(), self.out_ent[i, :n].clone(), reason,
            self.out_model[i, :n].to("cpu", copy=True), rollout.calls, rollout.errors)
        self.running.remove(rollout)
        self.free_slots.append(rollout.slot)
        prompt = rollout.prompt
        self.free_blocks.extend(rollout.blocks)
        prompt.running -= 1
        if not prompt.running and not prompt.waiting:  # its last rollout: the prompt's KV goes
            self.free_blocks.extend(prompt.blocks)
            self.active.remove(prompt)
