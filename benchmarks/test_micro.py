"""pytest-benchmark microbenchmarks of the CPU paths: the torch backend against the references.

Small enough for CI (one 256 x 256 layer, 128 tokens, float32, one thread):

    python -m pytest benchmarks/test_micro.py --benchmark-only \
        --benchmark-min-rounds=5 --benchmark-max-time=0.05

Not collected by `make test` (pytest's testpaths is tests/); `make bench` runs it. Each
benchmark also checks that its implementation computes the same layer as the naive one.
"""

from __future__ import annotations

import pytest
import torch

from spp_kernels import spp_linear
from spp_kernels.ops.reference import spp_linear_blocked, spp_linear_naive
from spp_kernels.pruning.masks import nm_mask

M, N, TOKENS, R, SCALE = 256, 256, 128, 16, 2.0


def _torch_backend(*args, **kwargs):
    return spp_linear(*args, backend="torch", **kwargs)


IMPLS = {"torch": _torch_backend, "naive": spp_linear_naive, "blocked": spp_linear_blocked}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # A shared CI machine is oversubscribed; one thread keeps the medians meaningful.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(M, N, generator=gen) / N**0.5
    w = w * nm_mask(w.abs(), 2, 4)
    x = torch.randn(TOKENS, N, generator=gen).requires_grad_(True)
    alpha = (torch.randn(R, N, generator=gen) / N**0.5).requires_grad_(True)
    beta = (torch.randn(M, generator=gen) / M**0.5).requires_grad_(True)
    dy = torch.randn(TOKENS, M, generator=gen)
    return x, w, alpha, beta, dy


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_spp_linear(benchmark, inputs, impl, mode):
    x, w, alpha, beta, dy = inputs
    fn = IMPLS[impl]
    benchmark.group = f"spp_linear {mode} {M}x{N} tokens={TOKENS} float32"

    def forward():
        return fn(x, w, alpha, beta, scale=SCALE)

    def full():
        for t in (x, alpha, beta):
            t.grad = None
        forward().backward(dy)
        return alpha.grad

    got = benchmark(forward if mode == "forward" else full)
    if mode == "forward":
        expected = spp_linear_naive(x, w, alpha, beta, scale=SCALE)
    else:
        alpha.grad = None
        spp_linear_naive(x, w, alpha, beta, scale=SCALE).backward(dy)
        expected = alpha.grad
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
