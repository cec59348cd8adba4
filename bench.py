"""fanout's benchmarks: the sampler against HF transformers' `generate` and the hardware roofline; the
trainer's step throughput and MFU, LoRA against full fine-tuning; programs scored per second.

    python bench.py sampler                 # CPU: SmolLM2-135M in train.py's dtype for this CPU, 64 rollouts of one
                                            # 256-token prompt; --device cuda: a random Qwen2.5-1.5B shape, prompts
                                            # 256/1024/4096, N in {16, 64, 512, 2048} rollouts at the same total
    python bench.py trainer [--device cuda] # one RL update (trainer.train_on_batch), packed against padded
                                            # micro-batches: tokens/s, TFLOP/s, MFU; LoRA against full fine-tuning
    python bench.py reward [--workers N]    # HumanEval's 164 canonical solutions through the sandbox: programs/s
    python bench.py busy [--steps 8]        # demo steps alone and beside a busy process, threads following it or not

It writes JSON (--out). The sampler and trainer cases import only torch, triton and transformers of the
packages, so a GPU machine's own python runs them.
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

import torch
import transformers

import cluster
import config
import lora
import trainer
from forward import ModelConfig, forward, linear
from kernels import attention
from rollout import Sampler


def timed(fn, device: str):
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def run_fanout(sampler: Sampler, prompts, n, new_tokens, device):
    """Rollouts with no stop token, so every one is exactly new_tokens long."""
    sampler.generate(prompts[:1], [min(n[0], 4)], 4, seed=1)  # warm-up
    out, seconds = timed(lambda: sampler.generate(prompts, n, new_tokens, temperature=1.0, seed=0), device)
    return {"tokens_per_s": sum(map(len, out.tokens)) / seconds, "samples_per_s": len(out.tokens) / seconds,
            "seconds": seconds, "kv_bytes": sampler.stats["peak_kv_tokens"] * sampler.kv_bytes_per_token,
            "preemptions": sampler.stats["preemptions"]}


def run_hf(model, prompt: list[int], n: int, new_tokens: int, device):
    ids = torch.tensor([prompt], device=device)
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=new_tokens,
                  max_new_tokens=new_tokens, num_return_sequences=n, return_dict_in_generate=True,
                  pad_token_id=0, attention_mask=torch.ones_like(ids))
    model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4, "num_return_sequences": 4})
    out, seconds = timed(lambda: model.generate(ids, **kwargs), device)
    return {"tokens_per_s": (out.sequences.shape[1] - len(prompt)) * n / seconds, "samples_per_s": n / seconds,
            "seconds": seconds, "kv_bytes": sum(t.numel() * t.element_size() for layer in out.past_key_values.layers
                                                for t in (layer.keys, layer.values))}


def decode_parts(sampler: Sampler, b) -> dict:
    """Milliseconds of decode step `b` replayed, and of its parts: the weight products alone (each layer's and the
    head's, on inputs of the step's shape), the sampling alone, attention as what the step loses when every layer's
    attend returns q instead; everything else is the rest (what the compiled path fuses: norms, rotary, SiLU, adds)."""
    w, rows, ms = sampler.forward_weights(), len(b.tokens), lambda fn: min(timeit.repeat(fn, number=2, repeat=5)) * 500
    inputs = [(lw, name.removesuffix(".weight"), torch.randn(rows, x.shape[1], dtype=sampler.dtype))
              for lw in w["layers"] for name, x in lw.items() if name.endswith(".weight") and x.dim() == 2]
    inputs.append((w, "lm_head", torch.randn(rows, sampler.cfg.hidden_size, dtype=sampler.dtype)))
    pools, keys, temperature = (sampler.k_pool, sampler.v_pool), b.keys, torch.tensor(1.0)
    step = lambda attend: forward(sampler.cfg, w, b.tokens, b.positions, attend, pools, (b,), layer=sampler.layer)
    no_attention = lambda q, *_: q  # one function: the compiled layer compiles once for it (not timed: min of 5)
    with torch.no_grad():
        logits = step(sampler.attend)
        parts = {"step": ms(lambda: sampler.decode_step(b, 1.0, 1.0)),
                 "products": ms(lambda: [linear(lw, x, name) for lw, name, x in inputs]),
                 "attention": ms(lambda: step(sampler.attend)) - ms(lambda: step(no_attention)),
                 "sampling": ms(lambda: sampler.sample_tokens(logits, keys, temperature, 1.0))}
    return {**parts, "everything_else": parts["step"] - parts["products"] - parts["attention"] - parts["sampling"]}


def bench_cpu(args) -> dict:
    """SmolLM2-135M in train.py's dtype for this CPU, HF generate in it too, against our sampler: compiled (where a
    C++ compiler is found) and eager (the default); each one's first run (the compile, cached on disk
    for the next process) apart, then a decode step split into its parts."""
    model, tokenizer = trainer.load_model(config.Config(), torch.device("cpu"))
    dtype, chosen = cluster.compute_dtype(config.Config(dtype=args.dtype), model, torch.device("cpu"))
    model = model.to(dtype)  # in eval mode, as from_pretrained leaves it
    # a chat-formatted prompt cut to exactly 256 tokens of real text
    text = " ".join(f"Step {i}: add the previous result to {i * 7 % 13} and explain why." for i in range(256))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)[:256]
    result = {"case": f"cpu: SmolLM2-135M {chosen['dtype']}, 1 prompt x 64 rollouts, 256 -> +128 tokens", **chosen}
    for name, compiled in (("fanout", True), ("fanout_eager", False)):
        sampler = Sampler(ModelConfig.from_hf(model.config), model.state_dict(), "cpu", 1 << 15, dtype=dtype,
                          compiled=compiled)
        batches, decode = [], sampler.decode_step
        sampler.decode_step = lambda b, *more: batches.append(b) or decode(b, *more)  # the batches kept to replay
        first_s = timed(lambda: sampler.generate([prompt], [64], 128, seed=2), "cpu")[1]
        result[name] = {**run_fanout(sampler, [prompt], [64], 128, "cpu"), "compiled": sampler.compiled,
                        "first_run_s": first_s, "step_ms": decode_parts(sampler, batches[-64])}
    hf = result["hf_generate"] = run_hf(model, prompt, 64, 128, "cpu")
    return {**result, **{f"speedup_{name}": result[name]["tokens_per_s"] / hf["tokens_per_s"]
                         for name in ("fanout", "fanout_eager")}}


def bench_busy(args) -> dict:
    """`train.py demo --steps N` alone and beside one busy process (a spinning python), its threads following the
    load (the default) and fixed at all the cores (OMP_NUM_THREADS): the seconds of its steps, side by side."""
    result = {"case": f"train.py demo, {args.steps} steps, alone and beside one busy process"}
    for load in ("alone", "loaded"):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "loaded" else None
        try:  # the busy process goes whatever happens to a run
            for threads, env in (("follow", {}), ("fixed", {"OMP_NUM_THREADS": str(cluster.physical_cores())})):
                out = Path(tempfile.mkdtemp()) / "run"
                subprocess.run([sys.executable, "train.py", "demo", "--steps", str(args.steps), "--eval-prompts", "4",
                                "--eval-samples", "1", "--out-dir", str(out)], env={**os.environ, **env}, check=True,
                               capture_output=True)
                rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "step" in r]
                result[f"{load}_{threads}_s"] = sum(r["t_step"] for r in rows)
        finally:
            if busy:
                busy.kill()
    return {**result, **{f"loaded_over_alone_{t}": result[f"loaded_{t}_s"] / result[f"alone_{t}_s"] for t in
                         ("follow", "fixed")}}


# ---- GPU ----

def qwen25_15b_config():
    return transformers.Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True)


def random_weights(cfg, device) -> dict:
    """Random bf16 weights with HF's names and shapes (read off a model on the meta device: no memory, no
    download), made on the device; a tied head is the embedding, held once."""
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in transformers.AutoModelForCausalLM.from_config(cfg).state_dict().items()
                  if not (cfg.tie_word_embeddings and n == "lm_head.weight")}
    g = torch.Generator(device=device).manual_seed(0)
    return {name: (torch.randn(shape, generator=g, device=device) * 0.02 + (name.endswith("norm.weight")))
            .to(torch.bfloat16) for name, shape in shapes.items()}


def bench_prefix_vs_unshared(sampler: Sampler, prompt_len: int, n: int, device) -> dict:
    """Shared-prefix attention (prompt KV read once per query tile) against paged attention in
    which every rollout reads its own view of the prompt (what prefix caching does)."""
    c = sampler.cfg
    blocks = torch.arange(-(-prompt_len // sampler.block_size), dtype=torch.int32, device=device)
    q = torch.randn(n, c.num_heads, c.head_dim, dtype=torch.bfloat16, device=device)
    kp, vp, one = sampler.k_pool[0], sampler.v_pool[0], torch.tensor([0], dtype=torch.int32, device=device)
    runs = {"shared": lambda: attention.prefix_attention(q, kp, vp, one, one + n, one + prompt_len, blocks[None], 0.1),
            "unshared": lambda: attention.decode_attention(q, kp, vp, torch.full((n,), prompt_len, dtype=torch.int32,
                                                           device=device), blocks.expand(n, -1), 0.1, 1)}
    ms = {name: timed(lambda: [fn() for _ in range(21)], device)[1] / 21 * 1e3 for name, fn in runs.items()}
    return {"prompt_len": prompt_len, "n": n, "shared_ms": ms["shared"], "unshared_ms": ms["unshared"],
            "speedup": ms["unshared"] / ms["shared"]}


def bench_gpu(args) -> dict:
    """Tokens/s per prompt length and N, and the share of the memory roofline: per decode step every weight
    is read once, each prompt's KV once and each rollout's own KV (new_tokens / 2 on average)."""
    device, cfg = "cuda", qwen25_15b_config()
    weights = random_weights(cfg, device)
    sampler = Sampler(ModelConfig.from_hf(cfg), weights, device, kv_budget_tokens=args.kv_budget_tokens,
                      max_slots=args.max_slots)
    x, y = (torch.empty(1 << 30, dtype=torch.uint8, device=device) for _ in range(2))
    y.copy_(x)
    bandwidth = 2 * x.numel() * 10 / timed(lambda: [y.copy_(x) for _ in range(10)], device)[1]  # read + written
    weight_bytes, rows = sum(w.numel() * w.element_size() for w in weights.values()), []
    for prompt_len in args.prompt_lens:
        for n in args.rollouts:
            prompts = [torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(p))
                       .tolist() for p in range(max(1, args.total // n))]
            r = run_fanout(sampler, prompts, [n] * len(prompts), args.new_tokens, device)
            kv_bytes = sampler.kv_bytes_per_token * len(prompts) * (prompt_len + n * args.new_tokens / 2)
            rows.append({"prompt_len": prompt_len, "n": n, "prompts": len(prompts), **r,
                         "roofline": (weight_bytes + kv_bytes) / (r["seconds"] / args.new_tokens) / bandwidth})
            print(rows[-1], flush=True)
    # eager against the layers compiled by inductor under the CUDA graphs, before HF's model (one more weights copy)
    samplers = {"eager": sampler, "compiled": Sampler(sampler.cfg, weights, device, 1 << 18, compiled=True)}
    compiled = {n: {name: run_fanout(s, [list(range(256))], [n], 64, device)["tokens_per_s"]
                    for name, s in samplers.items()} for n in (64, 256, 1024)}
    hf_model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).to(device).eval()
    hf_model.load_state_dict(weights, strict=False)
    hf_prompt = torch.randint(0, cfg.vocab_size, (args.prompt_lens[0],)).tolist()
    hf = run_hf(hf_model, hf_prompt, args.rollouts[0], args.new_tokens, device)
    ours = run_fanout(sampler, [hf_prompt], [args.rollouts[0]], args.new_tokens, device)
    return {"case": "gpu: random Qwen2.5-1.5B shape, bf16", "device": torch.cuda.get_device_name(),
            "copy_bandwidth_GBps": bandwidth / 1e9, "runs": rows,
            "vs_hf": {"prompt_len": args.prompt_lens[0], "n": args.rollouts[0], "fanout": ours, "hf_generate": hf},
            "prefix_attention": bench_prefix_vs_unshared(sampler, 4096, 512, device), "compiled_decode": compiled}


# ---- trainer ----

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM data sheets
TRAINER_DEFAULTS = {"prompts": (16, 4), "prompt_len": (256, 64), "response_len": (512, 64),  # (CUDA, CPU); lengths:
                    "response_max": (8192, 1024), "tokens_per_microbatch": (16384, 4096)}   # medians, the longest


def train_flops(cfg, sequences, prompt_lens) -> float:
    """Model FLOPs of one forward + backward (PaLM's 6N + attention), the LM head on response tokens only."""
    d, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * d // cfg.num_attention_heads
    body = layers * (2 * d * d + 2 * d * kv + 3 * d * cfg.intermediate_size)  # q, o, k, v, gate, up, down
    tokens, responses = sum(map(len, sequences)), sum(len(s) - p for s, p in zip(sequences, prompt_lens))
    return 6 * body * tokens + 6 * vocab * d * responses + sum(6 * layers * d * len(s) ** 2 for s in sequences)


def long_tailed_batch(args, vocab: int) -> trainer.Batch:
    """args.prompts x args.group_size responses, each group sharing a prompt. Lengths are lognormal, seeded (0):
    prompts median --prompt-len, sigma 0.5, from 8 to 4 x median; responses median --response-len, sigma 1 (the
    long tail of RL responses: the longest of 64 is about 10 x the median), from 1 to --response-max tokens.
    Two right and two wrong answers in every four of a group: every response has an advantage."""
    gen = torch.Generator().manual_seed(0)
    draw = lambda median, sigma, low, high: int(min(high, max(low, median * torch.empty(()).log_normal_(
        0, sigma, generator=gen).item())))
    sequences, prompt_lens = [], []
    for _ in range(args.prompts):
        prompt_len = draw(args.prompt_len, 0.5, 8, 4 * args.prompt_len)
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        for _ in range(args.group_size):
            sequences.append(prompt + torch.randint(0, vocab, (draw(args.response_len, 1.0, 1, args.response_max),),
                                                    generator=gen).tolist())
            prompt_lens.append(prompt_len)
    n, unused = len(sequences), [torch.zeros(len(s) - p) for s, p in zip(sequences, prompt_lens)]  # sampler values
    return trainer.Batch(sequences, prompt_lens, torch.arange(n) // args.group_size, (torch.arange(n) % 2).float(),
                         unused, unused, torch.ones(n, dtype=torch.bool), {})


def bench_trainer(args) -> dict:
    """One RL update (trainer.train_on_batch) on a long-tailed length mix: packed and padded (--no-pack) micro-
    batches on the same model and, with --lora-rank, packed on a LoRA copy, interleaved so all see the same machine."""
    device = torch.device(args.device)
    if device.type == "cuda":  # one rank of FSDP2 with bf16 parameters, as under torchrun
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29512", RANK="0", WORLD_SIZE="1")
        torch.distributed.init_process_group("nccl", device_id=torch.device("cuda", 0))  # nccl wants an index
        dtype, chosen = torch.bfloat16, {"dtype": "bfloat16"}
        lm = transformers.AutoModelForCausalLM.from_config(qwen25_15b_config(), dtype=torch.float32).to(device)
    else:
        lm = trainer.load_model(config.Config(), device)[0]
        dtype, chosen = cluster.compute_dtype(config.Config(dtype=args.dtype), lm, device)
    copies = {"full": lm}
    if args.lora_rank:  # the same update training adapters on a frozen copy (lora.py)
        copies["lora"] = copy.deepcopy(lm)
        lora.add_adapters(copies["lora"], config.Config(lora_rank=args.lora_rank))
    models = {}
    for kind, m in copies.items():
        if args.activation_checkpointing:
            trainer.checkpoint_layers(m)
        model = trainer.Policy(m)
        if device.type == "cuda":
            cluster.shard(model, m.model.layers, device, dtype)
        models[kind] = model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-7)
    batch = long_tailed_batch(args, lm.config.vocab_size)
    tokens, flops = sum(map(len, batch.sequences)), train_flops(lm.config, batch.sequences, batch.prompt_lens)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    result = {"case": f"trainer: {'Qwen2.5-1.5B shape' if device.type == 'cuda' else 'SmolLM2-135M'}, {args.prompts} "
                      f"prompts x {args.group_size} responses, long-tailed lengths ({tokens} tokens), one update, "
                      f"{chosen['dtype']}, micro-batches of {args.tokens_per_microbatch} tokens", **chosen,
              "device": name, "lengths": {k: getattr(args, k) for k in ("prompt_len", "response_len", "response_max")},
              "tokens": tokens, "shared_prompts": device.type == "cpu"}
    layouts = {"packed": ("full", True), "padded": ("full", False), **({"lora": ("lora", True)} if args.lora_rank
                                                                         else {})}
    steps, seconds = {}, dict.fromkeys(layouts, 0.0)
    for layout, (kind, pack) in layouts.items():
        cfg = config.Config(max_tokens_per_microbatch=args.tokens_per_microbatch, pack=pack)
        model, optimizer = models[kind]
        steps[layout] = lambda cfg=cfg, m=model, o=optimizer: trainer.train_on_batch(cfg, m, None, o, batch, 1.0, dtype)
        plans = trainer.plan_step(cfg, model, batch, torch.ones(len(batch.sequences)), 1.0, dtype, None)[0]
        result[layout] = {"microbatches": len(plans), "model_tokens": sum(  # real tokens and padding
            trainer.lay_out(batch.sequences, batch.prompt_lens, rows, False)[0].numel() for rows in plans)}
        steps[layout]()  # warm-up: allocator, Triton compilation, optimizer state
        result[layout]["optimizer_state_MiB"] = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                                                    for t in state.values() if torch.is_tensor(t)) / 2**20
    for _ in range(args.repeats):
        for layout, step in steps.items():
            seconds[layout] += timed(step, args.device)[1] / args.repeats
    for layout, s in seconds.items():
        result[layout].update(seconds_per_step=s, tokens_per_s=tokens / s, tflops_per_s=flops / s / 1e12,
                              mfu=flops / s / 1e12 / peak if peak else None)
    result.update(speedup=seconds["padded"] / seconds["packed"],
                  peak_memory_GiB=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)
    if args.lora_rank:  # LoRA against full fine-tuning, both packed: the ratios of one run on one machine
        result["lora_vs_full"] = {"rank": args.lora_rank, "step_time": seconds["lora"] / seconds["packed"],
                                  "optimizer_state": result["lora"]["optimizer_state_MiB"] /
                                  result["packed"]["optimizer_state_MiB"]}
    return result


