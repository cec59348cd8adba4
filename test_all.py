"""fanout's test suite: CPU only, `./run.sh test` (pytest test_all.py). It runs every test file's tests, and the
checks of the house itself: imports only run downward, every file and function is read whole, the line budget."""

import json
import subprocess
import sys

from kernels.test_kernels import *  # noqa: F401,F403 (the kernel tests run here too, in the interpreter)
from test_config import *  # noqa: F401,F403 (config.py's rules, cluster.py's set-up)
from test_explore import *  # noqa: F401,F403 (explore.py's functions against ALGORITHMS.md 0, 3)
from test_loss import *  # noqa: F401,F403 (loss.py's functions against ALGORITHMS.md 0, 2, 4)
from test_reward import *  # noqa: F401,F403 (tasks, answers, code tasks)
from test_sandbox import *  # noqa: F401,F403 (the sandbox: honest and hostile programs)
from test_run import *  # noqa: F401,F403 (whole runs: the loop, ranks, resume, export, TBA)
from test_sampler import *  # noqa: F401,F403 (the sampler against HF transformers)
from test_simulate import *  # noqa: F401,F403 (simulate.py and the mass-balance check)
from test_trainer import *  # noqa: F401,F403 (trainer.py's micro-batches, passes, logprobs and checkpoints)
from test_sampler import HANG_GUARD, ROOT


def test_bench_trainer_runs_a_training_step(tmp_path):
    """bench.py trainer drives trainer.train_on_batch; a tiny case keeps the two in step."""
    out = tmp_path / "trainer.json"
    run = subprocess.run([sys.executable, "bench.py", "trainer", "--prompts", "2", "--group-size", "4", "--prompt-len",
                          "8", "--response-len", "8", "--response-max", "32", "--repeats", "1", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    for r in (result["packed"], result["padded"]):  # no CPU peak: no MFU
        assert r["tokens_per_s"] > 0 and r["tflops_per_s"] > 0 and r["mfu"] is None
    assert result["packed"]["model_tokens"] < result["padded"]["model_tokens"] and result["speedup"] > 0


# ---- the house: imports, sizes, the line budget ----


def test_line_budget():
    code = [f for f in ROOT.rglob("*.py") if not f.name.startswith("test_")
            and not any(part.startswith(".") or part == "runs" for part in f.relative_to(ROOT).parts)]
    lines = sum(len(f.read_text().splitlines()) for f in code)
    assert 0 < lines <= 5000, f"{lines} lines of non-test code; the budget is 5,000"
