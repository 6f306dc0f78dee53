"""The Triton backend (csrc_triton/ kernels, both paths) against a float64 oracle.

Oracle: spp_kernels.ops.reference.spp_linear_naive in float64 with autograd (it
materialises W', an implementation independent of the kernels' tiling), given the same
dropout mask. Inputs are drawn in the test dtype and widened to float64, so both sides
see the same numbers. Errors are normwise: max|got - ref| / max|ref|, with the tolerance
table of tests/helpers.py.

Every case runs on both Triton paths: "fused" (the one-pass kernels) and "chunked" (W_eff /
W'' written in row chunks by an elementwise kernel, GEMMs by torch.mm), with a chunk budget
small enough to cut the weight into several chunks, and with dense or N:M packed weights.
On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest) with 16-wide tiles, so
these small ragged shapes cross many tile and row-group boundaries; the @cuda tests run
the compiled kernels on larger shapes. Kernel outputs are pre-filled with NaN, so an
element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.helpers import (  # noqa: E402
    HAS_CUDA,
    INTERPRETER_WARNINGS,
    NaNEmptyTorch,
    assert_close,
    require_triton_kernels,
)

require_triton_kernels()

import csrc_triton.dropout_bits as dropout_bits_mod  # noqa: E402
import csrc_triton.spp_backward as spp_backward_mod  # noqa: E402
import csrc_triton.spp_forward as spp_forward_mod  # noqa: E402
import csrc_triton.weight_chunks as weight_chunks_mod  # noqa: E402
from csrc_triton._launch import MIN_DOT, alpha_groups  # noqa: E402
from spp_kernels import PackedWeight, dropout_mask, spp_linear, spp_linear_packed  # noqa: E402
from spp_kernels.ops import chunked, torch_backend, triton_backend  # noqa: E402
from spp_kernels.ops.dropout import draw_keep_bits  # noqa: E402
from spp_kernels.ops.groups import row_groups  # noqa: E402
from spp_kernels.ops.reference import spp_linear_naive  # noqa: E402

pytestmark = pytest.mark.filterwarnings(INTERPRETER_WARNINGS)
DEVICE = "cuda" if HAS_CUDA else "cpu"
# Largest error seen per (dtype, quantity), printed at the end of the module.
MAX_ERRORS: dict[tuple[str, str], float] = {}
PATHS = ("fused", "chunked")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Force one Triton path; the chunked one with a budget of 10 float32 rows of 64 columns,
    which cuts these shapes (m 33-45, n 36-52) into 2-4 chunks (a one-row budget took 4x
    the time in the interpreter and covers nothing more)."""
    if request.param == "chunked":
        monkeypatch.setattr(triton_backend, "CHUNKED_MIN_TOKENS", 1)
        monkeypatch.setattr(chunked, "CHUNK_BYTES", 10 * 64 * 4)
    else:
        monkeypatch.setattr(triton_backend, "CHUNKED_MIN_TOKENS", 10**9)
    return request.param


def check_close(name: str, got: torch.Tensor, ref: torch.Tensor) -> float:
    err = assert_close(got, ref, name=name)
    key = (str(got.dtype).removeprefix("torch."), name)
    MAX_ERRORS[key] = max(MAX_ERRORS.get(key, 0.0), err)
    return err


@pytest.fixture(scope="module", autouse=True)
def _error_table():
    yield
    if MAX_ERRORS:
        rows = "\n".join(f"  {d:9s} {q:7s} {e:.2e}" for (d, q), e in sorted(MAX_ERRORS.items()))
        print(f"\nmax normwise relative error of the Triton kernels vs float64:\n{rows}")


@pytest.fixture
def poisoned(monkeypatch):
    """NaN-filled outputs and workspaces in the launchers; checks they were used."""
    fake = NaNEmptyTorch()
    for module in (spp_forward_mod, spp_backward_mod, weight_chunks_mod, chunked, dropout_bits_mod):
        monkeypatch.setattr(module, "torch", fake)
    yield
    # fused: y, dx, dbeta partials, dalpha partials, dalpha; chunked: y, chunks, dx, ...
    assert fake.poisoned >= 5