# ---- reward ----

def bench_reward(args) -> dict:
    """Scoring throughput: HumanEval's canonical solutions through reward.score, each in its own sandbox."""
    import reward  # its verifiers' packages: fanout's requirements, not a bare GPU machine's
    task = reward.load_task("humaneval", size=0, seed=0)
    responses = [f"```python\n{item['solution']}```" for item in task.items]
    workers, seconds = args.workers or reward.default_workers(), []
    score = lambda: reward.score(task, task.items, responses, workers=workers)
    for _ in range(args.repeats + 1):  # the first round starts the pool and warms the caches: not counted
        (rewards, failures, timeouts), s = timed(score, "cpu")
        seconds.append(s)
        assert sum(rewards) == len(responses) and failures == timeouts == 0, "a canonical solution failed"
    return {"case": f"{len(responses)} HumanEval canonical solutions, each in a sandbox", "workers": workers,
            "cpus": len(os.sched_getaffinity(0)), "seconds": seconds[1:],
            "programs_per_s": len(responses) / min(seconds[1:]), "sandbox": reward.check_sandbox()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["sampler", "trainer", "reward", "busy"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="CPU sampler and trainer cases: auto picks what train.py picks on this CPU")
    parser.add_argument("--out", default=None, help="JSON file (default runs/bench_<what>_<device>.json)")
    cuda_sampler = parser.add_argument_group("sampler, --device cuda (the CPU case is fixed, as above)")
    cuda_sampler.add_argument("--prompt-lens", type=int, nargs="+", default=[256, 1024, 4096])
    cuda_sampler.add_argument("--rollouts", type=int, nargs="+", default=[16, 64, 512, 2048])
    cuda_sampler.add_argument("--total", type=int, default=2048, help="rollouts per run, the same for every N")
    cuda_sampler.add_argument("--new-tokens", type=int, default=1024)
    cuda_sampler.add_argument("--kv-budget-tokens", type=int, default=1 << 21)
    cuda_sampler.add_argument("--max-slots", type=int, default=2048)
    trainer_args = parser.add_argument_group("trainer")
    for flag, (cuda, cpu) in TRAINER_DEFAULTS.items():
        trainer_args.add_argument(f"--{flag.replace('_', '-')}", type=int, help=f"default {cuda} on CUDA, {cpu} on CPU")
    trainer_args.add_argument("--group-size", type=int, default=8, help="responses per prompt")
    trainer_args.add_argument("--activation-checkpointing", action="store_true")
    trainer_args.add_argument("--lora-rank", type=int, default=16, help="also a LoRA update of this rank (0: none)")
    trainer_args.add_argument("--repeats", type=int, default=3, help="trainer and reward cases")
    trainer_args.add_argument("--peak-tflops", type=float, default=None, help="for MFU on a GPU not in the table")
    parser.add_argument("--workers", type=int, default=0, help="reward case: scoring processes (0 = the CPUs)")
    parser.add_argument("--steps", type=int, default=8, help="busy case: demo steps each way")
    args = parser.parse_args()
    for flag, defaults in TRAINER_DEFAULTS.items():
        setattr(args, flag, getattr(args, flag) or defaults[args.device == "cpu"])
    torch.manual_seed(0)
    cluster.set_threads(follow_load=args.device == "cpu")  # as a run sets them
    result = {"sampler": bench_cpu if args.device == "cpu" else bench_gpu, "trainer": bench_trainer,
              "reward": bench_reward, "busy": bench_busy}[args.what](args)
    print(json.dumps(result, indent=1))
    if "speedup_fanout" in result:
        ours, eager = result["fanout"]["tokens_per_s"], result["fanout_eager"]["tokens_per_s"]
        print(f"fanout {ours:.1f} tokens/s (eager {eager:.1f}), HF generate {result['hf_generate']['tokens_per_s']:.1f}"
              f": {result['speedup_fanout']:.2f}x ({result['speedup_fanout_eager']:.2f}x eager)")
    out = Path(args.out or f"runs/bench_{args.what}_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
