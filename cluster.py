"""fanout's processes: torchrun set-up, a CPU's compute dtype and threads, collectives, FSDP2 sharding, TBA's roles
and weight broadcast. The one place that knows torch.distributed; it moves tensors and modules, whoever's they are.
"""

import contextlib
import hashlib
import json
import math
import os
import platform
import time
import timeit
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from config import Config

LOAD = None  # cpu_times() when set_threads last ran (None: never): what happened since decides its threads


def setup_process():
    """(rank, world size, device); nccl on CUDA, gloo on CPU, when launched by torchrun."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    set_threads(follow_load=device.type == "cpu")
    if "RANK" in os.environ:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def set_threads(follow_load: bool = False) -> int:
    """torch's threads: OMP_NUM_THREADS, else this rank's share of the physical cores it may run on; with follow_load
    one fewer while another process holds a core (OpenMP's barriers wait for the thread that waits for it): since the
    last call the main thread waited for a CPU over a quarter of the time it ran, or it ran with one fewer and the
    CPUs were not idle half the time. Without Linux's /proc, all of them."""
    global LOAD
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    n = max(1, physical_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if follow_load and n > 1 and LOAD is None:  # nothing to go by yet: a moment of products on n threads
        torch.set_num_threads(n)
        LOAD = cpu_times()
        for a in [torch.randn(512, 512)] * 40:
            a @ a
    last, LOAD = LOAD, cpu_times()
    if follow_load and n > 1 and last and LOAD:
        ran, waited, idle, wall = (LOAD[k] - last[k] for k in ("ran", "waited", "idle", "at"))
        if waited > ran / 4 or (torch.get_num_threads() == n - 1 and idle < wall / 2):
            n -= 1
    torch.set_num_threads(n)
    return n


def cpu_times() -> dict:
    """Seconds the main thread (in every parallel op) has run and waited for a CPU, and this process's CPUs have
    stood idle, and when they were read: Linux's /proc, none elsewhere."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        ran, waited = (int(x) / 1e9 for x in Path("/proc/self/schedstat").read_text().split()[:2])
        cpus = {f"cpu{c}" for c in os.sched_getaffinity(0)}
        stat = [f for f in map(str.split, Path("/proc/stat").read_text().splitlines()) if f[0] in cpus]
        idle = sum(int(f[4]) + int(f[5]) for f in stat) / os.sysconf("SC_CLK_TCK")
        return {"ran": ran, "waited": waited, "idle": idle, "at": time.monotonic()}
    return {}


def physical_cores() -> int:
    """Cores (not hyper-threads) among the CPUs this process may run on (its affinity: taskset's, a container's)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            cores.add(cpu)
    return len(cores)


# ---- the compute dtype of a CPU ----

def pick_dtype(requested: str, device, hidden: int, intermediate: int, cache_dir: str) -> tuple[torch.dtype, str]:
    """The compute dtype and why. auto: bfloat16 on CUDA; on a CPU whichever of bfloat16 and float32 ran the
    model's own MLP product faster, probed once per CPU, torch build and shape and cached, so a resumed run
    computes alike. Without bf16 units (AVX-512 BF16, AMX) a bf16 product falls back to a slow generic kernel."""
    if requested != "auto":
        return getattr(torch, requested), f"--dtype {requested}"
    if device.type == "cuda":
        return torch.bfloat16, "auto: bfloat16 on CUDA"
    key = f"{cpu_identity()} | torch {torch.__version__} | {hidden}x{intermediate} | {torch.get_num_threads()} threads"
    cache = Path(cache_dir).expanduser() / "dtype_probe.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if key not in known:
        known[key] = probe_matmuls(hidden, intermediate)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(cache)  # atomic: ranks probing at once never leave half a file
    ms = known[key]
    name = "bfloat16" if ms["bfloat16"] < ms["float32"] else "float32"
    bf16 = f"over {ms['bfloat16']:.1f} ms (stopped there)" if ms["stopped"] else f"{ms['bfloat16']:.1f} ms"
    return getattr(torch, name), (f"auto: the model's MLP product, forward + backward, took {ms['float32']:.1f} ms in "
                                  f"float32 and {bf16} in bfloat16 on this CPU (probe cached in {cache})")


def cpu_identity() -> str:
    """The CPU's model, flags and the kernels torch and oneDNN may use: what decides a bf16 product's speed."""
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    field = lambda name: next((line.split(":", 1)[1].strip() for line in lines if line.startswith(name)), "")
    flags = hashlib.sha1(field("flags").encode()).hexdigest()[:12]
    return (f"{field('model name') or platform.processor()} | flags {flags} | "
            f"{torch.backends.cpu.get_cpu_capability()} | oneDNN ISA {os.environ.get('ONEDNN_MAX_CPU_ISA', 'max')}")


def probe_matmuls(hidden: int, intermediate: int, rows: int = 64, repeats: int = 3) -> dict:
    """Milliseconds of the MLP's forward and backward products, best of `repeats`, per dtype; bfloat16 stops
    (stopped=True) once slower than float32's three together: without bf16 units, in its first product."""
    gen = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(shape, generator=gen) for shape in ((rows, hidden), (intermediate, hidden),
                                                                (rows, intermediate)))
    result = {"stopped": False}
    for dtype in (torch.float32, torch.bfloat16):
        a, b, c = (t.to(dtype) for t in (x, w, dy))
        total = 0.0
        for product in (lambda: a @ b.T, lambda: c @ b, lambda: c.T @ a):
            best = math.inf
            for i in range(repeats):
                best = min(best, timeit.timeit(product, number=1))
                if dtype == torch.bfloat16 and i > 0 and (total + best) * 1e3 > result["float32"]:
                    return {**result, "stopped": True, "bfloat16": (total + best) * 1e3}
            total += best
        result[str(dtype).removeprefix("torch.")] = total * 1e3
    return result


def compute_dtype(cfg: Config, lm, device, rank: int = 0) -> tuple[torch.dtype, dict]:
    """Rank 0's choice of the compute dtype, for every rank (all must compute alike), and the facts to log."""
    dtype, why = all_gather(pick_dtype(cfg.dtype, device, lm.config.hidden_size, lm.config.intermediate_size,
                                       cfg.cache_dir) if rank == 0 else None)[0]
    setup = {"dtype": str(dtype).removeprefix("torch."), "dtype_why": why, "threads": torch.get_num_threads()}
    if rank == 0:
        print(f"compute dtype {setup['dtype']} ({why}); {setup['threads']} intra-op threads per rank (one fewer in a "
              "CPU step that finds another process on a core, unless OMP_NUM_THREADS fixes them)")
    return dtype, setup


# ---- collectives: each is the value itself on one process; `group` None = every rank ----

def all_sum(*values: float, group=None) -> list[float]:
    """Element-wise sums over ranks (the values themselves on one process); nccl needs them on the GPU."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        t = t.cuda() if dist.get_backend() == "nccl" else t
        dist.all_reduce(t, group=group)
    return t.tolist()


def all_gather(obj, group=None) -> list:
    """Every rank's obj, in rank order (just [obj] on one process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def group_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def my_share(n: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous share [start, stop) of n items."""
    return n * rank // world, n * (rank + 1) // world


def split_by_budget(budgets: list[int], world: int) -> list[list[int]]:
    """Prompt positions per rank, balanced by rollouts (largest first, to the least loaded), groups whole."""
    shares, load = [[] for _ in range(world)], [0] * world
    for i in sorted(range(len(budgets)), key=lambda i: -budgets[i]):
        r = min(range(world), key=lambda r: (load[r], len(shares[r]), r))
        shares[r].append(i)
        load[r] += budgets[i]
    return [sorted(share) for share in shares]


def shard(model: torch.nn.Module, layers, device, dtype, group=None) -> None:
    """FSDP2 over `group` (None: all ranks): each layer, then the root; bf16 parameters on GPU, float32 on CPU."""
    mp = MixedPrecisionPolicy(**(dict(param_dtype=dtype, reduce_dtype=torch.float32) if device.type == "cuda" else {}))
    mesh = DeviceMesh.from_group(group, device.type) if group is not None else None
    for module in (*layers, model):
        fully_shard(module, mesh=mesh, mp_policy=mp)


# ---- TBA: roles and the weight broadcast (DESIGN.md async mode) ----

@dataclass
class Roles:
    """Who does what in a TBA run (ranks [0, n_trainers) train); weights and rounds travel over gloo."""
    searching: bool  # this rank is a searcher
    n_trainers: int
    trainers: object = None  # the trainer ranks' process group (None: one process)
    handoff: object = None   # trainer rank 0 and the searcher ranks, over gloo: weights out, rounds in
    rank: int = 0            # this rank among the trainers, or among the searchers
    trainers_gloo: object = None  # the trainer ranks over gloo: a round's tensors from trainer rank 0 to all


def make_roles(cfg: Config, rank: int, world: int) -> Roles:
    """The trainer and searcher ranks (cfg.searchers a count), checked against the world size; the same groups on
    every rank, in the same order (torch.distributed requires it); synchronous or one process: every rank trains."""
    n_trainers = world - cfg.searchers if cfg.searchers and world > 1 else world
    if n_trainers < 1:
        raise SystemExit(f"--searchers {cfg.searchers} leaves no trainer among {world} processes; use at most "
                         f"{world - 1} or launch more")
    if cfg.prompts_per_step % n_trainers:
        raise SystemExit(f"--prompts-per-step {cfg.prompts_per_step} does not split over {n_trainers} trainer ranks; "
                         "use a multiple of their number")
    if n_trainers == world:
        return Roles(False, world, rank=rank)
    trainers, trainers_gloo = (dist.new_group(list(range(n_trainers)), backend=b) for b in (None, "gloo"))
    handoff = dist.new_group([0, *range(n_trainers, world)], backend="gloo")
    searching = rank >= n_trainers
    return Roles(searching, n_trainers, trainers, handoff, rank - n_trainers if searching else rank, trainers_gloo)


BUCKET = 1 << 26  # bytes per broadcast: 64 MiB


def checksum(flat: torch.Tensor) -> int:
    """The sum of the weights' bf16 bit patterns (as int16): equal on both sides of an exact copy."""
    return int(flat.view(torch.int16).sum(dtype=torch.int64))


def broadcast_weights(flat: torch.Tensor, version: int, group) -> tuple[int, int]:
    """Rank 0's flat (bf16, as uint8: gloo has neither bf16 nor int16) and version to all; (version, checksum)."""
    sending = dist.get_rank() == 0
    header = torch.tensor([version, checksum(flat) if sending else 0], dtype=torch.int64)
    dist.broadcast(header, 0, group)
    for piece in flat.view(torch.uint8).split(BUCKET):
        dist.broadcast(piece, 0, group)
    version, sent = header.tolist()
    if not sending and checksum(flat) != sent:
        raise RuntimeError(f"weights version {version} arrived damaged: checksum {checksum(flat)} != {sent}")
    return version, sent


def load_flat(weights: dict, flat: torch.Tensor, names: list[str]) -> None:
    """Copy a packed flat of weights into `weights`' tensors (a sampler's), in place."""
    tensors = [weights[name] for name in names]
    with torch.no_grad():
        for w, piece in zip(tensors, flat.split([w.numel() for w in tensors])):
            w.copy_(piece.view(w.shape))
