"""BroRL's token-level simulator (ALGORITHMS.md 1): why more rollouts N per prompt make progress monotone.

    python simulate.py                               # N in {4, 8, 16, 512, 51200}, 1000 AdamW steps, ~20 s on CPU
    python simulate.py --figure docs/simulate.png    # the same, and the figure also goes to the README's docs/
    python simulate.py --init zero --device cuda     # all logits start at 0
    python simulate.py --check                       # the mass-balance formula against one measured SGD step

One token position with a 128k vocabulary, 10k correct tokens (reward +1), the rest -1. Each step draws N tokens
from p = softmax(z), centres the rewards by their batch mean and minimises the linear surrogate
-(1/N) sum_j r~_j p_{tok_j}. Only counts matter: sum_j r~_j p_{tok_j} = sum_i c_i p_i, c_i the summed centred
rewards of the draws of token i, so a step costs O(V) whatever N is. All N run as rows of one [len(ns), V]
parameter: AdamW is element-wise, so the rows are independent runs.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro


@dataclass
class Config:
    ns: tuple[int, ...] = (4, 8, 16, 512, 51200)  # rollouts per step, one independent run each
    steps: int = 1000                  # AdamW steps
    lr: float = 1e-3                   # AdamW learning rate
    weight_decay: float = 0.01         # AdamW weight decay
    vocab: int = 128_000               # vocabulary size
    n_correct: int = 10_000            # correct tokens: ids 0..n_correct-1; id n_correct is the seeded anchor
    init: str = "seeded"               # seeded (correct logits 3, one incorrect anchor at 5, rest 0) | zero
    seed: int = 0                      # seeds the draws (and the --check logits)
    device: str = "cpu"                # cpu | cuda
    out: str = "runs/simulate/simulate.json"  # curves; the figure goes next to it as .png
    figure: str = ""                   # also save the figure here (e.g. docs/simulate.png)
    check: bool = False                # instead: check the mass-balance formula on one SGD step per N
    check_lr: float = 1.0              # SGD rate of --check; first order needs lr * max|grad z| << 1

    def __post_init__(self):
        for ok, message in [(self.init in ("seeded", "zero"), f"--init {self.init} is unknown; use seeded or zero"),
                            (min(self.ns, default=0) >= 1, f"--ns {self.ns}: each N draws at least 1 rollout a step"),
                            (0 < self.n_correct < self.vocab, f"--n-correct {self.n_correct}: use 1 .. --vocab - 1"),
                            (self.lr >= 0 and self.steps >= 0, "--lr and --steps must be at least 0"),
                            (self.device == "cpu" or torch.cuda.is_available(), "--device cuda: no GPU; use cpu")]:
            if not ok:
                raise ValueError(message)


def centred_counts(p: torch.Tensor, ns: tuple[int, ...], reward: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Row k: c_i = sum over the ns[k] draws of token i (from p[k], with replacement) of (reward_i - batch mean)."""
    draws = [torch.multinomial(row, n, replacement=True, generator=gen) for row, n in zip(p, ns)]
    counts = torch.stack([d.bincount(minlength=p.shape[-1]) for d in draws])
    mean_reward = torch.stack([reward[d].mean() for d in draws])
    return counts * (reward - mean_reward[:, None])


def surrogate(p: torch.Tensor, c: torch.Tensor, ns: tuple[int, ...]) -> torch.Tensor:
    """-(1/N) sum_j r~_j p_{tok_j} = -(1/N) sum_i c_i p_i per row, summed over rows (independent runs just add)."""
    return -((c * p).sum(-1) / c.new_tensor(ns)).sum()


