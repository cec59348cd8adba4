"""Tests of simulate.py, BroRL's token-level simulator (ALGORITHMS.md 1). Fast: a few seconds on CPU."""

import math
import re

import pytest
import torch

from simulate import Config, centred_counts, check_mass_balance, simulate


def test_mass_balance_formula_matches_one_sgd_step():
    # with-replacement draws against the count-weighted form; distinct draws against ALGORITHMS.md's formula as written
    rows = check_mass_balance(Config(ns=(4, 64, 4096), check_lr=1.0, seed=1))
    assert [r["kind"] for r in rows] == ["counts", "distinct"] * 3
    for r in rows:
        assert r["measured"] != 0
        assert r["rel_err"] < 0.01, r
        assert r["predicted"] == pytest.approx(sum(r["terms"]))
    # the formula as written ignores how often a token was drawn: with many repeated draws it is off
    assert rows[4]["literal_rel_err"] > 0.1, rows[4]


def test_centred_counts_match_a_per_draw_reference():
    vocab, ns = 50, (3, 1000)
    p = torch.softmax(torch.randn(2, vocab, dtype=torch.float64), -1)
    reward = torch.where(torch.arange(vocab) < 10, 1.0, -1.0).double()
    c = centred_counts(p, ns, reward, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)  # the same draws, replayed one by one
    for k, n in enumerate(ns):
        draws = torch.multinomial(p[k], n, replacement=True, generator=gen).tolist()
        mean = sum(reward[t].item() for t in draws) / n
        expected = [0.0] * vocab
        for t in draws:
            expected[t] += reward[t].item() - mean
        assert c[k].tolist() == pytest.approx(expected, abs=1e-12)
        assert c[k].sum().item() == pytest.approx(0, abs=1e-9)  # centred: the batch's advantages sum to zero


def test_mass_balance_check_fails_when_the_step_is_not_small():
    rows = check_mass_balance(Config(ns=(16, 51200), check_lr=1e4, seed=0))
    assert max(r["rel_err"] for r in rows) > 0.01


def test_seeded_start_and_curve_consistency():
    correct, anchor, rest = 10_000 * math.exp(3), math.exp(5), 128_000 - 10_000 - 1
    q_pos0 = correct / (correct + anchor + rest)
    assert round(q_pos0, 4) == 0.6296
    assert simulate(Config(ns=(4,), steps=0))["4"]["q_pos"] == [pytest.approx(q_pos0, rel=1e-12)]

    steps = 50
    results = simulate(Config(ns=(4, 512), steps=steps, vocab=2000, n_correct=200))
    for curves in results.values():
        assert all(len(c) == steps + 1 for c in curves.values())
        assert curves["pct_improved"][0] == 0 and curves["worst_change"][0] == 0
        for pct, worst in zip(curves["pct_improved"][1:], curves["worst_change"][1:]):
            assert 0 <= pct <= 100
            assert (pct == 100) == (worst > 0)  # every correct token up exactly when the worst one is up
        assert all(0 < q < 1 for q in curves["q_pos"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_large_n_beats_small_n(seed: int):
    results = simulate(Config(ns=(4, 2000), steps=300, vocab=2000, n_correct=200, seed=seed))
    small, large = results["4"], results["2000"]
    assert large["q_pos"][-1] > small["q_pos"][-1] + 0.03
    assert large["pct_improved"][-1] == 100 and large["worst_change"][-1] > 0
    assert small["pct_improved"][-1] < 100 and small["worst_change"][-1] < 0


@pytest.mark.parametrize("fields, message", [
    (dict(init="random"), "--init random is unknown"), (dict(ns=(4, 0)), "--ns (4, 0): each N draws at least 1"),
    (dict(n_correct=0), "--n-correct 0: use 1 .. --vocab - 1"), (dict(vocab=100), "--n-correct 10000: use 1 .."),
    (dict(lr=-1.0), "--lr and --steps must be at least 0")])
def test_bad_simulate_flags_are_one_sentence(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Config(**fields)
