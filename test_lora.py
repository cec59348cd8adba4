"""LoRA (lora.py): step 0 is the base model, only adapters train, the sampler gets the merged weights, the
reference is the base with adapters off; two ranks train like one, resume after SIGKILL is exact, the PEFT
export loads with peft; bad input is one sentence. Run by test_all.py."""

import copy
import dataclasses
import json
import math
import re
import subprocess
import sys
import time

import pytest
import torch
import transformers
from safetensors.torch import load_file

import config
import lora
import search
import trainer
from forward import ModelConfig
from kernels.test_kernels import random_prompts, tiny_model
from rollout import Sampler
from test_run import ONE_THREAD, TIMING, step_rows, tba_run
from test_sampler import HANG_GUARD, ROOT, save_tiny_model

CFG = config.Config(lora_rank=4, lora_alpha=8.0, lr=1e-2, entropy_coef=1e-2, dtype="float32")


def adapted(kind: str, cfg=CFG):
    lm = tiny_model(kind, seed=3)
    base = copy.deepcopy(lm).requires_grad_(False)
    lora.add_adapters(lm, cfg)
    return lm, base


def sequences(n: int, seed: int):
    prompts = random_prompts(256, [7] * n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    seqs = [p + torch.randint(3, 256, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            for p in prompts]
    return seqs, [len(p) for p in prompts]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_step_zero_is_the_base_and_training_moves_only_adapters(kind):
    lm, base = adapted(kind)
    seqs, lens = sequences(6, seed=len(kind))
    logp = lambda policy: trainer.response_logprobs(policy, seqs, lens, 1.0, torch.float32)[0]
    assert torch.equal(logp(trainer.Policy(lm)), logp(trainer.Policy(base)))  # B = 0: exactly the base
    frozen = {n: p.clone() for n, p in lm.named_parameters() if ".lora_" not in n}
    adapters = {n: p.clone() for n, p in lm.named_parameters() if ".lora_" in n}
    assert all(p.requires_grad == (".lora_" in n) for n, p in lm.named_parameters()) and len(adapters) == 2 * 2 * 7
    policy = trainer.Policy(lm)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=CFG.lr)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    for _ in range(3):
        batch = trainer.Batch(seqs, lens, torch.arange(6) // 3, rewards, [torch.zeros(len(s) - p) for s, p in
                              zip(seqs, lens)], [torch.zeros(len(s) - p) for s, p in zip(seqs, lens)],
                              torch.ones(6, dtype=torch.bool), {})
        trainer.train_on_batch(CFG, policy, trainer.Base(policy), optimizer, batch, 1.0, torch.float32)
        assert all(p.grad is None for n, p in lm.named_parameters() if ".lora_" not in n)
    assert all(torch.equal(p, frozen[n]) for n, p in lm.named_parameters() if ".lora_" not in n)  # bit-identical
    assert all(not torch.equal(p, adapters[n]) for n, p in lm.named_parameters() if ".lora_" in n)
    assert torch.equal(logp(trainer.Base(policy)), logp(trainer.Policy(base)))  # the reference: adapters off
    trained = logp(policy)
    assert (trained - logp(trainer.Policy(base))).abs().max() > 1e-3

    # the hand-off: the sampler on W + alpha / r B A gives the trainer's log-probs
    sampler = Sampler(ModelConfig.from_hf(lm.config), base.state_dict(), "cpu", dtype=torch.float32)
    trainer.sync_sampler(sampler, lm)
    for name, w in sampler.weights.items():
        prefix = name.removesuffix(".weight")
        if prefix.rpartition(".")[2] in CFG.lora_targets:
            module = lm.get_submodule(prefix)
            want = module.weight + CFG.lora_alpha / CFG.lora_rank * module.lora_B.weight @ module.lora_A.weight
            torch.testing.assert_close(w, want, rtol=0, atol=1e-6)
        else:
            assert torch.equal(w, base.state_dict()[name])
    out = sampler.generate([s[:p] for s, p in zip(seqs, lens)], [2] * 6, max_new_tokens=6, temperature=1.0, seed=5)
    full = [seqs[i][:lens[i]] + t for i, t in zip(out.prompt_index, out.tokens)]
    want = trainer.response_logprobs(policy, full, [lens[i] for i in out.prompt_index], 1.0, torch.float32)[0]
    torch.testing.assert_close(torch.cat(out.logprobs).float(), want.detach(), atol=2e-4, rtol=0)