def sparse_weight(m: int, n: int, dtype: torch.dtype, kind: str) -> torch.Tensor:
    """A pruned weight: 'dense', 'unstructured' (~60 % zeros and an all-zero 16x16 tile) or
    'N:M' such as '2:4' (the top-N magnitudes of every M consecutive columns)."""
    w = torch.randn(m, n, dtype=torch.float64)
    if kind == "unstructured":
        w = w * (torch.rand(m, n, dtype=torch.float64) > 0.6)
        w[:16, :16] = 0.0
    elif ":" in kind:
        keep_n, group = map(int, kind.split(":"))
        groups = w.view(m, n // group, group)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(2, groups.abs().topk(keep_n, dim=2).indices, True)
        w = (groups * keep).view(m, n)
    return w.to(dtype).to(DEVICE)


@dataclasses.dataclass(frozen=True)
class Case:
    lead: tuple[int, ...]  # leading dims of x: (tokens,) or (batch, seq)
    n: int
    m: int
    r: int
    dtype: torch.dtype
    ab_dtype: torch.dtype  # alpha, beta and bias dtype
    dropout_p: float = 0.0
    bias: bool = True
    layout: str = "contiguous"  # contiguous | strided | transposed (x and dy)
    sparsity: str = "dense"

    def __str__(self) -> str:
        short = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
        return (
            f"{'x'.join(map(str, self.lead))}-n{self.n}-m{self.m}-r{self.r}-{short[self.dtype]}"
            f"-ab{short[self.ab_dtype]}-p{self.dropout_p}-{'bias' if self.bias else 'nobias'}"
            f"-{self.layout}-{self.sparsity}"
        )


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CASES = [
    Case((37,), 52, 40, 3, F32, F32),
    Case((37,), 52, 40, 3, F32, F32, 0.25, False, "transposed", "2:4"),
    Case((23,), 36, 45, 4, F16, F32, 0.0, True, "strided", "unstructured"),
    Case((2, 11), 36, 45, 7, F16, F16, 0.2, True, "contiguous", "2:4"),
    Case((29,), 44, 33, 5, BF16, F32, 0.0, False, "transposed", "2:4"),
    Case((29,), 44, 33, 5, BF16, BF16, 0.3, True, "strided", "unstructured"),
    Case((1,), 17, 19, 1, F32, F32, 0.1),  # one token, r = 1, n < one k-block
    Case((18,), 20, 18, 18, F32, F32, 0.0, True, "strided", "unstructured"),  # r = m
    Case((3, 5), 24, 50, 6, BF16, F32, 0.15, True, "transposed", "dense"),  # 6 does not divide 50
]


def make_tensor(shape: tuple[int, ...], dtype: torch.dtype, layout: str) -> torch.Tensor:
    """A random leaf tensor of `shape` whose strides follow `layout` (2-D shapes only)."""
    if layout == "strided":
        t = torch.randn(shape[0], 2 * shape[1], dtype=dtype, device=DEVICE)[:, ::2]
    elif layout == "transposed":
        t = torch.randn(shape[1], shape[0], dtype=dtype, device=DEVICE).t()
    else:
        t = torch.randn(*shape, dtype=dtype, device=DEVICE)
    return t.detach().requires_grad_()


def _packed(weight: torch.Tensor, sparsity: str) -> PackedWeight | None:
    """The weight packed N:M when its sparsity is a pattern the cases use, else None."""
    pattern = {"2:4": (2, 4), "2:8": (2, 8), "3:8": (3, 8)}.get(sparsity)
    return None if pattern is None else PackedWeight.from_dense(weight, *pattern)


def run_case(case: Case, seed: int = 1234, packed: bool = False) -> None:
    """Forward + backward through spp_linear(backend='triton') vs the float64 oracle, with
    the dropout mask the op drew for `seed` on this device; packed=True gives the weight as
    a PackedWeight (the same math, tiles decoded in registers / chunks decompressed)."""
    n, m, r, scale = case.n, case.m, case.r, 1.5
    x = make_tensor((*case.lead, n), case.dtype, case.layout if len(case.lead) == 1 else "")
    weight = sparse_weight(m, n, case.dtype, case.sparsity)
    alpha = (torch.randn(r, n, device=DEVICE) * 0.5).to(case.ab_dtype).requires_grad_()
    beta = torch.randn(m, device=DEVICE).to(case.ab_dtype).requires_grad_()
    bias = torch.randn(m, device=DEVICE).to(case.ab_dtype).requires_grad_() if case.bias else None
    kw = dict(scale=scale, dropout_p=case.dropout_p, seed=seed)
    weight_bits = weight.clone()

    if packed:
        pw = _packed(weight, case.sparsity)
        y = spp_linear_packed(x, pw, alpha, beta, bias, backend="triton", **kw)
    else:
        y = spp_linear(x, weight, alpha, beta, bias, backend="triton", **kw)
    dy = make_tensor((*case.lead, m), case.dtype, case.layout if len(case.lead) == 1 else "")
    y.backward(dy.detach())

    leaves = [t.detach().double().requires_grad_() for t in (x, alpha, beta)]
    bias64 = bias.detach().double().requires_grad_() if case.bias else None
    y64 = spp_linear_naive(leaves[0], weight.double(), leaves[1], leaves[2], bias64, **kw)
    y64.backward(dy.detach().double())

    assert y.dtype == case.dtype and y.shape == (*case.lead, m)
    check_close("y", y, y64)
    check_close("dx", x.grad, leaves[0].grad)
    check_close("dalpha", alpha.grad, leaves[1].grad)
    check_close("dbeta", beta.grad, leaves[2].grad)
    if case.bias:
        check_close("dbias", bias.grad, bias64.grad)
    for param in (x, alpha, beta, bias):
        if param is not None:
            assert param.grad.dtype == param.dtype
    # The frozen (pruned) weight is only ever read: every value and every zero, bitwise.
    int_view = {2: torch.int16, 4: torch.int32}[weight.element_size()]
    assert torch.equal(weight.view(int_view), weight_bits.view(int_view))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_spp_linear_matches_float64(case, path, poisoned):
    run_case(case)


PACKED_CASES = [c for c in CASES if c.sparsity == "2:4"] + [
    Case((21,), 48, 33, 5, F32, F32, 0.2, True, "contiguous", "2:8"),
    Case((19,), 32, 20, 3, BF16, F32, 0.0, False, "strided", "3:8"),  # the per-element decoder
]


@pytest.mark.parametrize("case", PACKED_CASES, ids=str)
def test_packed_weight_matches_float64(case, path, poisoned):
    run_case(case, packed=True)


def test_the_same_mask_gives_the_same_result_on_every_backend_and_path(monkeypatch):
    """One explicit keep_mask (packed bits) given to the torch backend, both Triton paths
    and the reference: equal results (fp32, up to summation order)."""
    tokens, n, m, r, p = 29, 40, 36, 5, 0.3
    x = torch.randn(tokens, n, device=DEVICE)
    weight = sparse_weight(m, n, torch.float32, "2:4")
    alpha, beta = torch.randn(r, n, device=DEVICE), torch.randn(m, device=DEVICE)
    bits = draw_keep_bits(tokens, n, p, 321, DEVICE)
    ref = spp_linear_naive(x.double(), weight.double(), alpha.double(), beta.double(),
                           dropout_p=p, keep_mask=bits)  # fmt: skip
    outs = {
        "torch": spp_linear(x, weight, alpha, beta, dropout_p=p, keep_mask=bits, backend="torch")
    }
    for path_name, threshold in (("fused", 10**9), ("chunked", 1)):
        monkeypatch.setattr(triton_backend, "CHUNKED_MIN_TOKENS", threshold)
        outs[path_name] = spp_linear(
            x, weight, alpha, beta, dropout_p=p, keep_mask=bits, backend="triton"
        )
    for name, y in outs.items():
        assert_close(y, ref, tol=1e-6, name=name)
    # A bool mask of x's shape is the same mask as its packed bits.
    keep = dropout_mask((tokens, n), p, 321, DEVICE)
    same = spp_linear(x, weight, alpha, beta, dropout_p=p, keep_mask=keep, backend="torch")
    assert torch.equal(same, outs["torch"])


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 123, -5])
def test_the_kernels_apply_exactly_the_saved_mask(seed, path):
    """Each kernel applies dropout_mask bit for bit.

    With W = I (n = m), alpha = beta = 1, scale = 1 and X = dY = 1:
    Y = 1 + keep / (1 - p), dX = 1 + keep / (1 - p) and dbeta[o] = dalpha[0, o] =
    sum_t keep(t, o) / (1 - p), so the masks can be read back exactly.
    """
    tokens, n, p = 19, 37, 0.4
    bits = draw_keep_bits(tokens, n, p, seed, DEVICE)
    keep = dropout_mask((tokens, n), p, seed, DEVICE)
    ones = torch.ones(tokens, n, device=DEVICE)
    eye = torch.eye(n, device=DEVICE)
    alpha, beta = torch.ones(1, n, device=DEVICE), torch.ones(n, device=DEVICE)

    y = triton_backend.forward(ones, eye, alpha, beta, None, 1.0, p, bits)
    assert torch.equal((y - 1.0) * (1.0 - p) > 0.5, keep)
    dx, dalpha, dbeta = triton_backend.backward(ones, ones, eye, alpha, beta, 1.0, p, bits)
    assert torch.equal((dx - 1.0) * (1.0 - p) > 0.5, keep)
    counts = keep.sum(0).float()
    torch.testing.assert_close(dbeta * (1.0 - p), counts, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(dalpha[0] * (1.0 - p), counts, rtol=1e-6, atol=1e-5)


def test_backend_functions_match_float64_directly(path):
    """triton_backend.forward/backward (without the custom op) on a fp16 case with fp32
    adapters, and the need_* flags: gradients not asked for are not computed."""
    tokens, n, m, r, scale, p = 21, 40, 34, 3, 0.8, 0.2
    x = torch.randn(tokens, n, device=DEVICE).half()
    weight = sparse_weight(m, n, torch.float16, "2:4")
    frozen = weight
    alpha, beta = torch.randn(r, n, device=DEVICE), torch.randn(m, device=DEVICE)
    dy = torch.randn(tokens, m, device=DEVICE).half()
    bits = draw_keep_bits(tokens, n, p, 99, DEVICE)
    x64, a64, b64 = x.double(), alpha.double(), beta.double()
    f64 = weight.double()

    y_ref = torch_backend.forward(x64, f64, a64, b64, None, scale, p, bits)
    y = triton_backend.forward(x, frozen, alpha, beta, None, scale, p, bits)
    check_close("y", y, y_ref)
    grads_ref = torch_backend.backward(dy.double(), x64, f64, a64, b64, scale, p, bits)
    dx, dalpha, dbeta = triton_backend.backward(dy, x, frozen, alpha, beta, scale, p, bits)
    for name, got, ref in zip(("dx", "dalpha", "dbeta"), (dx, dalpha, dbeta), grads_ref):
        check_close(name, got, ref)
    assert (dx.dtype, dalpha.dtype, dbeta.dtype) == (torch.float16, torch.float32, torch.float32)

    args = (dy, x, frozen, alpha, beta, scale, p, bits)
    only_dx = triton_backend.backward(*args, True, False)
    assert only_dx[1] is None and only_dx[2] is None and torch.equal(only_dx[0], dx)
    only_ab = triton_backend.backward(*args, False, True)
    assert only_ab[0] is None
    assert torch.equal(only_ab[1], dalpha) and torch.equal(only_ab[2], dbeta)


def test_chunks_stay_under_the_budget_and_cover_every_row():
    for m, n, r, itemsize, budget in [(40, 16, 5, 4, 192), (64, 32, 16, 2, 1000), (7, 3, 7, 8, 1)]:
        chunks = chunked.row_chunks(m, n, r, itemsize, budget)
        rows = [row for row0, count in chunks for row in range(row0, row0 + count)]
        assert rows == list(range(m))
        assert all(count * n * itemsize <= max(budget, n * itemsize) for _, count in chunks)
        if m % r == 0 and budget >= (m // r) * n * itemsize:
            assert all(count % (m // r) == 0 for _, count in chunks)


def test_weight_chunk_kernel_matches_torch():
    m, n, r, scale = 37, 48, 5, 1.25
    weight = sparse_weight(m, n, torch.float32, "2:4")
    alpha, beta = torch.randn(r, n, device=DEVICE), torch.randn(m, device=DEVICE)
    pw = PackedWeight.from_dense(weight, 2, 4)
    dense, packed = weight, PackedWeight(pw.values, pw.meta, 2, 4, n)
    for row0, rows in [(0, m), (5, 9), (36, 1)]:
        for mode in ("weight", "merged", "adapter"):
            ref = torch_backend._builder(dense, alpha, beta, torch.float32)(row0, rows, mode, scale)
            for frozen in (dense, packed):
                got = triton_backend._builder(frozen, alpha, beta)(row0, rows, mode, scale)
                assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6), (row0, rows, mode)
                assert torch.equal(got == 0, ref == 0)


def test_out_argument_writes_every_element_of_a_strided_buffer():
    tokens, n, m, r = 20, 24, 33, 2
    x = torch.randn(tokens, n, device=DEVICE)
    weight = torch.randn(m, n, device=DEVICE)
    alpha, beta = torch.randn(r, n, device=DEVICE), torch.randn(m, device=DEVICE)
    out = torch.full((m, tokens), math.nan, device=DEVICE).t()
    got = spp_forward_mod.spp_linear_forward(x, weight, alpha, beta, None, 1.0, 0.0, out=out)
    assert got is out
    ref = spp_forward_mod.spp_linear_forward(x, weight, alpha, beta, None, 1.0, 0.0)
    assert torch.equal(out, ref)
    dy = torch.randn(tokens, m, device=DEVICE)
    dx_out = torch.full((tokens, 2 * n), math.nan, device=DEVICE)[:, ::2]
    spp_backward_mod.spp_linear_dx(dy, weight, alpha, beta, 1.0, 0.0, out=dx_out)
    assert torch.equal(dx_out, spp_backward_mod.spp_linear_dx(dy, weight, alpha, beta, 1.0, 0.0))
    with pytest.raises(ValueError, match="out must be"):
        spp_forward_mod.spp_linear_forward(x, weight, alpha, beta, None, 1.0, 0.0, out=out.t())


def test_empty_inputs_launch_nothing_and_give_zero_gradients(path):
    n, m, r = 8, 6, 2
    x = torch.randn(0, n, device=DEVICE)
    frozen = torch.randn(m, n, device=DEVICE)
    alpha, beta = torch.randn(r, n, device=DEVICE), torch.randn(m, device=DEVICE)
    bias = torch.randn(m, device=DEVICE)
    assert triton_backend.forward(x, frozen, alpha, beta, bias, 1.0, 0.0, None).shape == (0, m)
    dx, dalpha, dbeta = triton_backend.backward(
        torch.randn(0, m, device=DEVICE), x, frozen, alpha, beta, 1.0, 0.0, None
    )
    assert dx.shape == (0, n)
    assert torch.equal(dalpha, torch.zeros(r, n, device=DEVICE))
    assert torch.equal(dbeta, torch.zeros(m, device=DEVICE))


def test_path_choice_follows_the_token_threshold():
    assert triton_backend.choose_path(triton_backend.CHUNKED_MIN_TOKENS - 1) == "fused"
    assert triton_backend.choose_path(triton_backend.CHUNKED_MIN_TOKENS) == "chunked"
    assert triton_backend.choose_path(1, "chunked") == "chunked"
    with pytest.raises(ValueError, match="path must be"):
        triton_backend.choose_path(1, "cublas")


def test_dalpha_slots_bound_the_groups_of_every_row_tile():
    """The dalpha partial buffer has enough slots, and the alpha row-select path enough
    alpha rows, for every row tile, for any r <= m."""
    for m in [*range(1, 80), 127, 128, 129, 300, 4096, 11008]:
        for r in sorted({1, 2, 3, 7, 16, 64, m // 3, m // 2, m - 1, m} & set(range(1, m + 1))):
            groups = row_groups(m, r)
            for block in (16, 64, 128):
                slots = spp_backward_mod.dalpha_slots(m, r, block)
                starts = torch.arange(0, m, block)
                ends = (starts + block).clamp(max=m) - 1
                spans = groups[ends] - groups[starts] + 1
                assert int(spans.max()) <= slots, (m, r, block)
                selected = alpha_groups(block, r, m)
                assert selected == 0 or int(spans.max()) <= selected, (m, r, block)


def test_cases_cover_both_alpha_tile_paths():
    """The interpreter's 16-row tiles select alpha rows for some cases, gather for others."""
    paths = {alpha_groups(16, case.r, case.m) > 0 for case in CASES}
    assert paths == {True, False}


TABLES = {
    "forward": spp_forward_mod.FORWARD_CONFIGS,
    "dx": spp_backward_mod.DX_CONFIGS,
    "dalpha_dbeta": spp_backward_mod.DAB_CONFIGS,
}


def test_every_tl_dot_block_is_at_least_16():
    configs = [
        *(c for tables in TABLES.values() for table in tables.values() for c in table),
        spp_forward_mod.FORWARD_INTERPRETER_CONFIG,
        spp_backward_mod.DX_INTERPRETER_CONFIG,
        spp_backward_mod.DAB_INTERPRETER_CONFIG,
    ]
    for config in configs:
        for name, value in config.kwargs.items():
            if name.startswith("BLOCK_"):
                assert value >= MIN_DOT, (name, value)
    assert min(spp_backward_mod.DAB_BLOCK_M, spp_backward_mod.DAB_BLOCK_N) >= MIN_DOT


@pytest.mark.parametrize(
    "capability,arch", [((8, 0), "sm_80"), ((8, 6), "sm_80"), ((8, 9), "sm_80"),
                        ((9, 0), "sm_90a"), ((10, 0), "sm_90a")],
)  # fmt: skip
@pytest.mark.parametrize("kernel", sorted(TABLES))
def test_the_launch_device_capability_picks_its_config_table(monkeypatch, capability, arch,
                                                             kernel):  # fmt: skip
    """Issue 24: the GPU autotuner keeps only the table of the device it launches on (a
    fake capability here; the interpreter always runs its one config)."""
    from csrc_triton._launch import arch_of, arch_pruner

    seen = []

    def fake_capability(device=None):
        seen.append(device)
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", fake_capability)
    tables = TABLES[kernel]
    every = [c for table in tables.values() for c in table]
    x = torch.zeros(2)
    kept = arch_pruner(tables)(every, {}, x_ptr=x, tokens=2)
    assert arch_of(capability) == arch
    assert [id(c) for c in kept] == [id(c) for c in tables[arch]]
    assert seen == [x.device]  # the launch tensor's device, not the current device


LOW_BIT_TABLES = {
    "forward": (spp_forward_mod.FORWARD_CONFIGS, spp_forward_mod.FORWARD_LOW_BIT_CONFIGS),
    "dx": (spp_backward_mod.DX_CONFIGS, spp_backward_mod.DX_LOW_BIT_CONFIGS),
}


@pytest.mark.parametrize("capability,arch", [((8, 0), "sm_80"), ((9, 0), "sm_90a")])
@pytest.mark.parametrize("kernel", sorted(LOW_BIT_TABLES))
def test_low_bit_weights_pick_their_spill_free_subset(monkeypatch, capability, arch, kernel):
    """A weight of low-bit codes (VALUES > 0) keeps its architecture's low-bit subset (the
    configs that spill with its decode left out); a float weight the whole table."""
    from csrc_triton._launch import arch_pruner, config_label, without

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    tables, low_bit = LOW_BIT_TABLES[kernel]
    every = [c for table in tables.values() for c in table]
    prune = arch_pruner(tables, low_bit)
    x = torch.zeros(2)
    for values in (1, 2, 3):
        kept = prune(every, {}, x_ptr=x, VALUES=values)
        assert [id(c) for c in kept] == [id(c) for c in low_bit[arch]]
    assert 0 < len(low_bit[arch]) < len(tables[arch])
    assert [id(c) for c in prune(every, {}, x_ptr=x, VALUES=0)] == [id(c) for c in tables[arch]]
    with pytest.raises(ValueError, match="no sm_80 config"):
        without(tables, {"sm_80": ["1x2x3 w4 s5"]})
    assert all(config_label(c).count("x") == 2 for c in tables[arch])


def test_clear_errors():
    n, m, r = 8, 6, 2
    x64 = torch.randn(4, n, dtype=torch.float64, device=DEVICE)
    w64 = torch.randn(m, n, dtype=torch.float64, device=DEVICE)
    a64, b64 = torch.randn(r, n, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        spp_linear(x64, w64, a64.to(DEVICE), b64.to(DEVICE), backend="triton")
    f64 = w64  # the device tier's own checks: direct launcher calls
    with pytest.raises(TypeError, match="float64"):
        spp_forward_mod.spp_linear_forward(
            x64, f64, a64.to(DEVICE), b64.to(DEVICE), None, 1.0, 0.0, None
        )
    x, w = x64.half(), w64.half()
    alpha, beta = a64.to(DEVICE).float(), b64.to(DEVICE).float()
    with pytest.raises(TypeError, match="alpha dtype"):
        spp_forward_mod.spp_linear_forward(x, w, alpha.bfloat16(), beta, None, 1.0, 0.0, None)
    with pytest.raises(TypeError, match="weight dtype"):
        spp_forward_mod.spp_linear_forward(x, w64.float(), alpha, beta, None, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="beta must have shape"):
        spp_forward_mod.spp_linear_forward(x, w, alpha, beta[:-1], None, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="keep bits"):
        spp_forward_mod.spp_linear_forward(x, w, alpha, beta, None, 1.0, 0.5, None)
    with pytest.raises(ValueError, match="dy must be"):
        spp_backward_mod.spp_linear_dalpha_dbeta(
            x[:, :m].contiguous()[:3], x, w, alpha, beta, 1.0, 0.0, None
        )


# ---------------------------------------------------------------- compiled kernels (GPU)

GPU_CASES = [
    Case((300,), 520, 384, 16, BF16, F32, 0.0, True, "contiguous", "2:4"),
    Case((4, 77), 264, 400, 12, BF16, BF16, 0.1, True, "contiguous", "unstructured"),
    Case((257,), 136, 300, 7, F16, F32, 0.05, False, "transposed", "2:4"),
    Case((129,), 200, 144, 144, F32, F32, 0.0, True, "strided", "unstructured"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_compiled_kernels_match_float64(case, path, poisoned):
    run_case(case)


@pytest.mark.cuda
@pytest.mark.parametrize("case", GPU_CASES[:1] + GPU_CASES[2:3], ids=str)
def test_compiled_packed_kernels_match_float64(case, path, poisoned):
    run_case(case, packed=True)


@pytest.mark.cuda
def test_compiled_gradients_are_deterministic():
    tokens, n, m, r = 1000, 512, 768, 16
    x = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    frozen = sparse_weight(m, n, torch.bfloat16, "2:4")
    alpha, beta = torch.randn(r, n, device="cuda"), torch.randn(m, device="cuda")
    dy = torch.randn(tokens, m, device="cuda", dtype=torch.bfloat16)
    bits = draw_keep_bits(tokens, n, 0.1, 5, "cuda")
    first = triton_backend.backward(dy, x, frozen, alpha, beta, 2.0, 0.1, bits)
    second = triton_backend.backward(dy, x, frozen, alpha, beta, 2.0, 0.1, bits)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_compiled_llama_shape_bf16_smoke():
    """One LLaMA-7B-sized projection (4096 x 4096, 2048 tokens, r = 16) in native bf16,
    both paths against the torch backend in float32."""
    tokens, n, m, r = 2048, 4096, 4096, 16
    x = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    weight = sparse_weight(m, n, torch.bfloat16, "2:4")
    alpha = torch.randn(r, n, device="cuda", dtype=torch.bfloat16) * 0.1
    beta = torch.randn(m, device="cuda", dtype=torch.bfloat16)
    ref = torch_backend.forward(
        x.float(), weight.float(), alpha.float(), beta.float(), None,
        2.0, 0.0, None,
    )  # fmt: skip
    for path_name in PATHS:
        y = triton_backend.forward(x, weight, alpha, beta, None, 2.0, 0.0, None, path=path_name)
        check_close("y", y, ref)
