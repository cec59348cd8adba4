import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in interpreter mode on CPU

import pytest
import torch

from kernels.sampling import hash32, reference_sample, sample
from rollout import sample_tokens


@pytest.fixture
def poisoned_empty():
    """torch.empty returns NaN (floats) and the int64 max (ints), so any output a kernel skips shows."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.empty(4).isnan().all() and (torch.empty(4, dtype=torch.long) == torch.iinfo(torch.long).max).all()
    yield
    torch.use_deterministic_algorithms(was)


def random_logits(B: int, V: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    logits = torch.randn(B, V, generator=gen) * 3
    logits[0, :V - 100] = -float("inf")  # whole tiles masked, as top-p or a vocab mask leaves them
    logits[1, torch.randint(0, V, (V // 4,), generator=gen)] = -float("inf")
    return logits.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1000, 3000, 5000])
def test_triton_sample_matches_reference(poisoned_empty, dtype, V):
    gen = torch.Generator().manual_seed(V)
    for temperature in (0.0, 0.7, 1.0):
        logits = random_logits(6, V, dtype, gen)
        keys = torch.randint(0, 2 ** 32, (6,), generator=gen)
        tokens, logprob, entropy = sample(logits, keys, temperature)
        ref_tokens, ref_logprob, ref_entropy = reference_sample(logits, keys, temperature)
        assert torch.equal(tokens, ref_tokens), (temperature, tokens, ref_tokens)
        torch.testing.assert_close(logprob, ref_logprob, atol=1e-4, rtol=0)
        torch.testing.assert_close(entropy, ref_entropy, atol=1e-4, rtol=0)


def test_reference_matches_rollout_sampler():
    gen = torch.Generator().manual_seed(0)
    V = 5000
    logits = torch.randn(64, V, generator=gen) * 3
    keys = torch.randint(0, 2 ** 32, (64,), generator=gen)
    # rollout.py lets a uniform round up to 1 (see the next test): rows where that happens may differ
    raw = hash32(hash32(torch.arange(V))[None] ^ keys[:, None]) >> 8
    fine = (raw != 2 ** 24 - 1).all(-1)
    for temperature in (0.0, 0.7, 1.0):
        ours, theirs = reference_sample(logits, keys, temperature), sample_tokens(logits, keys, temperature, 1.0)
        assert torch.equal(ours[0][fine], theirs[0][fine])
        torch.testing.assert_close(ours[1][fine], theirs[1][fine])
        torch.testing.assert_close(ours[2], theirs[2])


def test_largest_hash_gives_no_infinite_noise():
    key, token = 1743, 276  # hash32(hash32(276) ^ 1743) >> 8 is 2^24 - 1, the largest value
    raw = hash32(hash32(torch.tensor([token])) ^ key) >> 8
    assert raw.item() == 2 ** 24 - 1 and (raw.float() + 0.5).item() * 2 ** -24 == 1.0  # float32 rounds up to 1
    logits = torch.zeros(1, 1000)
    logits[0, token] = -30.0  # softmax gives it ~1e-16: it must not be drawn
    keys = torch.tensor([key])
    assert reference_sample(logits, keys, 1.0)[0].item() != token
    assert sample(logits, keys, 1.0)[0].item() != token


def test_reference_follows_tempered_softmax():
    N, V, temperature = 20000, 50, 0.7
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(V, generator=gen) * 1.5).expand(N, V)
    keys = torch.randint(0, 2 ** 32, (N,), generator=gen)
    tokens, logprob, entropy = reference_sample(logits, keys, temperature)
    p = (logits[0] / temperature).softmax(-1)
    counts = torch.bincount(tokens, minlength=V).float()
    assert ((counts - N * p).abs() <= 4 * (N * p * (1 - p)).sqrt() + 1).all()
    torch.testing.assert_close(logprob, p.log()[tokens])
    torch.testing.assert_close(entropy, torch.full((N,), -(p * p.log()).sum().item()))


def test_greedy_picks_first_argmax():
    logits = torch.randn(3, 3000)
    logits[0, [5, 7]] = 10.0        # a tie inside one tile
    logits[1, [100, 2500]] = 10.0   # a tie across tiles (2048 wide)
    logits[2, 2999] = 10.0          # the maximum in the masked tail tile
    keys = torch.zeros(3, dtype=torch.long)
    expected = torch.tensor([5, 100, 2999])
    for tokens, logprob, _ in (reference_sample(logits, keys, 0.0), sample(logits, keys, 0.0)):
        assert torch.equal(tokens, expected)
        torch.testing.assert_close(logprob, logits.log_softmax(-1)[torch.arange(3), expected])