def test_tba_searchers_merge_the_adapters_they_are_sent():
    """A sync carries the adapters alone; a searcher merges them into its own frozen base: its sampler then holds
    what the trainer's hand-off writes."""
    lm, _ = adapted("llama")
    searcher, _ = adapted("llama")  # the initial model and adapters, as a searcher rank builds them
    with torch.no_grad():
        for p in lm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    names = search.handoff_names(lm, Sampler(ModelConfig.from_hf(lm.config), lm.state_dict(), "cpu"))
    assert names == lora.adapter_names(lm) and all(".lora_" in n for n in names)
    flat = torch.cat([lm.state_dict()[n].to(torch.bfloat16).flatten() for n in names])
    assert flat.numel() < sum(p.numel() for p in lm.parameters()) / 4
    mine = Sampler(ModelConfig.from_hf(lm.config), searcher.state_dict(), "cpu", dtype=torch.float32)
    search.load_handoff(mine, searcher, flat, names)
    rounded = copy.deepcopy(lm)  # the trainer's adapters as they travel: in bf16
    with torch.no_grad():
        for n, p in rounded.named_parameters():
            if ".lora_" in n:
                p.copy_(p.to(torch.bfloat16))
    theirs = Sampler(ModelConfig.from_hf(lm.config), searcher.state_dict(), "cpu", dtype=torch.float32)
    trainer.sync_sampler(theirs, rounded)
    assert all(torch.equal(mine.weights[n], theirs.weights[n]) for n in mine.weights)
    assert not torch.equal(mine.weights["model.layers.0.mlp.up_proj.weight"], lm.model.layers[0].mlp.up_proj.weight)


def test_bad_lora_input_is_one_sentence():
    cases = [(dict(lora_rank=65), "--lora-rank 65 is above q_proj's dimensions (64 in, 64 out); use at most 64"),
             (dict(lora_targets=("q_proj", "qkv_proj")), "--lora-targets qkv_proj matches no layer"),
             (dict(lora_targets=("mlp",)), "this model's mlp is a LlamaMLP, not a torch.nn.Linear"),
             (dict(lora_targets=()), "--lora-targets (none) matches no layer")]
    for flags, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            adapted("llama", dataclasses.replace(CFG, **flags))
        assert str(e.value).count(". ") == 0 and str(e.value).count(";") == 1
    lm = tiny_model("llama", seed=3)
    with pytest.raises(ValueError) as e:  # the model is left as it was: nothing adapted, nothing frozen
        lora.add_adapters(lm, dataclasses.replace(CFG, lora_targets=("q_proj", "attn")))
    assert str(e.value).endswith("name some of its linear layers: down_proj gate_proj k_proj o_proj q_proj up_proj "
                                 "v_proj")
    assert all(p.requires_grad for p in lm.parameters()) and not any(isinstance(m, lora.LoRALinear)
                                                                     for m in lm.modules())
    for flags, message in [(dict(lora_rank=-1), "--lora-rank -1 must be at least 0"),
                           (dict(lora_alpha=0.0), "--lora-alpha 0.0 must be above 0"),
                           (dict(lora_dropout=1.0), "--lora-dropout 1.0 is a probability below 1"),
                           (dict(ref_reset_every=10, kl_coef=0.1), "with LoRA the reference is the frozen base")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            dataclasses.replace(CFG, **flags)



def lora_run(tmp_path, name: str, ranks: int, *flags: str, wait=True):
    """A few steps of a small random model (the real tokenizer) with LoRA, KL to the base and an entropy bonus
    (its rewards are all 0); ranks 0: plain python, else torchrun."""
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks)] if ranks else []
    command = [sys.executable, *launch, "train.py", "demo", "--model", str(tmp_path / "model"), "--dtype", "float32",
               "--prompts-per-step", "4", "--rollouts-per-prompt", "4", "--max-new-tokens", "8", "--eval-prompts",
               "4", "--eval-samples", "1", "--lr", "1e-2", "--entropy-coef", "1e-2", "--kl-coef", "1e-2",
               "--adam-eps", "1e-5", "--steps", "4", "--lora-rank", "4", "--lora-alpha", "8",
               "--out-dir", str(tmp_path / name), *flags]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=ONE_THREAD)
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD, env=ONE_THREAD)
    assert run.returncode == 0, run.stderr[-3000:]
    return step_rows(tmp_path / name)


