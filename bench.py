"""fanout's benchmarks: the sampler against HF transformers' `generate`, and the hardware roofline.

    python bench.py sampler                 # CPU: SmolLM2-135M bf16, 64 rollouts of one 256-token prompt
    python bench.py sampler --device cuda   # GPU: a random Qwen2.5-1.5B-shaped model, prompts 256/1024/4096,
                                            # N in {16, 64, 512, 2048} rollouts per prompt at the same total

It prints a table and writes JSON (--out). Imports only torch, triton and transformers, so a GPU
machine's own python runs it (`./run.sh gpu-check`).
"""

import argparse
import json
import time
from pathlib import Path

import torch
import transformers

from kernels import attention
from rollout import ModelConfig, Sampler


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def fixed_prompt(tokenizer, length: int) -> list[int]:
    """A chat-formatted prompt cut to exactly `length` tokens of real text."""
    text = " ".join(f"Step {i}: add the previous result to {i * 7 % 13} and explain why." for i in range(length))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    return ids[:length]


def cache_bytes(cache) -> int:
    """Bytes held by an HF cache object (every tensor it keeps)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def run_fanout(sampler: Sampler, prompts, n, new_tokens, device):
    """Rollouts with no stop token, so every one is exactly new_tokens long."""
    sampler.generate(prompts[:1], [min(n[0], 4)], 4, seed=1)  # warm-up
    out, seconds = timed(lambda: sampler.generate(prompts, n, new_tokens, temperature=1.0, seed=0), device)
    tokens = sum(len(t) for t in out.tokens)
    return {"tokens_per_s": tokens / seconds, "samples_per_s": len(out) / seconds, "seconds": seconds,
            "kv_bytes": sampler.stats["peak_kv_tokens"] * sampler.kv_bytes_per_token,
            "preemptions": sampler.stats["preemptions"]}


def run_hf(model, prompt: list[int], n: int, new_tokens: int, device):
    ids = torch.tensor([prompt], device=device)
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=new_tokens,
                  max_new_tokens=new_tokens, num_return_sequences=n, return_dict_in_generate=True,
                  pad_token_id=0, attention_mask=torch.ones_like(ids))
    model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4, "num_return_sequences": 4})
    out, seconds = timed(lambda: model.generate(ids, **kwargs), device)
    tokens = (out.sequences.shape[1] - len(prompt)) * n
    return {"tokens_per_s": tokens / seconds, "samples_per_s": n / seconds, "seconds": seconds,
            "kv_bytes": cache_bytes(out.past_key_values)}


def bench_cpu(args) -> dict:
    import train  # the embedded model lives behind train.resolve_model
    path = train.resolve_model(train.EMBEDDED_MODEL, "~/.cache/fanout")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    prompt = fixed_prompt(tokenizer, 256)
    sampler = Sampler(ModelConfig.from_hf(model.config), model.state_dict(), "cpu", kv_budget_tokens=1 << 15)
    ours = run_fanout(sampler, [prompt], [64], 128, "cpu")
    hf = run_hf(model, prompt, 64, 128, "cpu")
    return {"case": "cpu: SmolLM2-135M bf16, 1 prompt x 64 rollouts, 256 -> +128 tokens",
            "fanout": ours, "hf_generate": hf, "speedup_tokens_per_s": ours["tokens_per_s"] / hf["tokens_per_s"]}


# ---- GPU ----

def qwen25_15b_config():
    return transformers.Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True)


def random_weights(cfg, device) -> dict:
    """Random bf16 weights with HF names, built on the device (no model object, no download)."""
    g = torch.Generator(device=device).manual_seed(0)
    head_dim, kv = cfg.hidden_size // cfg.num_attention_heads, cfg.num_key_value_heads
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size), "model.norm.weight": (cfg.hidden_size,)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (cfg.hidden_size,),
                       p + "post_attention_layernorm.weight": (cfg.hidden_size,),
                       p + "self_attn.q_proj.weight": (cfg.hidden_size, cfg.hidden_size),
                       p + "self_attn.q_proj.bias": (cfg.hidden_size,),
                       p + "self_attn.k_proj.weight": (kv * head_dim, cfg.hidden_size),
                       p + "self_attn.k_proj.bias": (kv * head_dim,),
                       p + "self_attn.v_proj.weight": (kv * head_dim, cfg.hidden_size),
                       p + "self_attn.v_proj.bias": (kv * head_dim,),
                       p + "self_attn.o_proj.weight": (cfg.hidden_size, cfg.hidden_size),
                       p + "mlp.gate_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
                       p + "mlp.up_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
                       p + "mlp.down_proj.weight": (cfg.hidden_size, cfg.intermediate_size)})
    return {name: (torch.randn(shape, generator=g, device=device) * 0.02 + (name.endswith("norm.weight")))
            .to(torch.bfloat16) for name, shape in shapes.items()}


def copy_bandwidth(device) -> float:
    """Measured device copy bandwidth in bytes/s (bytes read + written)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _, seconds = timed(lambda: [y.copy_(x) for _ in range(10)], device)
    return 2 * x.numel() * 10 / seconds


