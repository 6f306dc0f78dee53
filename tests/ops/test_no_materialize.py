"""No path allocates an (m, n) or (tokens, n, r) tensor beyond its chunk budget, and
nothing weight-sized is saved for backward.

Probe: torch.profiler with profile_memory=True records every allocation made through
PyTorch's allocator inside the profiled region (CPU, and CUDA on a GPU), at any depth:
inside the spp_linear custom ops, our host glue and launchers, and the autograd engine.
Each allocation is attributed to the op that made it (`self_*_memory_usage`), in bytes.

Shapes are chosen so that an (m, n) tensor (W', Repeat(alpha), W_eff, G) or a
(tokens, n, r) tensor (X * alpha for every block) is larger, even in a 2-byte dtype, than
anything the fused path may allocate: Y (tokens, m), dX and dY (tokens, n|m), dalpha (r, n)
and the small partial-sum workspaces.

Under TRITON_INTERPRET=1 the kernels run on numpy views of the tensors' own storages: the
interpreter allocates only a 0-element tensor header per argument through PyTorch (it
would show up here if it copied a weight), and its numpy block temporaries are outside
PyTorch's allocator and not the library's doing. On a GPU the same probe measures device
allocations. The naive reference, which materialises Repeat(alpha) and W', goes through
the same probe and must trip it: the probe is sensitive.

The chunked paths (Triton's many-token path and the torch backend) may allocate weight
chunks: with the budget set to a quarter of W's bytes, every allocation stays under half
of W's bytes and a chunk-sized allocation is seen (so the budget, not luck, bounds them).
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from tests.helpers import HAS_CUDA, INTERPRETER_WARNINGS, require_triton_kernels  # noqa: E402

require_triton_kernels()

from spp_kernels import spp_linear  # noqa: E402
from spp_kernels.ops import chunked, triton_backend  # noqa: E402
from spp_kernels.ops.reference import spp_linear_naive  # noqa: E402

pytestmark = pytest.mark.filterwarnings(INTERPRETER_WARNINGS)
DEVICE = "cuda" if HAS_CUDA else "cpu"
TOKENS, N, M, R = 8, 48, 64, 16
# Smallest forbidden tensor in the smallest float dtype (2 bytes): m*n = 3072 elements,
# tokens*n*r = 6144 elements. The fused path's largest allocation is 3840 bytes.
FORBIDDEN_BYTES = 2 * min(M * N, TOKENS * N * R)


def allocations(
    fn, dropout_p: float, dtype: torch.dtype, backend: str = "triton"
) -> list[tuple[str, int]]:
    """(op name, bytes) of every allocation during forward + backward of fn."""
    x = torch.randn(TOKENS, N, device=DEVICE, dtype=dtype, requires_grad=True)
    weight = torch.randn(M, N, device=DEVICE, dtype=dtype)
    alpha = torch.randn(R, N, device=DEVICE, requires_grad=True)
    beta = torch.randn(M, device=DEVICE, requires_grad=True)
    bias = torch.randn(M, device=DEVICE, requires_grad=True)
    dy = torch.randn(TOKENS, M, device=DEVICE, dtype=dtype)
    kwargs = dict(scale=2.0, dropout_p=dropout_p, seed=11)
    if fn is spp_linear:
        kwargs["backend"] = backend
    # Warm-up: one-time work (compilation, autotuning, the 8 KB bit-unpacking table) is not
    # a per-call allocation.
    fn(x, weight, alpha, beta, bias, **kwargs).backward(dy)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if HAS_CUDA else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn(x, weight, alpha, beta, bias, **kwargs).backward(dy)
    found = []
    for event in prof.events():
        size = event.self_cpu_memory_usage
        if HAS_CUDA:
            size = max(size, event.self_device_memory_usage)
        if size > 0:
            found.append((event.name, size))
    return found


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_path_allocates_no_weight_sized_tensor(dropout_p, dtype, monkeypatch):
    monkeypatch.setattr(triton_backend, "CHUNKED_MIN_TOKENS", 10**9)
    found = allocations(spp_linear, dropout_p, dtype)
    assert found, "the probe recorded nothing: is profile_memory working?"
    too_big = [(name, size) for name, size in found if size >= FORBIDDEN_BYTES]
    assert not too_big, f"allocations >= {FORBIDDEN_BYTES} bytes: {too_big}"


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_probe_catches_the_naive_reference(dropout_p):
    found = allocations(spp_linear_naive, dropout_p, torch.float32)
    weight_sized = [(name, size) for name, size in found if size >= M * N * 4]
    assert weight_sized, f"naive reference should allocate (m, n) tensors, saw {found}"


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.05, 0.3])  # 0.05: the torch backend's sparse path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_paths_stay_under_their_chunk_budget(backend, dropout_p, dtype, monkeypatch):
    weight_bytes = M * N * dtype.itemsize
    budget = weight_bytes // 4
    monkeypatch.setattr(triton_backend, "CHUNKED_MIN_TOKENS", 1)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", budget)
    found = allocations(spp_linear, dropout_p, dtype, backend)
    # The G kernel's dalpha partials (m_tiles, slots, n) float32 are the one other
    # sizeable buffer (the torch backend contracts G in float32 chunks of the budget).
    import csrc_triton.spp_backward as B

    workspace = -(-M // B.DAB_BLOCK_M) * B.dalpha_slots(M, R) * N * 4
    limit = max(weight_bytes // 2, workspace)
    too_big = [(name, size) for name, size in found if size > limit]
    assert not too_big, f"allocations over {limit} bytes (W has {weight_bytes}): {too_big}"
    assert any(size == budget for _, size in found), "no chunk-sized allocation was seen"


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_nothing_weight_sized_is_saved_for_backward(backend, dropout_p):
    """Saved for backward: X, W itself (the frozen input, not a copy), alpha, beta and the
    dropout bits (tokens * n / 8 bytes), nothing else."""
    x = torch.randn(TOKENS, N, device=DEVICE, requires_grad=True)
    weight = torch.randn(M, N, device=DEVICE)
    alpha = torch.randn(R, N, device=DEVICE, requires_grad=True)
    beta = torch.randn(M, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        spp_linear(x, weight, alpha, beta, dropout_p=dropout_p, seed=3, backend=backend)
    big = [t for t in saved if t.numel() >= M * N and t.data_ptr() != weight.data_ptr()]
    assert not big, [tuple(t.shape) for t in big]
    bits = [tuple(t.shape) for t in saved if t.dtype == torch.uint8]
    assert bits == ([(TOKENS, N // 8)] if dropout_p else [])
