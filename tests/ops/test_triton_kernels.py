"""The fused Triton kernels (csrc_triton/) against a float64 oracle.

Oracle: spp_kernels.reference.spp_linear_naive in float64 with autograd (it materialises
W', an implementation independent of the kernels' tiling). Inputs are drawn in the test
dtype and widened to float64, so both sides see the same numbers. Errors are normwise:
max|got - ref| / max|ref|, with a tolerance per dtype of the compared tensor.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest) with 16-wide tiles, so
these small ragged shapes cross many tile and row-group boundaries; the @cuda tests run the
compiled kernels (autotuned GPU tile configs, native bf16/fp16 MMA) on larger shapes.
Every kernel output buffer is pre-filled with NaN, so an element a kernel forgets to write
fails the comparison.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

pytest.importorskip("triton")

from tests.helpers import HAS_CUDA  # noqa: E402

if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import csrc_triton.spp_backward as spp_backward_mod  # noqa: E402
import csrc_triton.spp_forward as spp_forward_mod  # noqa: E402
from csrc_triton._launch import MIN_DOT, alpha_groups  # noqa: E402
from spp_kernels import dropout_mask, spp_linear
from spp_kernels.ops import triton_backend  # noqa: E402
from spp_kernels.ops.groups import row_groups  # noqa: E402
from spp_kernels.ops.reference import spp_linear_naive  # noqa: E402

# The interpreter (triton 3.6) turns 0-d arrays into loop bounds with a numpy deprecation.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim:DeprecationWarning"
)
DEVICE = "cuda" if HAS_CUDA else "cpu"
# Normwise tolerance by the dtype of the compared tensor. fp16/bf16 outputs carry the
# rounding of W_eff (or W * alpha) and of the result to that dtype; the interpreter's
# float32 -> bf16 conversion truncates, so bf16 sees up to two ulps (2**-7).
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# Largest error seen per (dtype, quantity), printed at the end of the module.
MAX_ERRORS: dict[tuple[str, str], float] = {}


def normwise_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_close(name: str, got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten output?)"
    err = normwise_error(got, ref)
    key = (str(got.dtype).removeprefix("torch."), name)
    MAX_ERRORS[key] = max(MAX_ERRORS.get(key, 0.0), err)
    assert err <= TOL[got.dtype], f"{name} ({got.dtype}): error {err:.3e} > {TOL[got.dtype]:.1e}"
    return err


@pytest.fixture(scope="module", autouse=True)
def _error_table():
    yield
    if MAX_ERRORS:
        rows = "\n".join(f"  {d:9s} {q:7s} {e:.2e}" for (d, q), e in sorted(MAX_ERRORS.items()))
        print(f"\nmax normwise relative error of the Triton kernels vs float64:\n{rows}")


class _NaNEmptyTorch:
    """Stands in for the `torch` module inside the kernel launchers: torch.empty returns
    NaN-filled (or -1 for integers) tensors, so unwritten output elements are caught."""

    def __init__(self):
        self.poisoned = 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *size, dtype=None, device=None, **kwargs):
        self.poisoned += 1
        t = torch.empty(*size, dtype=dtype, device=device, **kwargs)
        return t.fill_(math.nan if t.is_floating_point() else -1)


@pytest.fixture
def poisoned(monkeypatch):
    """NaN-filled outputs and workspaces in the launchers; checks they were used."""
    fake = _NaNEmptyTorch()
    for module in (spp_forward_mod, spp_backward_mod):
        monkeypatch.setattr(module, "torch", fake)
    yield
    # y, dx, dbeta partials, dalpha partials, dalpha
    assert fake.poisoned >= 5


def sparse_weight(m: int, n: int, dtype: torch.dtype, kind: str) -> torch.Tensor:
    """A pruned weight: 'dense', 'unstructured' (~60 % zeros and an all-zero 16x16 tile) or
    '2:4' (top-2 magnitudes of every 4 consecutive columns)."""
    w = torch.randn(m, n, dtype=torch.float64)
    if kind == "unstructured":
        w = w * (torch.rand(m, n, dtype=torch.float64) > 0.6)
        w[:16, :16] = 0.0
    elif kind == "2:4":
        groups = w.view(m, n // 4, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(2, groups.abs().topk(2, dim=2).indices, True)
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


def run_case(case: Case, seed: int = 1234) -> None:
    """Forward + backward through spp_linear(backend='triton') vs the float64 oracle."""
    n, m, r, scale = case.n, case.m, case.r, 1.5
    x = make_tensor((*case.lead, n), case.dtype, case.layout if len(case.lead) == 1 else "")
    weight = sparse_weight(m, n, case.dtype, case.sparsity)
    alpha = (torch.randn(r, n, device=DEVICE) * 0.5).to(case.ab_dtype).requires_grad_()
    beta = torch.randn(m, device=DEVICE).to(case.ab_dtype).requires_grad_()
    bias = torch.randn(m, device=DEVICE).to(case.ab_dtype).requires_grad_() if case.bias else None
    kw = dict(scale=scale, dropout_p=case.dropout_p, seed=seed)
    weight_bits = weight.clone()

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
def test_spp_linear_matches_float64(case, poisoned):
    run_case(case)


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 123, -5])
def test_dropout_mask_equals_dropout_mask(seed):
    """Each kernel's in-register mask is dropout_mask bit for bit.

    With W = I (n = m), alpha = beta = 1, scale = 1 and X = dY = 1:
    Y = 1 + keep / (1 - p), dX = 1 + keep / (1 - p) and dbeta[o] = dalpha[0, o] =
    sum_t keep(t, o) / (1 - p), so the masks can be read back exactly.
    """
    tokens, n, p = 19, 37, 0.4
    keep = dropout_mask((tokens, n), p, seed, DEVICE)
    ones = torch.ones(tokens, n, device=DEVICE)
    eye = torch.eye(n, device=DEVICE)
    alpha, beta = torch.ones(1, n, device=DEVICE), torch.ones(n, device=DEVICE)

    y = triton_backend.forward(ones, eye, alpha, beta, None, 1.0, p, seed)
    assert torch.equal((y - 1.0) * (1.0 - p) > 0.5, keep)
    dx, dalpha, dbeta = triton_backend.backward(ones, ones, eye, alpha, beta, 1.0, p, seed)
    assert torch.equal((dx - 1.0) * (1.0 - p) > 0.5, keep)
    counts = keep.sum(0).float()
    torch.testing.assert_close(dbeta * (1.0 - p), counts, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(dalpha[0] * (1.0 - p), counts, rtol=1e-6, atol=1e-5)


def test_backend_functions_match_float64_directly():
    """triton_backend.forward/backward (without the custom op) on a fp16 case with fp32
    adapters, and the need_* flags: gradients not asked for are not computed."""
    tokens, n, m, r, scale, p, seed = 21, 40, 34, 3, 0.8, 0.2, 99
    x = torch.randn(tokens, n, device=DEVICE).half()
    weight = sparse_weight(m, n, torch.float16, "2:4")
    alpha, beta = torch.randn(r, n, device=DEVICE), torch.randn(m, device=DEVICE)
    dy = torch.randn(tokens, m, device=DEVICE).half()
    args64 = [t.double() for t in (x, weight, alpha, beta)]

    from spp_kernels.ops import torch_backend

    y_ref = torch_backend.forward(*args64, None, scale, p, seed)
    check_close("y", triton_backend.forward(x, weight, alpha, beta, None, scale, p, seed), y_ref)
    grads_ref = torch_backend.backward(dy.double(), *args64, scale, p, seed)
    dx, dalpha, dbeta = triton_backend.backward(dy, x, weight, alpha, beta, scale, p, seed)
    for name, got, ref in zip(("dx", "dalpha", "dbeta"), (dx, dalpha, dbeta), grads_ref):
        check_close(name, got, ref)
    assert (dx.dtype, dalpha.dtype, dbeta.dtype) == (torch.float16, torch.float32, torch.float32)

    only_dx = triton_backend.backward(dy, x, weight, alpha, beta, scale, p, seed, True, False)
    assert only_dx[1] is None and only_dx[2] is None and torch.equal(only_dx[0], dx)
    only_ab = triton_backend.backward(dy, x, weight, alpha, beta, scale, p, seed, False, True)
    assert only_ab[0] is None
    assert torch.equal(only_ab[1], dalpha) and torch.equal(only_ab[2], dbeta)


def test_out_argument_writes_every_element_of_a_strided_buffer():
    tokens, n, m, r = 20, 24, 33, 2
    x = torch.randn(tokens, n, device=DEVICE)
    weight = torch.randn(m, n, device=DEVICE)
    alpha, beta = torch.randn(r, n, device=DEVICE), torch.randn(m, device=DEVICE)
    out = torch.full((m, tokens), math.nan, device=DEVICE).t()
    got = spp_forward_mod.spp_linear_forward(x, weight, alpha, beta, None, 1.0, 0.0, 0, out=out)
    assert got is out
    ref = triton_backend.forward(x, weight, alpha, beta, None, 1.0, 0.0, 0)
    assert torch.equal(out, ref)
    dy = torch.randn(tokens, m, device=DEVICE)
    dx_out = torch.full((tokens, 2 * n), math.nan, device=DEVICE)[:, ::2]
    spp_backward_mod.spp_linear_dx(dy, weight, alpha, beta, 1.0, 0.0, 0, out=dx_out)
    assert torch.equal(dx_out, spp_backward_mod.spp_linear_dx(dy, weight, alpha, beta, 1.0, 0.0, 0))
    with pytest.raises(ValueError, match="out must be"):
        spp_forward_mod.spp_linear_forward(x, weight, alpha, beta, None, 1.0, 0.0, 0, out=out.t())


def test_empty_inputs_launch_nothing_and_give_zero_gradients():
    n, m, r = 8, 6, 2
    x = torch.randn(0, n, device=DEVICE)
    weight = torch.randn(m, n, device=DEVICE)
    alpha, beta = torch.randn(r, n, device=DEVICE), torch.randn(m, device=DEVICE)
    bias = torch.randn(m, device=DEVICE)
    assert triton_backend.forward(x, weight, alpha, beta, bias, 1.0, 0.0, 0).shape == (0, m)
    dx, dalpha, dbeta = triton_backend.backward(
        torch.randn(0, m, device=DEVICE), x, weight, alpha, beta, 1.0, 0.0, 0
    )
    assert dx.shape == (0, n)
    assert torch.equal(dalpha, torch.zeros(r, n, device=DEVICE))
    assert torch.equal(dbeta, torch.zeros(m, device=DEVICE))


def test_dalpha_slots_bound_the_groups_of_every_row_tile():
    """The dalpha partial buffer has enough slots, and the alpha row-select path enough
    alpha rows, for every row tile, for any r <= m."""
    for m in [*range(1, 80), 127, 128, 129, 300, 4096, 11008]:
        for r in sorted({1, 2, 3, 7, 16, 64, m // 3, m // 2, m - 1, m} & set(range(1, m + 1))):
            groups = row_groups(m, r)
            for block in (16, 128):
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


def test_every_tl_dot_block_is_at_least_16():
    configs = [
        *spp_forward_mod.FORWARD_CONFIGS,
        spp_forward_mod.FORWARD_INTERPRETER_CONFIG,
        *spp_backward_mod.DX_CONFIGS,
        spp_backward_mod.DX_INTERPRETER_CONFIG,
        *spp_backward_mod.DAB_CONFIGS,
        spp_backward_mod.DAB_INTERPRETER_CONFIG,
    ]
    for config in configs:
        for name, value in config.kwargs.items():
            if name.startswith("BLOCK_"):
                assert value >= MIN_DOT, (name, value)
    assert min(spp_backward_mod.DAB_BLOCK_M, spp_backward_mod.DAB_BLOCK_N) >= MIN_DOT


def test_clear_errors():
    n, m, r = 8, 6, 2
    x64 = torch.randn(4, n, dtype=torch.float64, device=DEVICE)
    w64 = torch.randn(m, n, dtype=torch.float64, device=DEVICE)
    a64, b64 = torch.randn(r, n, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        spp_linear(x64, w64, a64.to(DEVICE), b64.to(DEVICE), backend="triton")
    with pytest.raises(TypeError, match="float64"):
        triton_backend.forward(x64, w64, a64.to(DEVICE), b64.to(DEVICE), None, 1.0, 0.0, 0)
    x, w = x64.half(), w64.half()
    alpha, beta = a64.to(DEVICE).float(), b64.to(DEVICE).float()
    with pytest.raises(TypeError, match="alpha dtype"):
        triton_backend.forward(x, w, alpha.bfloat16(), beta, None, 1.0, 0.0, 0)
    with pytest.raises(TypeError, match="weight dtype"):
        triton_backend.forward(x, w.float(), alpha, beta, None, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="beta must have shape"):
        triton_backend.forward(x, w, alpha, beta[:-1], None, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="dropout_p"):
        triton_backend.forward(x, w, alpha, beta, None, 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="dy must be"):
        triton_backend.backward(x[:, :m].contiguous()[:3], x, w, alpha, beta, 1.0, 0.0, 0)


# ---------------------------------------------------------------- compiled kernels (GPU)

GPU_CASES = [
    Case((300,), 520, 384, 16, BF16, F32, 0.0, True, "contiguous", "2:4"),
    Case((4, 77), 264, 400, 12, BF16, BF16, 0.1, True, "contiguous", "unstructured"),
    Case((257,), 136, 300, 7, F16, F32, 0.05, False, "transposed", "2:4"),
    Case((129,), 200, 144, 144, F32, F32, 0.0, True, "strided", "unstructured"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_compiled_kernels_match_float64(case, poisoned):
    run_case(case)


@pytest.mark.cuda
def test_compiled_gradients_are_deterministic():
    tokens, n, m, r = 1000, 512, 768, 16
    x = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    weight = sparse_weight(m, n, torch.bfloat16, "2:4")
    alpha, beta = torch.randn(r, n, device="cuda"), torch.randn(m, device="cuda")
    dy = torch.randn(tokens, m, device="cuda", dtype=torch.bfloat16)
    first = triton_backend.backward(dy, x, weight, alpha, beta, 2.0, 0.1, 5)
    second = triton_backend.backward(dy, x, weight, alpha, beta, 2.0, 0.1, 5)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_compiled_llama_shape_bf16_smoke():
    """One LLaMA-7B-sized projection (4096 x 4096, 2048 tokens, r = 16) in native bf16."""
    tokens, n, m, r = 2048, 4096, 4096, 16
    x = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    weight = sparse_weight(m, n, torch.bfloat16, "2:4")
    alpha = torch.randn(r, n, device="cuda", dtype=torch.bfloat16) * 0.1
    beta = torch.randn(m, device="cuda", dtype=torch.bfloat16)
    y = triton_backend.forward(x, weight, alpha, beta, None, 2.0, 0.0, 0)
    from spp_kernels.ops import torch_backend

    ref = torch_backend.forward(
        x.float(), weight.float(), alpha.float(), beta.float(), None, 2.0, 0.0, 0
    )
    check_close("y", y, ref)


# ------------------------------------------- GPU code generation without a GPU (ptxas)

_COMPILE_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)  # compile the GPU path, not the interpreter's
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import csrc_triton.spp_backward as B
import csrc_triton.spp_forward as F
from csrc_triton._launch import alpha_groups

arch, dtype = int(sys.argv[1]), sys.argv[2]
UNIT = {"stride_xn", "stride_wn", "stride_an", "stride_ym", "stride_dym", "stride_dxn",
        "stride_beta", "stride_bias"}  # stride 1: what a contiguous launch specialises
FLOATS = {"scale", "keep_scale", "dropout_p", "grad_scale"}
DATA = {"x_ptr", "w_ptr", "y_ptr", "dy_ptr", "dx_ptr"}

def compile_kernel(kernel, consts, config):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn  # unwrap autotune / heuristics
    consts = dict(consts, **{k: 1 for k in UNIT if k in kernel.arg_names})
    if "NM_M" in kernel.arg_names:  # dense weights; packed N:M ones: tests/test_nm_kernels.py
        consts = {"NM_N": 0, "NM_M": 0, **consts}
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}" if name in DATA else "*fp32"
        else:
            sig[name] = "fp32" if name in FLOATS else ("i64" if name == "seed" else "i32")
        if sig[name] != "constexpr" and name not in FLOATS | {"seed", "r", "slots"}:
            attrs[(i,)] = [["tt.divisibility", 16]]
    target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(ASTSource(kernel, sig, constexprs=consts, attrs=attrs), target=target, options=options)

prec = "ieee" if dtype == "fp32" else "tf32"
for dropout in (False, True):
    for groups in (alpha_groups(128, 16, 4096), 0):  # alpha row select, alpha gather
        c = F.FORWARD_CONFIGS[0]
        compile_kernel(F._spp_forward_kernel, dict(HAS_BIAS=True, DROPOUT=dropout, UPCAST=False,
                       PRECISION=prec, NUM_GROUPS=groups, **c.kwargs), c)
        c = B.DX_CONFIGS[0]
        compile_kernel(B._spp_dx_kernel, dict(DROPOUT=dropout, UPCAST=False, PRECISION=prec,
                       NUM_GROUPS=groups, **c.kwargs), c)
        c = B.DAB_CONFIGS[0]
        compile_kernel(B._spp_dalpha_dbeta_kernel, dict(DROPOUT=dropout, UPCAST=False,
                       PRECISION=prec, NUM_GROUPS=groups, BLOCK_M=B.DAB_BLOCK_M,
                       BLOCK_N=B.DAB_BLOCK_N, GROUP_M=B.DAB_GROUP_M, **c.kwargs), c)
compile_kernel(B._spp_dalpha_reduce_kernel, dict(TILE_M=B.DAB_BLOCK_M, BLOCK_N=B.REDUCE_BLOCK_N),
               triton.Config({}, num_warps=4, num_stages=1))
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "dtype"), [(90, "bf16"), (80, "fp16")])
def test_gpu_code_generation_without_a_gpu(arch, dtype):
    """Every kernel, both dropout modes and both alpha-tile paths, compiled for sm_90 / sm_80
    down to a cubin with Triton's bundled ptxas: catches GPU-only errors (tl.dot shapes,
    types, layouts) that the interpreter accepts, on a machine without a GPU."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() and shutil.which("ptxas") is None:
        pytest.skip("no ptxas available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, str(arch), dtype],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