def step_bytes(weights: dict, prompt_len: int, n: int, prompts: int, new_tokens: int, kv_per_token: int) -> float:
    """Bytes one decode step must read, averaged over the run: every weight once, each prompt's KV
    once, and each rollout's own KV (new_tokens / 2 on average)."""
    return sum(w.numel() * w.element_size() for w in weights.values()) + kv_per_token * prompts * (
        prompt_len + n * new_tokens / 2)


def bench_prefix_vs_unshared(sampler: Sampler, prompt_len: int, n: int, device) -> dict:
    """Shared-prefix attention (prompt KV read once per query tile) against paged attention in
    which every rollout reads its own view of the prompt (what prefix caching does)."""
    c = sampler.cfg
    blocks = torch.arange(-(-prompt_len // sampler.block_size), dtype=torch.int32, device=device)
    q = torch.randn(n, c.num_heads, c.head_dim, dtype=torch.bfloat16, device=device)
    kp, vp = sampler.k_pool[0], sampler.v_pool[0]
    one = torch.tensor([0], dtype=torch.int32, device=device)
    shared = lambda: attention.prefix_attention(q, kp, vp, one, one + n, one + prompt_len, blocks[None], 0.1)
    unshared = lambda: attention.decode_attention(q, kp, vp, torch.full((n,), prompt_len, dtype=torch.int32,
                                                  device=device), blocks.expand(n, -1), 0.1, 1)
    times = {}
    for name, fn in (("shared", shared), ("unshared", unshared)):
        fn()
        _, seconds = timed(lambda: [fn() for _ in range(20)], device)
        times[name] = seconds / 20
    return {"prompt_len": prompt_len, "n": n, "shared_ms": times["shared"] * 1e3,
            "unshared_ms": times["unshared"] * 1e3, "speedup": times["unshared"] / times["shared"]}


def bench_gpu(args) -> dict:
    device = "cuda"
    cfg = qwen25_15b_config()
    weights = random_weights(cfg, device)
    sampler = Sampler(ModelConfig.from_hf(cfg), weights, device, kv_budget_tokens=args.kv_budget_tokens,
                      max_slots=args.max_slots)
    bandwidth = copy_bandwidth(device)
    kv_per_token = sampler.kv_bytes_per_token
    rows = []
    for prompt_len in args.prompt_lens:
        for n in args.rollouts:
            prompts = [torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(p))
                       .tolist() for p in range(max(1, args.total // n))]
            r = run_fanout(sampler, prompts, [n] * len(prompts), args.new_tokens, device)
            step_s = r["seconds"] / args.new_tokens
            roofline = step_bytes(weights, prompt_len, n, len(prompts), args.new_tokens, kv_per_token) / step_s / bandwidth
            rows.append({"prompt_len": prompt_len, "n": n, "prompts": len(prompts), **r, "roofline": roofline})
            print(rows[-1], flush=True)
    hf_model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).to(device).eval()
    hf_model.load_state_dict(weights, strict=False)
    hf_prompt = [int(t) for t in torch.randint(0, cfg.vocab_size, (args.prompt_lens[0],))]
    hf = run_hf(hf_model, hf_prompt, args.rollouts[0], args.new_tokens, device)
    ours = run_fanout(sampler, [hf_prompt], [args.rollouts[0]], args.new_tokens, device)
    return {"case": "gpu: random Qwen2.5-1.5B shape, bf16", "device": torch.cuda.get_device_name(),
            "copy_bandwidth_GBps": bandwidth / 1e9, "runs": rows,
            "vs_hf": {"prompt_len": args.prompt_lens[0], "n": args.rollouts[0], "fanout": ours, "hf_generate": hf},
            "prefix_attention": bench_prefix_vs_unshared(sampler, 4096, 512, device)}


def print_table(result: dict) -> None:
    print(result["case"])
    pairs = [("fanout", result["fanout"]), ("hf generate", result["hf_generate"])] if "fanout" in result else \
        [(f"P={r['prompt_len']} N={r['n']}", r) for r in result["runs"]]
    print(f"{'':>16} {'tokens/s':>10} {'samples/s':>10} {'KV MiB':>8}")
    for name, r in pairs:
        print(f"{name:>16} {r['tokens_per_s']:>10.1f} {r['samples_per_s']:>10.2f} {r['kv_bytes'] / 2**20:>8.1f}")
    if "speedup_tokens_per_s" in result:
        print(f"fanout / hf generate tokens/s: {result['speedup_tokens_per_s']:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["sampler"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None, help="JSON file (default runs/bench_sampler_<device>.json)")
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--rollouts", type=int, nargs="+", default=[16, 64, 512, 2048])
    parser.add_argument("--total", type=int, default=2048, help="rollouts per run, the same for every N")
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--kv-budget-tokens", type=int, default=1 << 21)
    parser.add_argument("--max-slots", type=int, default=2048)
    args = parser.parse_args()
    torch.manual_seed(0)
    with torch.no_grad():
        result = bench_cpu(args) if args.device == "cpu" else bench_gpu(args)
    print_table(result)
    out = Path(args.out or f"runs/bench_sampler_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