def simulate(cfg: Config) -> dict:
    """Per N, the curves (steps 0..cfg.steps) of Q_pos, % of correct tokens up since step 0, worst correct change."""
    gen = torch.Generator(cfg.device).manual_seed(cfg.seed)
    reward = torch.full((cfg.vocab,), -1.0, dtype=torch.float64, device=cfg.device)
    reward[:cfg.n_correct] = 1.0
    z = torch.zeros(len(cfg.ns), cfg.vocab, dtype=torch.float64, device=cfg.device)
    if cfg.init == "seeded":
        z[:, :cfg.n_correct], z[:, cfg.n_correct] = 3.0, 5.0
    p0 = torch.softmax(z, -1)[:, :cfg.n_correct]
    opt = torch.optim.AdamW([z.requires_grad_()], lr=cfg.lr, weight_decay=cfg.weight_decay)
    curves = []
    for step in range(cfg.steps + 1):  # measure the current z, then take a step (not after the last measurement)
        p = torch.softmax(z, -1)
        p_correct = p.detach()[:, :cfg.n_correct]
        delta = p_correct - p0
        curves.append(torch.stack([p_correct.sum(-1), 100 * (delta > 0).double().mean(-1), delta.min(-1).values]))
        if step == cfg.steps:
            break
        c = centred_counts(p.detach(), cfg.ns, reward, gen)
        opt.zero_grad()
        surrogate(p, c, cfg.ns).backward()
        opt.step()
    q_pos, improved, worst = torch.stack(curves, -1).cpu().tolist()  # each [len(ns)][steps + 1]
    return {str(n): {"q_pos": q_pos[k], "pct_improved": improved[k], "worst_change": worst[k]}
            for k, n in enumerate(cfg.ns)}


# ---- the mass-balance check (ALGORITHMS.md 1; the derivation: docs/brorl.md) ----
# To first order, one SGD step on L = -(1/N) sum_i c_i p_i moves Q_pos by (eta/N) [Q_neg sum_A p_k^2 (c_k - S)
# + Q_pos sum_B p_k^2 (S - c_k) + S (Q_pos U_neg2 - Q_neg U_pos2)], S = sum_i c_i p_i, for any coefficients c.
# --check tests that on draws with replacement ("counts", c_k = n_k r~_k), and ALGORITHMS.md's formula, the case
# c = R_c on A and R_w on B, on N distinct draws ("distinct", centred rewards R_c = 1 - mean r, R_w = -1 - mean r).

def mass_balance_terms(p, correct, c, sampled) -> list[float]:
    """The three terms of (N/eta) dQ_pos for per-token coefficients c (the general form above)."""
    q_pos = p[correct].sum()
    q_neg, s = 1 - q_pos, (c * p).sum()
    a, b, u = sampled & correct, sampled & ~correct, ~sampled
    return [(q_neg * (p**2 * (c - s))[a].sum()).item(), (q_pos * (p**2 * (s - c))[b].sum()).item(),
            (s * (q_pos * (p[u & ~correct]**2).sum() - q_neg * (p[u & correct]**2).sum())).item()]


def check_mass_balance(cfg: Config) -> list[dict]:
    """Per N and draw kind: predicted vs measured dQ_pos of one SGD step (rate cfg.check_lr) from random logits."""
    gen = torch.Generator(cfg.device).manual_seed(cfg.seed)
    rows = []
    for n in cfg.ns:
        for kind in ("counts", "distinct"):
            correct = torch.zeros(cfg.vocab, dtype=torch.bool, device=cfg.device)
            correct[torch.randperm(cfg.vocab, generator=gen, device=cfg.device)[:cfg.n_correct]] = True
            reward = correct.double() * 2 - 1
            # random logits, correct ones lifted by 2.5 so that Q_pos ~ 1/2 and small batches mix both rewards
            z = 2 * torch.randn(cfg.vocab, dtype=torch.float64, device=cfg.device, generator=gen) + 2.5 * correct
            p = torch.softmax(z, -1)
            mean_r = 1.0
            while abs(mean_r) == 1:  # an all-equal batch centres to c = 0: nothing to check, draw again
                draws = torch.multinomial(p, n, replacement=kind == "counts", generator=gen)
                counts = torch.bincount(draws, minlength=cfg.vocab)
                mean_r = (counts * reward).sum().item() / n
            c, sampled = counts * (reward - mean_r), counts > 0
            # the measured step uses autograd, not the derivation
            step = cfg.check_lr * torch.func.grad(lambda zg: surrogate(torch.softmax(zg, -1), c, (n,)))(z)
            measured = (torch.softmax(z - step, -1)[correct].sum() - p[correct].sum()).item()
            terms = mass_balance_terms(p, correct, c, sampled)  # on distinct draws, c is the literal formula's
            predicted = cfg.check_lr / n * sum(terms)
            # the literal formula (R_c, R_w once per sampled token) ignores multiplicity: shown, not required to agree
            literal = mass_balance_terms(p, correct, (reward - mean_r) * sampled, sampled)
            literal_err = abs(cfg.check_lr / n * sum(literal) - measured) / abs(measured)
            rows.append({"n": n, "kind": kind, "terms": [cfg.check_lr / n * t for t in terms], "predicted": predicted,
                         "measured": measured, "rel_err": abs(predicted - measured) / abs(measured),
                         "literal_rel_err": literal_err, "max_dz": step.abs().max().item()})
    return rows


