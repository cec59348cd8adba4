"""The fused log-prob head (kernels/logprob.py): the chunked torch reference against full logits, the Triton
kernel against the reference, gradients included, on fresh random inputs, outputs poisoned first; and the
largest tensor either makes. Like test_kernels.py, run in the interpreter by test_all.py and compiled by
./run.sh gpu-check."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the interpreter on CPU

import contextlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from kernels.logprob import logprob, reference_logprob  # noqa: E402
from kernels.test_kernels import DEVICE  # noqa: E402


# ---- the log-prob head: chunked reference vs full logits, Triton vs reference ----

def random_inputs(N: int, D: int, V: int, dtype: torch.dtype, seed: int):
    """hidden, weight, targets with logits of std ~3, plus one row where the target dominates (logprob ~ 0)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * 3 / D ** 0.5
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[-1] = V - 1  # a target in the ragged last chunk
    hidden[0] = weight[targets[0]] * 10
    return (hidden.to(DEVICE, dtype).requires_grad_(), weight.to(DEVICE, dtype).requires_grad_(),
            targets.to(DEVICE))


def full_logits(hidden, weight, targets, temperature):
    """The plain computation over a whole [N, V] float32 tensor. The products are taken in float32, as
    kernels/logprob.py documents; (h @ W.T).float() on bf16 inputs would round the logits to bf16 first."""
    logp = torch.log_softmax((hidden.float() @ weight.float().T) / temperature, -1)
    return logp.gather(1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def loss_weights(N: int, seed: int):
    """Gradients for (logprob, entropy): both random, logprob alone (its .sum() hands back an expanded,
    stride-0 gradient, and entropy's arrives as zeros), entropy alone."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(N, generator=gen).to(DEVICE), torch.randn(N, generator=gen).to(DEVICE)
    return [(a, b), (1.0, None), (None, b)]


def gradients(outputs, weights, inputs):
    loss = sum((w * out).sum() for w, out in zip(weights, outputs) if w is not None)
    return torch.autograd.grad(loss, inputs, retain_graph=True)


def assert_same_gradients(out, expected, inputs, dtype, seed: int, poisoned: bool = False, **tolerance):
    """For each loss_weights case, out's gradients w.r.t. inputs equal expected's, in dtype. poisoned: out's
    backward runs with poisoned outputs (it is a Triton launcher's)."""
    for weights in loss_weights(len(out[0]), seed):
        with poisoned_outputs() if poisoned else contextlib.nullcontext():
            grads = gradients(out, weights, inputs)
        for got, want in zip(grads, gradients(expected, weights, inputs)):
            assert got.dtype == dtype
            torch.testing.assert_close(got, want, **tolerance)


@contextlib.contextmanager
def poisoned_outputs():
    """In deterministic mode torch.empty fills floats with NaN, so an output element a launcher allocates
    but its kernel never writes fails the comparison. Only around the Triton calls: on CUDA, cuBLAS (the
    reference's matmuls) refuses deterministic mode unless CUBLAS_WORKSPACE_CONFIG is set."""
    was_on = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.empty(3, device=DEVICE).isnan().all()
        yield
    finally:
        torch.use_deterministic_algorithms(was_on)


# ---- the chunked reference ----

@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [256, 97])  # 1000 = 3 x 256 + 232; 97 divides nothing
def test_reference_matches_full_logits(dtype, temperature, chunk_size):
    hidden, weight, targets = random_inputs(37, 64, 1000, dtype, seed=1)
    out = reference_logprob(hidden, weight, targets, temperature, chunk_size)
    expected = full_logits(hidden, weight, targets, temperature)
    assert out[0].dtype == out[1].dtype == torch.float32
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    assert out[0][0] > -1e-3 and out[1][0] < 1e-2  # the peaked row
    assert_same_gradients(out, expected, (hidden, weight), dtype, seed=2,
                          **({} if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)))


def test_reference_bf16_products_match_bf16_logits():
    """dot_dtype=bf16 (the CPU trainer's path) equals full logits whose products are taken in bf16,
    values and gradients, and stays within bf16 rounding of the float32 answer."""
    hidden, weight, targets = random_inputs(37, 64, 1000, torch.float32, seed=5)
    out = reference_logprob(hidden, weight, targets, 0.7, 256, dot_dtype=torch.bfloat16)
    logp = torch.log_softmax((hidden.bfloat16() @ weight.bfloat16().T).float() / 0.7, -1)
    expected = logp.gather(1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)
    for got, want, exact in zip(out, expected, full_logits(hidden, weight, targets, 0.7)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
        assert (got - exact).abs().max() < 0.2 and not torch.equal(got, exact)
    assert_same_gradients(out, expected, (hidden, weight), torch.float32, seed=6, rtol=2e-2, atol=2e-2)


def test_reference_gradcheck():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 10, 7, 4])  # chunks of 4: the first, middle and ragged last chunk
    assert torch.autograd.gradcheck(lambda h, w: reference_logprob(h, w, targets, 0.7, chunk_size=4),
                                    (hidden, weight))


