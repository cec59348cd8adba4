"""fanout's sampler: our own forward pass (forward.py) for Llama / Qwen2 / Qwen3-shaped decoder LMs over a
paged KV cache in which each prompt's KV is stored once and shared by all of its rollouts.

    sampler = Sampler(ModelConfig.from_hf(hf_config), model.state_dict(), "cuda", kv_budget_tokens=1 << 20)
    out = sampler.generate([[1, 2, 3]], n=[512], max_new_tokens=1024, temperature=1.0, stop_token_ids=[2])

A prompt's KV fills blocks once (P tokens) and each rollout owns blocks for its own (T each): N rollouts cost
P + N*T tokens, not N*(P+T). A decode step attends to the prompt's KV for all its running rollouts at once and to
each rollout's own blocks, merged by log-sum-exp (kernels/attention.py); which rollouts run is scheduler.py's.
"""

import os
import warnings
from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.nn.functional as F
import triton

from forward import ModelConfig, decoder_layer, forward
from kernels import attention, sampling
from scheduler import DecodeBatch, Generation


@dataclass
class Rollouts:
    """One entry per response, ordered by (prompt index, sample index); groups share a prompt index."""
    prompt_index: list[int]
    sample_index: list[int]
    tokens: list[list[int]]
    logprobs: list[torch.Tensor]   # sampler logprob of each token under the sampling distribution
    entropies: list[torch.Tensor]  # entropy of the sampling distribution at each token
    finish_reason: list[str]       # "stop" or "length"
    masks: list[torch.Tensor]      # True at each token the model wrote, False in its tools' turns
    tool_calls: list[int]          # tool calls made, and of them, calls that raised or ran out of time
    tool_errors: list[int]


def nucleus(z: torch.Tensor, top_p: float) -> torch.Tensor:
    """z with every token outside the smallest set whose probability reaches top_p set to -inf."""
    sorted_z, order = z.sort(-1, descending=True)
    probs = sorted_z.softmax(-1)
    return z.scatter(-1, order, sorted_z.masked_fill(probs.cumsum(-1) - probs >= top_p, -torch.inf))


def by_layer(c: ModelConfig, weights: dict) -> dict:
    """forward()'s weights: the top-level ones, "lm_head.weight" (the embedding if tied) and "layers", each layer's
    under its names within the layer; the same tensors, so the hand-off's writes show through."""
    prefixes = [f"model.layers.{i}." for i in range(c.num_layers)]
    layers = [{n.removeprefix(p): w for n, w in weights.items() if n.startswith(p)} for p in prefixes]
    top = {n: w for n, w in weights.items() if not n.startswith("model.layers.")}
    return {**top, "lm_head.weight": top.get("lm_head.weight", top["model.embed_tokens.weight"]), "layers": layers}


def graph_key(b: DecodeBatch, temperature: float) -> tuple:
    """What a captured step is fixed to: every input's shape (the block table's too) and whether it samples."""
    return tuple(v.shape if isinstance(v, torch.Tensor) else v for v in vars(b).values()) + (temperature > 0,)