def plot(results: dict, paths: list[Path]):
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # not pyplot: no GUI backend to avoid, no global figure left open
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    panels = {"q_pos": "Q_pos (correct probability mass)", "pct_improved": "% of correct tokens above their start",
              "worst_change": "worst change of a correct token's probability"}
    for ax, (key, title) in zip(axes, panels.items()):
        for k, (n, curves) in enumerate(results.items()):
            color = colormaps["viridis"](k / max(1, len(results) - 1))  # ns are about log-spaced: one colour step each
            ax.plot(curves[key], color=color, lw=1, label=f"N = {int(n):,}")
        ax.set(title=title, xlabel="step")
    axes[2].axhline(0, color="grey", lw=0.5)
    axes[2].set_yscale("symlog", linthresh=1e-7)  # negative drops of small N span decades; big N stays just above 0
    axes[0].legend()
    fig.tight_layout()
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)


def main(cfg: Config):
    if cfg.check:
        rows = check_mass_balance(cfg)
        print(f"one SGD step, lr {cfg.check_lr:g}, logits 2*randn (+2.5 if correct) over {cfg.vocab:,} tokens")
        print(f"{'N':>6} {'draws':>8} {'term A':>10} {'term B':>10} {'unsampled':>10} {'predicted':>10} "
              f"{'measured':>10} {'rel err':>8} {'literal':>8} {'max|dz|':>8}")
        for r in rows:
            print(f"{r['n']:>6} {r['kind']:>8} " + " ".join(f"{t:10.3e}" for t in r["terms"])
                  + f" {r['predicted']:10.3e} {r['measured']:10.3e} {r['rel_err']:8.1e} {r['literal_rel_err']:8.1e}"
                  f" {r['max_dz']:8.1e}")
        worst = max(r["rel_err"] for r in rows)
        print(f"worst relative error {worst:.1e} ({'within' if worst < 0.01 else 'OUTSIDE'} 1%)")
        raise SystemExit(0 if worst < 0.01 else 1)
    if cfg.device == "cpu":  # ops over 128k floats are too small to gain from intra-op threads; on a busy
        torch.set_num_threads(1)  # machine their synchronisation made a run 2-4x slower (measured)
    results = simulate(cfg)
    print(f"{'N':>6} {'step':>5} {'Q_pos':>8} {'% up':>7} {'worst change':>13}")
    for n, curves in results.items():
        for step in (1, 250, 500, 1000):
            if step <= cfg.steps:
                print(f"{n:>6} {step:>5} {curves['q_pos'][step]:8.4f} {curves['pct_improved'][step]:7.2f} "
                      f"{curves['worst_change'][step]:13.2e}")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(cfg), "results": results}))
    plot(results, [out.with_suffix(".png")] + ([Path(cfg.figure)] if cfg.figure else []))
    print(f"initial Q_pos {results[str(cfg.ns[0])]['q_pos'][0]:.4f}; curves in {out}, figure {out.with_suffix('.png')}")


if __name__ == "__main__":
    main(tyro.cli(Config))  # tyro reports a bad flag (Config's ValueError too) in one box, no traceback