def test_reference_rejects_a_zero_temperature():
    hidden, weight, targets = random_inputs(4, 8, 16, torch.float32, seed=4)
    with pytest.raises(AssertionError, match="temperature"):
        reference_logprob(hidden, weight, targets, 0.0)


# ---- Triton against the reference ----

@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [256, 4096])  # four vocabulary chunks (the last ragged), or one
def test_triton_matches_reference(dtype, temperature, chunk_size):
    # 70 tokens: two token blocks, the second ragged; D = 80: the last step over D is masked
    hidden, weight, targets = random_inputs(70, 80, 1000, dtype, seed=5)
    expected = reference_logprob(hidden, weight, targets, temperature, chunk_size)
    with poisoned_outputs():
        out = logprob(hidden, weight, targets, temperature, chunk_size)
    for got, want in zip(out, expected):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)
    assert_same_gradients(out, expected, (hidden, weight), dtype, seed=6, poisoned=True,
                          **({} if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)))


def test_mixed_dtypes_under_autocast():
    """As the trainer calls it: bf16 hidden states from an autocast forward, a float32 LM head."""
    hidden, _, targets = random_inputs(70, 80, 1000, torch.bfloat16, seed=8)
    weight = random_inputs(70, 80, 1000, torch.float32, seed=8)[1]
    expected = full_logits(hidden, weight, targets, 0.7)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        ref = reference_logprob(hidden, weight, targets, 0.7, 256)
        with poisoned_outputs():
            out = logprob(hidden, weight, targets, 0.7, 256)
    for got, got_ref, want in zip(out, ref, expected):
        torch.testing.assert_close(got_ref, want, rtol=1e-5, atol=2e-5)  # bf16 logits would be off by ~0.05
        torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)
    weights = loss_weights(70, seed=9)[0]
    with poisoned_outputs():
        grads = gradients(out, weights, (hidden, weight))
    for got, got_ref, want in zip(grads, gradients(ref, weights, (hidden, weight)),
                                  gradients(expected, weights, (hidden, weight))):
        tolerance = {} if got.dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_ref, want, **tolerance)
        torch.testing.assert_close(got, want, **tolerance)


# ---- memory: the largest tensor any op makes, forward and backward ----

class LargestTensor(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any torch op returns while active."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("fn, N, D, V, bound", [
    (reference_logprob, 256, 32, 16384, 256 * 1024 * 4),  # [N, chunk] float32 slices
    (logprob, 256, 16, 4096, 4096 * 16 * 4),  # the float32 [V, D] gradient accumulator
], ids=["reference", "triton"])
def test_no_tensor_near_the_full_logits(fn, N, D, V, bound):
    hidden, weight, targets = random_inputs(N, D, V, torch.bfloat16, seed=7)
    full_bytes = N * V * 4
    with LargestTensor() as control:  # the recorder sees a materialised [N, V] float32 tensor
        gradients(full_logits(hidden, weight, targets, 1.0), (1.0, None), (hidden, weight))
    assert control.bytes >= full_bytes
    with LargestTensor() as seen:
        gradients(fn(hidden, weight, targets, 1.0, chunk_size=1024), (1.0, 1.0), (hidden, weight))
    assert seen.bytes <= bound <= full_bytes / 4


@pytest.mark.parametrize("fn", [reference_logprob, logprob], ids=["reference", "triton"])
def test_a_frozen_head_gets_the_same_hidden_gradient(fn):
    """A frozen LM head (LoRA's) skips the weight gradient in the reference: the hidden one is unchanged."""
    hidden, weight, targets = random_inputs(48, 32, 3000, torch.float32, seed=11)
    trained = gradients(fn(hidden, weight, targets, 0.8, chunk_size=1024), (1.0, 0.5), (hidden,))[0]
    frozen = gradients(fn(hidden, weight.detach(), targets, 0.8, chunk_size=1024), (1.0, 0.5), (hidden,))[0]
    torch.testing.assert_close(frozen, trained)  # the Triton backward sums by atomics, in a varying order
