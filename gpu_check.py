"""./run.sh gpu-check: every GPU path in one short call, each stage in its own process under a time cap (the
Triton kernels compiled, the GPU paths no CPU test reaches, two short runs under torchrun, bench.py's GPU cases).

    python gpu_check.py [--dir runs/gpu-check] [--dry-run]
"""

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import config
import trainer
from bench import qwen25_15b_config, random_weights


def random_model(folder: Path, device=None, hf_config=None) -> Path:
    """A model folder of Qwen2.5-1.5B's shape (or hf_config's) with SmolLM2's tokenizer (its 49k ids in the model's
    vocabulary); with `device`, random bf16 weights made there (3 GB for 1.5B parameters: never carried)."""
    hf_config = hf_config or qwen25_15b_config()
    hf_config.save_pretrained(folder)  # makes the folder and its parents
    if not (folder / "tokenizer.json").is_file():
        source = trainer.resolve_model(config.EMBEDDED_MODEL, "~/.cache/fanout")
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(source / name, folder)
    if device is not None:
        save_file(random_weights(hf_config, device), folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def run_stage(command: list[str], env: dict, seconds: float, log: Path) -> int | None:
    """The command's exit status, None past `seconds` (its whole process group killed: torchrun's workers too)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                start_new_session=True)
        try:
            return proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def gpu_stages(here: Path, model: Path) -> list[tuple]:
    """(name, seconds at most, command, environment, figure: its log -> a line, raising if the stage missed a part),
    about 8 minutes in all: the tests compiled on the GPU, and runs of the paths no CPU test reaches (FSDP2 on nccl,
    CUDA-graph decoding across steps, the fused log-prob, TIS, LoRA, one TBA step whose pi_old is the sampler's)."""
    py, load = sys.executable, lambda what: json.loads((here / f"bench_{what}.json").read_text())
    tests = dict(TRITON_INTERPRET="0", FANOUT_TEST_DEVICE="cuda", CUBLAS_WORKSPACE_CONFIG=":4096:8")  # poisoned
    site = {"PYTHONPATH": str(here / "site")}  # the packages --prepare packed: reward.py's, tyro
    bench = lambda what, *more: [py, "bench.py", what, "--device", "cuda", *more, "--out",
                                 str(here / f"bench_{what}.json")]
    run = lambda out, *flags: [py, "-m", "torch.distributed.run", "--nproc_per_node", "1", "train.py", *flags,
                               "--model", str(model), "--prompts-per-step", "4", "--rollouts-per-prompt", "8",
                               "--max-new-tokens", "128", "--task-size", "100", "--eval-prompts", "8",
                               "--eval-samples", "1", "--entropy-coef", "1e-3",  # every token runs
                               "--out-dir", str(here / out)]

    def trained(out: str, steps: int, log: str) -> str:
        rows = [r for r in map(json.loads, (here / out / "metrics.jsonl").read_text().splitlines()) if "step" in r]
        saved, graphs = sorted((here / out / "checkpoints").glob("step_*")), "CUDA graph capture failed" not in log
        figure = "; ".join([f"step {r['step']}: {r['t_step']:.1f} s, loss {r['loss']:.4f}, TIS weight "
                            f"{r.get('tis_weight', 1.0):.3f}" for r in rows] +
                           [f"checkpoint {saved[-1].name if saved else 'missing'}",
                            f"CUDA graphs {'replayed' if graphs else 'fell back'}"])
        if len(rows) != steps or not saved or not graphs:
            raise RuntimeError(figure)
        return figure

    def sampler_figure(_) -> str:
        r = load("sampler")
        return "; ".join([f"P={x['prompt_len']} N={x['n']}: {x['tokens_per_s']:.0f} tokens/s, roofline "
                          f"{x['roofline']:.0%}" for x in r["runs"]] +
                         [f"shared prefix {r['prefix_attention']['speedup']:.1f}x unshared"] +
                         [f"N={n}: compiled {x['compiled'] / x['eager']:.2f}x eager"
                          for n, x in r["compiled_decode"].items()])

    mfu = lambda r: f"{r['tokens_per_s']:.0f} tokens/s" + (f", MFU {r['mfu']:.1%}" if r["mfu"] else "")
    return [
        ("kernels", 80, [py, "-m", "pytest", "-q", "kernels/test_kernels.py", "kernels/test_logprob.py"], tests,
         lambda log: log.strip().splitlines()[-1]),
        ("gpu paths", 50, [py, "-m", "pytest", "-q", "test_sampler.py", "test_trainer.py", "-k",
                           "graph or tied or hand_off or device or (compiled and llama)"], {**tests, **site},
         lambda log: log.strip().splitlines()[-1]),
        ("model", 15, [py, "-c", f'import gpu_check, pathlib; gpu_check.random_model(pathlib.Path("{model}"), "cuda")'],
         {}, lambda _: f"{(model / 'model.safetensors').stat().st_size / 1e9:.2f} GB of bf16 weights"),
        ("train", 90, run("grpo", "grpo", "--steps", "2", "--save-every", "2", "--tis-cap", "2"), site,
         lambda log: trained("grpo", 2, log)),
        ("train lora", 45, run("lora", "grpo", "--steps", "2", "--save-every", "2", "--lora-rank", "16", "--kl-coef",
                               "1e-3", "--tis-cap", "2"), site, lambda log: trained("lora", 2, log)),
        ("train async", 55, run("tba", "tba", "--loss", "ppo", "--searchers", "1", "--sync-every", "1", "--steps", "1",
                                "--save-every", "1"), site, lambda log: trained("tba", 1, log)),
        ("bench trainer", 45, bench("trainer", "--repeats", "1"), {}, lambda _: "packed {}, padded {}: {:.2f}x".format(
            mfu(load("trainer")["packed"]), mfu(load("trainer")["padded"]), load("trainer")["speedup"])),
        ("bench sampler", 100, bench("sampler", "--prompt-lens", "1024", "--rollouts", "16", "512", "--total", "512",
                                    "--new-tokens", "128", "--kv-budget-tokens", "262144"), {}, sampler_figure)]


def gpu_check(args) -> None:
    """Each stage in its own process under a time cap, PASS or FAIL and its figure printed, a failure never stopping
    the next; one JSON summary. --dry-run prints each stage's command and builds the model folder, weights aside."""
    here = Path(args.dir)
    for out in ("grpo", "lora", "tba"):  # a rerun's training runs replace the last ones (checkpoints of ~18 GB each)
        shutil.rmtree(here / out, ignore_errors=True)
    stages = gpu_stages(here, random_model(here / "model"))
    summary = {"date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": args.dry_run, "stages": []}
    for name, seconds, command, env, figure in stages:
        if args.dry_run:
            print(f"[dry-run] {name} (at most {seconds} s):",
                  shlex.join([f"{k}={v}" for k, v in env.items()] + command))
            summary["stages"].append({"stage": name, "command": command, "env": env, "seconds_cap": seconds})
            continue
        start, log_file = time.time(), here / f"{name.replace(' ', '_')}.log"
        rc = run_stage(command, env, seconds, log_file)
        log = log_file.read_text()
        try:
            if rc != 0:
                raise RuntimeError(f"timed out after {seconds} s" if rc is None else f"exit {rc}")
            passed, result = True, figure(log)
        except Exception as e:  # any failure, or a figure the stage did not leave, fails the stage, not the check
            lines = [line for line in log.splitlines() if line.strip()] or ["no output"]
            errors = [line for line in lines if "Error: " in line or "Exception: " in line]  # a worker's error
            passed, result = False, " | ".join(dict.fromkeys([str(e)] + errors[:1] + lines[-1:]))
        summary["stages"].append({"stage": name, "passed": passed, "seconds": round(time.time() - start, 1),
                                  "figure": result})
        print(f"{'PASS' if passed else 'FAIL'} {name} ({summary['stages'][-1]['seconds']} s): {result}", flush=True)
    if not args.dry_run:
        summary.update(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
                       passed=sum(s["passed"] for s in summary["stages"]), of=len(stages))
    (here / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"summary: {here / 'summary.json'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="runs/gpu-check", help="the model folder, logs and summary.json")
    parser.add_argument("--dry-run", action="store_true", help="print each stage's command, build the model "
                        "folder's config and tokenizer, run nothing")
    gpu_check(parser.parse_args())