class Sampler:
    """Generation over a paged KV pool with shared prompt KV and continuous batching."""

    def __init__(self, model_config: ModelConfig, weights: dict, device="cpu", kv_budget_tokens: int = 1 << 20,
                 block_size: int = 16, dtype: torch.dtype = torch.bfloat16, max_slots: int = 1024,
                 use_triton: bool | None = None, cuda_graphs: bool | None = None, compiled: bool = False):
        c = model_config
        self.cfg, self.device, self.dtype = c, torch.device(device), dtype
        self.block_size, self.max_slots = block_size, max_slots
        self.num_blocks = kv_budget_tokens // block_size
        self.weights = {name: w.detach().to(self.device, dtype).clone() for name, w in weights.items()
                        if not (c.tied and name == "lm_head.weight")}  # a tied head is the embedding: held once
        self.layered = by_layer(c, self.weights)
        # One block past the pool's own is scratch: padded rows of a graphed step write there.
        self.scratch_block = self.num_blocks
        self.kv_shape = (c.num_layers, self.num_blocks + 1, block_size, c.num_kv_heads, c.head_dim)
        self.k_pool = self.v_pool = None  # allocated by generate(), freed by release_kv()
        self.kv_bytes_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * dtype.itemsize
        # Triton kernels on CUDA, their plain-torch twins elsewhere (DESIGN.md, Kernels)
        self.use_triton = self.device.type == "cuda" if use_triton is None else use_triton
        prefix = "" if self.use_triton else "reference_"
        for name in ("prefix_attention", "decode_attention"):
            setattr(self, name, getattr(attention, prefix + name))
        self.sample = getattr(sampling, prefix + "sample")
        # compiled=True: a decode step's layers and sampling compiled (docs/sampler.md); on CUDA the layers alone
        cpu = self.device.type == "cpu" and not self.use_triton  # Triton's CPU interpreter does not compile
        self.compiled = compiled
        try:
            if self.compiled and cpu:  # inductor imported only then: a second of every process's start otherwise
                from torch._inductor import cpp_builder
                from torch._inductor.runtime.cache_dir_utils import cache_dir
                cpp_builder.get_cpp_compiler()  # raises when inductor finds none
                # its disk cache ignores the vector ISA (AVX2's kernels overrun their buffers under AVX-512): one each
                isa, cache = torch.backends.cpu.get_cpu_capability(), cache_dir()
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache if cache.endswith(isa) else os.path.join(cache, isa)
        except Exception:
            warnings.warn("no C++ compiler found to compile the sampler's decode step: it runs eagerly; install g++")
            self.compiled = False
        bf16_units = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # weights prepacked for oneDNN's bf16 products
        self.prepack = self.compiled and cpu and dtype == torch.bfloat16 and bf16_units  # (float32's plain: faster)
        self.packed, self.packed_version = None, None
        dynamic = True if self.device.type == "cuda" else None  # a CPU's kernels are faster sized: sized first
        self.layer = torch.compile(decoder_layer, dynamic=dynamic) if self.compiled else decoder_layer
        self.attend = torch.compiler.disable(self._attend) if self.use_triton else self._attend  # Triton's: as is
        if self.compiled and not self.use_triton:  # all rows at once, the token ids hashed once (not fused per row)
            token_hash = sampling.hash32(torch.arange(len(self.layered["lm_head.weight"]), device=self.device))
            self.sample = torch.compile(partial(sampling.reference_sample, chunk_elements=None, token_hash=token_hash))
        # decode steps padded to powers of two, replayed as CUDA graphs kept for the run, the temperature an input
        # (on CPU, cuda_graphs=True pads and runs eagerly: how the padding is tested)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.graphs = {}
        self.graph_temperature = torch.ones(1, device=self.device)
        self.graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs and self.device.type == "cuda" else None

    def forward_weights(self) -> dict:
        """The forward's weights, each product's prepacked where self.prepack says, packed again whenever a weight has
        changed since (the hand-off writes them every step: a stale copy would sample from old weights)."""
        if not self.prepack:
            return self.layered
        version = [w._version for w in self.weights.values()]  # the hand-off's in-place writes count up
        if version != self.packed_version:
            pack = torch.ops.mkldnn._reorder_linear_weight  # for any number of rows
            self.packed = {**self.layered, "lm_head.packed": pack(self.layered["lm_head.weight"]), "layers": [
                {**layer, **{n.replace(".weight", ".packed"): pack(w) for n, w in layer.items() if w.dim() == 2}}
                for layer in self.layered["layers"]]}
            self.packed_version = version
        return self.packed

    def release_kv(self) -> None:
        """Free the KV pool for training until the next generate(), unless CUDA graphs point into it (kept then)."""
        if not self.graphs:
            self.k_pool = self.v_pool = None
            torch.cuda.empty_cache()  # returns at once where CUDA never started

    def prefill(self, prompts: list[list[int]], blocks: list[list[int]]) -> torch.Tensor:
        """Each prompt's last-position logits, the prompts run right-padded in one batch, their KV into their blocks."""
        c, bs = self.cfg, self.block_size
        lengths = [len(p) for p in prompts]
        tokens = torch.nn.utils.rnn.pad_sequence([torch.tensor(p) for p in prompts], batch_first=True).to(self.device)
        valid = torch.arange(tokens.shape[1], device=self.device) < torch.tensor(lengths, device=self.device)[:, None]
        slots = torch.tensor([bl[t // bs] * bs + t % bs for bl, n in zip(blocks, lengths) for t in range(n)],
                             device=self.device)
        rep = c.num_heads // c.num_kv_heads

        def attend(q, k, v, k_pool, v_pool):
            attention.write_kv(k_pool, v_pool, k[valid], v[valid], slots)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1),
                                               v.transpose(1, 2).repeat_interleave(rep, 1), is_causal=True)
            return o.transpose(1, 2)

        return forward(c, self.forward_weights(), tokens, torch.arange(max(lengths), device=self.device), attend,
                       (self.k_pool, self.v_pool), keep=(torch.arange(len(prompts)), torch.tensor(lengths) - 1))

    def sample_tokens(self, logits: torch.Tensor, keys: torch.Tensor, temperature, top_p: float):
        """Token, its logprob and the entropy of the sampling distribution, per row."""
        if top_p < 1.0 and temperature > 0:  # nucleus on the tempered distribution (evaluation)
            logits, temperature = nucleus(logits.float() / temperature, top_p), 1.0
        if self.compiled and not isinstance(temperature, torch.Tensor) and temperature > 0:
            temperature = torch.tensor(float(temperature), device=logits.device)  # an input: one compile for all
        return self.sample(logits, keys, temperature)

    def extend(self, b: DecodeBatch, last: torch.Tensor) -> torch.Tensor:
        """The logits at rows `last` of a forward feeding b's tokens, eagerly: a tool turn's, several rows a rollout,
        each attending as a decode step's row does (the conversation before them is never fed again)."""
        return forward(self.cfg, self.forward_weights(), b.tokens, b.positions, self._attend,
                       (self.k_pool, self.v_pool), (b,), keep=last)

    def decode_step(self, b: DecodeBatch, temperature: float, top_p: float):
        """Feed one token per row, attend, sample: (tokens, logprobs, entropies) per row."""
        if not self.cuda_graphs or top_p < 1.0:
            return self._decode(b, temperature, top_p)
        rows, padded = len(b.tokens), self._pad(b)
        if self.device.type != "cuda":
            out = self._decode(padded, temperature, 1.0)
        else:
            key = graph_key(padded, temperature)
            if key not in self.graphs:
                try:
                    self.graphs[key] = self._capture(padded, temperature > 0)
                except RuntimeError as e:  # never lose a run to a capture problem: decode eagerly instead
                    warnings.warn(f"CUDA graph capture failed ({e}); decoding without graphs from now on")
                    self.cuda_graphs = False
                    return self._decode(b, temperature, top_p)
            graph, static, out = self.graphs[key]
            for name, value in vars(padded).items():
                if isinstance(value, torch.Tensor):
                    getattr(static, name).copy_(value)
            self.graph_temperature.fill_(temperature if temperature > 0 else 1.0)  # no host sync: a fill kernel
            graph.replay()
        return tuple(x[:rows].clone() for x in out)

    def _attend(self, q, k, v, kp, vp, b: DecodeBatch):
        """Write the rows' K/V, then attend each row over its prompt's keys and its own, merged."""
        scale = self.cfg.head_dim ** -0.5
        attention.write_kv(kp, vp, k, v, b.write_slots)
        o1, lse1 = self.prefix_attention(q, kp, vp, b.group_start, b.group_count, b.prompt_len, b.prompt_blocks,
                                         scale, b.max_count)
        o2, lse2 = self.decode_attention(q, kp, vp, b.seq_len, b.block_table, scale, b.num_splits)
        return attention.merge_attention(o1, lse1, o2, lse2, q.dtype)

    def _decode(self, b: DecodeBatch, temperature, top_p: float):
        logits = forward(self.cfg, self.forward_weights(), b.tokens, b.positions, self.attend,
                         (self.k_pool, self.v_pool), (b,), layer=self.layer)
        return self.sample_tokens(logits, b.keys, temperature, top_p)

    def _pad(self, b: DecodeBatch) -> DecodeBatch:
        """b rounded up to powers of two in rows, groups, prompt blocks, largest group (padding: the scratch block)."""
        rows, groups, scratch = len(b.tokens), len(b.group_start), self.scratch_block
        fill = dict(tokens=0, positions=0, keys=0, write_slots=scratch * self.block_size, seq_len=1,
                    block_table=scratch, group_start=rows, group_count=0, prompt_len=1, prompt_blocks=scratch)
        padded = {}
        for name, value in fill.items():  # per row, or per group (a group's fields are group_* and prompt_*)
            x, n = getattr(b, name), groups if name.startswith(("group", "prompt")) else rows
            if name in ("block_table", "prompt_blocks"):
                x = F.pad(x, (0, triton.next_power_of_2(x.shape[1]) - x.shape[1]), value=value)
            padded[name] = torch.cat([x, x.new_full((triton.next_power_of_2(n) - n, *x.shape[1:]), value)])
        return DecodeBatch(**padded, num_splits=b.num_splits, max_count=triton.next_power_of_2(b.max_count))

    def _capture(self, static: DecodeBatch, sampled: bool):
        """One padded decode step as a CUDA graph; `static`'s tensors and graph_temperature become its inputs."""
        temperature = self.graph_temperature if sampled else 0.0
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile the Triton kernels and warm the allocator outside capture
            self._decode(static, temperature, 1.0)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):  # every size shares one memory pool
            out = self._decode(static, temperature, 1.0)
        return graph, static, out

    def generate(self, prompts: list[list[int]], n: list[int], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, stop_token_ids=(), seed: int = 0, prompt_keys: list[int] | None = None,
                 tools=None) -> Rollouts:
        """n[i] rollouts of prompts[i], ordered by (prompt index, sample index). Prompt i is keyed prompt_keys[i]
        (default i): a request split over calls or ranks samples the tokens of the whole in one call. With `tools`
        (tools.Tools) a rollout may call them; max_new_tokens then bounds its tokens and its tools' together."""
        if len(n) != len(prompts) or (prompt_keys is not None and len(prompt_keys) != len(prompts)):
            raise ValueError(f"generate got {len(prompts)} prompts but {len(n)} rollout counts and "
                             f"{len(prompt_keys or prompts)} prompt keys; pass one of each per prompt")
        if min(n, default=0) < 0:  # one sentence for each request that would sample nonsense or fail deep inside
            raise ValueError(f"a rollout count is negative ({min(n)}); ask for 0 or more rollouts per prompt")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
        if temperature < 0:
            raise ValueError(f"temperature={temperature} is negative; use 0 for greedy decoding or a positive value")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p} is outside (0, 1]; use 1.0 to sample from the whole distribution")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            if n[i]:
                self.check_fits(len(p), max_new_tokens, f"prompt {i}")
        if self.k_pool is None:
            self.k_pool = torch.empty(self.kv_shape, device=self.device, dtype=self.dtype)
            self.v_pool = torch.empty(self.kv_shape, device=self.device, dtype=self.dtype)
            self.clear_blocks([self.scratch_block])
        keys = list(range(len(prompts))) if prompt_keys is None else prompt_keys
        with torch.no_grad():
            run = Generation(self, prompts, n, max_new_tokens, temperature, top_p, stop_token_ids, seed, keys, tools)
            results = run.run()
        self.stats = {"preemptions": run.preemptions, "evictions": run.evictions,
                      "peak_kv_tokens": run.peak_blocks * self.block_size, "fed_tokens": run.fed_tokens}
        keys = sorted(results)
        columns = list(zip(*(results[k] for k in keys))) or [()] * (len(fields(Rollouts)) - 2)  # none: all empty
        return Rollouts([p for p, _ in keys], [s for _, s in keys], *map(list, columns))

    def clear_blocks(self, blocks: list[int]) -> None:
        """Zero blocks as they are handed out: the torch path reads them whole, and NaN would survive a zero weight."""
        if not self.use_triton and blocks:
            index = torch.tensor(blocks, device=self.device)
            self.k_pool[:, index] = 0
            self.v_pool[:, index] = 0

    def check_fits(self, prompt_tokens: int, max_new_tokens: int, what: str) -> None:
        if self.blocks_for(prompt_tokens) + self.blocks_for(max_new_tokens) > self.num_blocks:
            raise ValueError(f"{what} ({prompt_tokens} tokens) plus max_new_tokens={max_new_tokens} does not fit "
                             f"kv_budget_tokens={self.num_blocks * self.block_size}; raise the budget")

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)