def test_lora_runs_two_ranks_like_one_resume_exactly_and_export_for_peft(tmp_path, smollm2):
    """One process against two FSDP2 ranks (these recomputing each layer in the backward): the same rows to float32
    rounding and the same merged weights; the PEFT export; SIGKILL and --resume auto against an unbroken run."""
    save_tiny_model(tmp_path / "model", "llama", smollm2[1], seed=0)
    one = lora_run(tmp_path, "one", 0, "--export-hf", str(tmp_path / "one" / "export"))
    two = lora_run(tmp_path, "two", 2, "--export-hf", str(tmp_path / "two" / "export"), "--activation-checkpointing")
    assert [r["step"] for r in one] == [0, 1, 2, 3] and all(r["grad_norm"] > 0 for r in one) and one[-1]["kl"] > 0
    for a, b in zip(one, two, strict=True):
        assert {k: v for k, v in a.items() if not isinstance(v, float)} == \
               {k: v for k, v in b.items() if not isinstance(v, float)}
        assert all(math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-7) for k, v in a.items() if isinstance(v, float))
    merged = {ranks: load_file(tmp_path / ranks / "export" / "model.safetensors") for ranks in ("one", "two")}
    base = load_file(tmp_path / "model" / "model.safetensors")
    assert merged["one"].keys() == base.keys() and not any(".lora_" in n for n in merged["one"])
    for name, w in base.items():
        torch.testing.assert_close(merged["two"][name], merged["one"][name], rtol=1e-5, atol=1e-6)
        assert torch.equal(merged["one"][name], w) == (name.rpartition(".")[0].rpartition(".")[2]
                                                       not in config.Config().lora_targets), name

    # the PEFT folder on the base model gives the merged model's logits
    from peft import PeftModel
    export = tmp_path / "one" / "export"
    assert json.loads((export / "adapter" / "adapter_config.json").read_text())["r"] == 4
    peft_model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", dtype=torch.float32), export / "adapter").eval()
    plain = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    ids = torch.tensor(random_prompts(len(smollm2[1]), [12, 12], seed=7))
    with torch.no_grad():
        want, got = plain(ids).logits, peft_model(ids).logits
        base_logits = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)(
            ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - base_logits).abs().max() > 1e-3  # the adapters changed the model (100x the tolerance)

    # SIGKILL after step 1's checkpoint, then --resume auto: the unbroken run's figures exactly (dropout on: the
    # RNG comes back too); a checkpoint holds the adapters and their optimizer state, not the frozen base
    dropout = ["--lora-dropout", "0.1", "--save-every", "1"]
    unbroken = lora_run(tmp_path, "unbroken", 0, *dropout[:2])
    killed = lora_run(tmp_path, "resumed", 0, *dropout, wait=False)
    step1 = tmp_path / "resumed" / "checkpoints" / "step_000001"
    deadline = time.time() + HANG_GUARD
    while not step1.is_dir() and time.time() < deadline:
        time.sleep(0.05)
    killed.kill()
    killed.wait()
    assert step1.is_dir() and not (tmp_path / "resumed" / "checkpoints" / "step_000003").exists()
    import torch.distributed.checkpoint as dcp
    saved = dcp.FileSystemReader(step1).read_metadata().state_dict_metadata
    assert any(".lora_A." in k for k in saved) and not any(k.endswith("q_proj.weight") for k in saved), list(saved)
    resumed = lora_run(tmp_path, "resumed", 0, *dropout, "--resume", "auto")
    assert unbroken == resumed and unbroken != one


def test_tba_with_lora_sends_adapters_only_and_searcher_ranks_match_virtual_ones(tmp_path, smollm2):
    """TBA under LoRA: each sync broadcasts the adapters alone (bf16 bytes), searcher ranks merge them into their
    own base and sample what the one-process run's virtual searchers sample: the same rows, exactly; so does one
    process under torchrun, whose virtual searchers merge into a base sharded by FSDP2."""
    save_tiny_model(tmp_path / "model", "qwen2", smollm2[1], seed=0)
    rows = {}
    for name, procs in (("one", 0), ("three", 3), ("torchrun", 1)):
        run = tba_run(tmp_path, name, procs, "--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2")
        assert run.returncode == 0, run.stderr[-3000:]
        rows[name] = [{k: v for k, v in r.items() if k not in TIMING} for r in step_rows(tmp_path / name)]
    lm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    lora.add_adapters(lm, dataclasses.replace(CFG, lora_alpha=8.0))
    adapter_bytes = 2 * sum(lm.state_dict()[n].numel() for n in lora.adapter_names(lm))
    assert all(r["broadcast_bytes"] == adapter_bytes for r in rows["one"]) and rows["one"][-1]["grad_norm"] > 0
    assert rows["one"] == rows["three"] == rows["torchrun"] and len(rows["one"]) == 4
